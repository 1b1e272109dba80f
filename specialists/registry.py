"""The registry of specialists: versioned, self-contained records under `ATELIER_HOME/specialists/`.

Layout, one folder per specialist:

    specialists/NAME/current          the active version number ("3"); written last, atomically
    specialists/NAME/vN/record.json   the SpecialistRecord of version N
    specialists/NAME/vN/adapter/      a copy of the LoRA adapter (or vN/model/ for a full model)

A version folder is assembled in a hidden temporary folder and renamed into place in one step,
and `current` moves only after that, so a crash at any point leaves either the old state or the
new one, never a half-written record. A specialist exists once it has a `current` file.
Artifacts are validated before anything is written: a broken adapter (e.g. the 40-byte file
that ZeRO-3 saves when parameters are not gathered) must never become routable.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from atelier.config import StrictModel
from atelier.errors import AtelierError
from atelier.home import atelier_home, atomic_dir, atomic_write_text, fsync_dir
from atelier.reports import EvalReport, ExamReport, none_if_empty

log = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
MIN_WEIGHTS_BYTES = 1024  # a real adapter is kilobytes at least; the ZeRO-3 bug left 40 bytes
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
SKIPPED_FILES = {"optimizer.pt", "scheduler.pt", "trainer_state.json", "training_args.bin"}
_ARTIFACT_FIELDS = ("adapter_path", "adapter_sha256", "model_path", "model_sha256")


class SpecialistRecord(StrictModel):
    """Everything needed to serve, route to and audit one version of a specialist."""

    name: str = Field(description="Registry name: lowercase letters, digits, - and _.")
    version: int = Field(ge=1, description="1, 2, ...: each registration of the same name adds a version.")
    description: str = Field(description="One line for humans and the router, built from the keywords by default.")
    keywords: list[str] = Field(default_factory=list, description="Domain keywords found in its documents.")
    base_model: str = Field(description="Local path or hub id of the base model the adapter applies to.")
    full_model: bool = Field(False, description="True for a full fine-tune or scratch model (see model_path).")
    adapter_path: str | None = Field(None, description="The LoRA adapter's copy inside the registry.")
    adapter_sha256: str | None = Field(None, description="SHA-256 of adapter_model.safetensors.")
    model_path: str | None = Field(None, description="The full model's copy inside the registry (full_model only).")
    model_sha256: str | None = Field(None, description="SHA-256 of the full model's safetensors weights.")
    data_manifest_hashes: dict[str, str] = Field(default_factory=dict, description="Hashes of the generated data.")
    config: dict[str, Any] = Field(default_factory=dict, description="The training configuration used.")
    eval_report: EvalReport | None = Field(None, description="Its held-out evaluation against the base.")
    route_exemplars: list[str] = Field(default_factory=list, description="Sample training instructions for the router.")
    served_by: str | None = Field(None, description="External server that serves it, e.g. 'ollama:NAME'.")
    exam_report: ExamReport | None = Field(None, description="Base and specialist on the user's exam "
                                           "(`specialist add --exam`); None without one.")
    exam_sha256: str | None = Field(None, description="SHA-256 of the exam file the exam_report was measured on.")
    forced: bool = Field(False, description="Registered with --force although the gate refused it.")
    created_at: str = Field(description="ISO 8601 time of registration (UTC).")
    run_dir: str | None = Field(None, description="The training run folder it came from.")
    parent_version: int | None = Field(None, description="The version it was trained from (`specialist improve`); "
                                       "None for a version built from the documents.")
    lineage: dict[str, Any] = Field(default_factory=dict, description="What an improvement round used: feedback "
                                    "ids, pair files with their SHA-256, pair counts and the regression gate's result.")
    candidate: bool = Field(False, description="Kept but never activated: the regression gate refused it "
                            "(`specialist show NAME --candidates`); rollback skips it.")
    candidate_reasons: list[str] = Field(default_factory=list, description="Why the gate refused the candidate.")

    @field_validator("eval_report", "exam_report", mode="before")
    @classmethod
    def empty_is_none(cls, value: Any) -> Any:
        return none_if_empty(value)

    @property
    def artifact(self) -> Path:
        """The folder of its weights: the adapter, or the full model."""
        return Path((self.model_path if self.full_model else self.adapter_path) or "")


# ----------------------------------------------------------------------------- validation


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise AtelierError(f"invalid specialist name {name!r}: use 1-64 lowercase letters, digits, '-' or '_', "
                           "starting with a letter or digit (e.g. 'pump-manuals')")
    return name


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_weights(path: Path) -> None:
    """A safetensors file that opens, holds >= 1 tensor, none empty, and is not implausibly small."""
    from safetensors import SafetensorError, safe_open

    size = path.stat().st_size
    if size < MIN_WEIGHTS_BYTES:
        raise AtelierError(f"{path} is only {size} bytes, too small to hold real weights (a known symptom of "
                           "saving under DeepSpeed ZeRO-3 without gathering); re-save the adapter and retry")
    try:
        with safe_open(str(path), framework="numpy") as weights:
            shapes = {key: weights.get_slice(key).get_shape() for key in weights.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError) as exc:
        raise AtelierError(f"{path} is not a readable safetensors file ({exc}); re-save the weights") from None
    if not shapes:
        raise AtelierError(f"{path} holds no tensors; re-save the weights")
    empty = [key for key, shape in shapes.items() if 0 in shape]
    if empty:
        raise AtelierError(f"{path} has empty tensors ({', '.join(empty[:3])}); re-save the weights")


def _check_json(path: Path) -> None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AtelierError(f"{path} is missing or not valid JSON ({exc}); re-save it") from None
    if not isinstance(data, dict):
        raise AtelierError(f"{path} is not a JSON object; re-save it")


def validate_adapter(adapter_dir: Path) -> str:
    """Check a PEFT LoRA adapter folder and return the SHA-256 of its weights."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise AtelierError(f"adapter folder {adapter_dir} does not exist; point to the stage's output folder")
    _check_json(adapter_dir / "adapter_config.json")
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise AtelierError(f"{adapter_dir} has no adapter_model.safetensors; save the adapter with safetensors")
    _check_weights(weights)
    return sha256_file(weights)


def validate_full_model(model_dir: Path) -> str:
    """Check a full model folder (config.json + safetensors weights) and return a hash of its weights."""
    model_dir = Path(model_dir)
    _check_json(model_dir / "config.json")
    shards = sorted(model_dir.glob("*.safetensors"))
    if not shards:
        raise AtelierError(f"{model_dir} has no *.safetensors weights; save the model with safetensors")
    for shard in shards:
        _check_weights(shard)
    if len(shards) == 1:
        return sha256_file(shards[0])
    return hashlib.sha256("".join(f"{s.name}:{sha256_file(s)}\n" for s in shards).encode()).hexdigest()


def check_adapter_files(record: SpecialistRecord) -> Path:
    """The adapter folder of `record`, refused unless it is safetensors matching the registered hash."""
    folder = Path(record.adapter_path or "")
    if not record.adapter_path or not folder.is_dir():
        raise AtelierError(f"specialist {record.name!r} v{record.version} has no adapter folder ({folder}); "
                           "register it again with `atelier specialist add`")
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise AtelierError(f"adapter of {record.name!r} at {folder} holds pickle weights ({', '.join(pickles)}), "
                           "which can run code when loaded; Atelier loads safetensors only. Re-save the adapter "
                           "with save_pretrained(safe_serialization=True), delete the pickle files, register again")
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise AtelierError(f"adapter of {record.name!r} at {folder} has no adapter_model.safetensors; register again")
    if record.adapter_sha256 and sha256_file(weights) != record.adapter_sha256:
        raise AtelierError(f"adapter of {record.name!r} at {weights} does not match the SHA-256 recorded at "
                           "registration (changed or tampered with); register it again")
    return folder


def check_model_files(record: SpecialistRecord) -> Path:
    """The full model folder of `record`, refused unless its weights match the registered hash."""
    folder = Path(record.model_path or "")
    sha = validate_full_model(folder)
    if record.model_sha256 and sha != record.model_sha256:
        raise AtelierError(f"the weights of {record.name!r} v{record.version} at {folder} do not match the SHA-256 "
                           "recorded at registration (changed or tampered with); register it again")
    return folder


def gate_refusal(report: EvalReport | None, exam: ExamReport | None = None) -> str | None:
    """Why the gate refuses a specialist (None when it may be registered): its held-out evaluation,
    and its exam result when it has one."""
    if report is None:
        return "it has no evaluation against its base; evaluate it first"
    if (why := report.refusal()) is not None:
        return f"on the held-out split: {why}"
    if exam is not None and (why := exam.refusal()) is not None:
        return f"on the exam {exam.exam}: {why}"
    return None


# ----------------------------------------------------------------------------- file plumbing


def copy_artifacts(source: Path, target: Path) -> None:
    """Copy the top-level files of an adapter/model folder (not checkpoints, not optimizer state).

    Subfolders are skipped on purpose: trainer output folders hold checkpoint-*/ and DPO's
    frozen ref/ adapter, which serving does not need.
    """
    target.mkdir(parents=True)
    for path in sorted(Path(source).iterdir()):
        if path.is_file() and not path.name.startswith(".") and path.name not in SKIPPED_FILES:
            shutil.copyfile(path, target / path.name)


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """One writer per specialist at a time (an advisory lock on NAME/.lock)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _version_of(path: Path) -> int | None:
    match = re.fullmatch(r"v([1-9][0-9]*)", path.name)
    return int(match.group(1)) if match and (path / "record.json").is_file() else None


# ----------------------------------------------------------------------------- the registry


class Registry:
    """Register, list, show, roll back and remove specialists under `home/specialists/`."""

    def __init__(self, home: Path | None = None):
        self.root = Path(home if home is not None else atelier_home()) / "specialists"
        self._warned: set[str] = set()

    # --- reading

    def names(self) -> list[str]:
        """Registered specialists: folders with a `current` file (half-made ones are invisible)."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and not p.name.startswith(".") and (p / "current").is_file())

    def list(self) -> list[SpecialistRecord]:
        """The active version of every specialist, by name; one that cannot be read is left out with a warning."""
        records, problems = self.scan()
        for problem in set(problems) - self._warned:  # once per process and problem, not once per request
            log.warning("%s", problem)
            self._warned.add(problem)
        return records

    def scan(self) -> tuple[list[SpecialistRecord], list[str]]:
        """The readable active records, and one message (file and fix) for each specialist that is not."""
        records, problems = [], []
        for name in self.names():
            try:
                records.append(self.get(name))
            except AtelierError as exc:
                problems.append(f"specialist {name!r} skipped: {exc}")
        return records, problems

    def versions(self, name: str) -> list[int]:
        """Every complete version of `name`, oldest first."""
        folder = self._folder(name)
        return sorted(v for v in (_version_of(p) for p in folder.iterdir()) if v is not None)

    def current_version(self, name: str) -> int:
        try:
            text = (self._folder(name) / "current").read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            text = f"unreadable: {exc}"
        if not text.isdigit():
            raise AtelierError(f"{self._folder(name) / 'current'} is corrupt ({text!r}); "
                               f"write a version number from {self.versions(name)} into it")
        return int(text)

    def get(self, name: str, version: int | None = None) -> SpecialistRecord:
        """The record of `name` at `version` (the active one by default), with absolute artifact paths."""
        folder = self._folder(name)
        version = self.current_version(name) if version is None else version
        path = folder / f"v{version}" / "record.json"
        if not path.is_file():
            raise AtelierError(f"specialist {name!r} has no version {version}; versions: "
                               f"{', '.join(map(str, self.versions(name))) or 'none'}")
        try:
            record = SpecialistRecord.model_validate_json(path.read_bytes())
        except (OSError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
            older = [v for v in self.versions(name) if v != version]
            fix = (f"`atelier specialist rollback {name}` to v{older[-1]}, or " if older and version ==
                   self.current_version(name) else "")
            raise AtelierError(f"{path} cannot be read ({_first_line(exc)}); {fix}register the specialist again "
                               "with `atelier specialist add` (`atelier doctor` checks every record)") from None
        if record.name != name or record.version != version:
            raise AtelierError(f"{path} describes {record.name!r} v{record.version}, not {name!r} v{version}; "
                               "it was copied or edited by hand: restore it or register the specialist again")
        return record.model_copy(update={
            key: str(path.parent / value) for key in ("adapter_path", "model_path")
            if (value := getattr(record, key)) and not Path(value).is_absolute()})

    # --- writing

    def register(self, name: str, *, base_model: str, eval_report: EvalReport | dict[str, Any] | None,
                 keywords: list[str] | None = None, adapter_dir: Path | None = None, model_dir: Path | None = None,
                 description: str | None = None, data_manifest_hashes: dict[str, str] | None = None,
                 config: dict[str, Any] | None = None, route_exemplars: list[str] | None = None,
                 served_by: str | None = None, run_dir: Path | str | None = None, force: bool = False,
                 exam_report: ExamReport | dict[str, Any] | None = None, exam_sha256: str | None = None,
                 ) -> SpecialistRecord:
        """Add a new version of `name` and make it active. Exactly one of adapter_dir / model_dir.

        Order matters: name, evaluation gate and artifacts are all checked before the first
        byte is written; the version folder appears by one rename; `current` moves last.
        """
        validate_name(name)
        if (adapter_dir is None) == (model_dir is None):
            raise AtelierError("give exactly one of an adapter folder (LoRA) or a full model folder to register")
        report = EvalReport.model_validate(eval_report) if none_if_empty(eval_report) is not None else None
        exam = ExamReport.model_validate(exam_report) if none_if_empty(exam_report) is not None else None
        keywords = list(keywords or [])
        if Path(base_model).exists():
            base_model = str(Path(base_model).resolve())
        fields = {
            "name": name, "description": description or _describe(name, keywords), "keywords": keywords,
            "base_model": base_model, "full_model": model_dir is not None, "config": dict(config or {}),
            "data_manifest_hashes": dict(data_manifest_hashes or {}), "route_exemplars": list(route_exemplars or []),
            "eval_report": report, "exam_report": exam, "exam_sha256": exam_sha256 or (exam and exam.exam_sha256),
            "served_by": served_by, "run_dir": str(Path(run_dir).resolve()) if run_dir else None}
        return self._add(fields, Path(adapter_dir or model_dir), force=force)

    def register_from(self, record: SpecialistRecord, *, weights: Path | None = None,
                      **changes: Any) -> SpecialistRecord:
        """A new version of `record.name` that is `record` with `changes` (e.g. `served_by=...`), its weights
        copied from `weights` (an improvement round's output) or from the record's own folder. The gate is
        applied again unless it was forced. With `candidate=True` the version is kept but never made active
        (an improvement round the regression gate refused), and rollback skips it."""
        kept = set(SpecialistRecord.model_fields) - {"version", "created_at", "forced", "candidate",
                                                     "candidate_reasons", *_ARTIFACT_FIELDS}
        fields = {key: getattr(record, key) for key in kept} | changes
        return self._add(fields, Path(weights) if weights else record.artifact, force=record.forced)

    def candidates(self, name: str) -> list[int]:
        """Versions kept as candidates (refused by the improvement gate), oldest first; unreadable ones left out."""
        found = []
        for version in self.versions(name):
            try:
                if self.get(name, version).candidate:
                    found.append(version)
            except AtelierError:
                continue
        return found

    def _add(self, fields: dict[str, Any], source: Path, *, force: bool) -> SpecialistRecord:
        """Gate, validate and publish one version described by `fields`; `current` moves last (not for a candidate)."""
        name = fields["name"]
        refusal = gate_refusal(fields.get("eval_report"), fields.get("exam_report"))
        if refusal is not None and not force:
            raise AtelierError(f"specialist {name!r} is refused {refusal}. Improve the data or training, "
                               "or pass --force to register it anyway")
        artifact = "model" if fields["full_model"] else "adapter"
        sha = validate_full_model(source) if fields["full_model"] else validate_adapter(source)
        fields = {**fields, "forced": refusal is not None, "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
                  f"{artifact}_path": artifact, f"{artifact}_sha256": sha}
        folder = self.root / name
        with _locked(folder):
            version = self._publish(folder, artifact, source, sha, fields)
            if not fields.get("candidate"):
                atomic_write_text(folder / "current", f"{version}\n")
        return self.get(name, version)

    def _publish(self, folder: Path, artifact: str, source: Path, sha: str, fields: dict[str, Any]) -> int:
        """Assemble vN in a hidden temporary folder, then rename it into place; returns N."""
        for stale in folder.glob(".*tmp-*"):  # leftovers of a crashed registration
            shutil.rmtree(stale, ignore_errors=True)
        known = [v for v in (_version_of(p) for p in folder.iterdir()) if v is not None]
        version = max(known, default=0) + 1
        try:
            with atomic_dir(folder / f"v{version}") as staging:
                copy_artifacts(source, staging / artifact)
                weights = "adapter_model.safetensors" if artifact == "adapter" else None
                if weights and sha256_file(staging / artifact / weights) != sha:
                    raise AtelierError(f"{source} changed while it was being copied; register again when "
                                       "training is done")
                record = SpecialistRecord(version=version, **fields)
                atomic_write_text(staging / "record.json", record.model_dump_json(indent=2) + "\n")
        except BaseException:
            if not (folder / "current").exists() and not known:
                shutil.rmtree(folder, ignore_errors=True)  # a first registration that failed leaves nothing
            raise
        return version

    def activate(self, name: str, version: int, *, force: bool = False) -> SpecialistRecord:
        """Make `version` the active one; a candidate (refused by the improvement gate) only with `force`."""
        folder = self._folder(name)
        with _locked(folder):
            record = self.get(name, version)  # a version that is missing or unreadable says so here
            if record.candidate and not force:
                reasons = "; ".join(record.candidate_reasons) or "no reasons recorded"
                raise AtelierError(f"{name} v{version} is a candidate the regression gate refused ({reasons}); "
                                   "pass --force to make it active anyway")
            atomic_write_text(folder / "current", f"{version}\n")
        return record

    def rollback(self, name: str) -> SpecialistRecord:
        """Make the newest version older than the active one active (candidates skipped); the newer one stays."""
        folder = self._folder(name)
        with _locked(folder):
            current = self.current_version(name)
            refused = set(self.candidates(name))
            older = [v for v in self.versions(name) if v < current and v not in refused]
            if not older:
                raise AtelierError(f"specialist {name!r} has no version before v{current}; nothing to roll back to")
            atomic_write_text(folder / "current", f"{older[-1]}\n")
        return self.get(name)

    def remove(self, name: str) -> None:
        """Delete a specialist and all its versions (renamed aside first, so it vanishes at once)."""
        folder = self._folder(name)
        with _locked(folder):
            trash = self.root / f".trash-{name}-{uuid.uuid4().hex[:8]}"
            os.rename(folder, trash)
            fsync_dir(self.root)
        shutil.rmtree(trash, ignore_errors=True)

    def _folder(self, name: str) -> Path:
        """The folder of a registered specialist, or an error that lists the known ones."""
        validate_name(name)
        folder = self.root / name
        if not (folder / "current").is_file():
            known = self.names()
            hint = f"known: {', '.join(known)}" if known else "none registered yet; add one with `atelier specialist add`"
            raise AtelierError(f"no specialist named {name!r} ({hint})")
        return folder


def _first_line(exc: Exception) -> str:
    """What went wrong, in one line and without the file's contents (pydantic quotes the input)."""
    if callable(getattr(exc, "errors", None)):
        first = exc.errors()[0]
        where = ".".join(map(str, first.get("loc", ()))) or "record"
        return f"{where}: {first.get('msg', 'invalid')}"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160]}" if text else type(exc).__name__


def _describe(name: str, keywords: list[str]) -> str:
    """A one-line description from the domain keywords (what the router and `list` show)."""
    if not keywords:
        return f"Specialist {name}"
    return f"Specialist in {', '.join(keywords[:8])}"
