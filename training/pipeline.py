"""`atelier specialist add`: documents -> generated data -> DAPT -> SFT -> DPO -> evaluation -> registry.

Reads top to bottom in `run_pipeline`. Every step is resumable:

* a run lives in ATELIER_HOME/runs/NAME/RUN_ID/. Re-running `add` continues the newest
  unfinished run of NAME; after a finished run it starts a new one seeded with hard links
  to the previous run's outputs, so steps whose inputs did not change are skipped;
* generated data is skipped when the documents, the data config and the teacher are
  unchanged (a fingerprint beside the manifest); each training stage fingerprints its own
  inputs, returns its saved result when they match, and resumes from its newest checkpoint
  when it was interrupted; evaluations are cached by the same fingerprints.

One LoRA adapter is carried from stage to stage. For `scratch:*` bases DAPT trains the whole
model (it is pretraining from scratch on the domain) and its output becomes the
specialist's base model.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from atelier.errors import AtelierError
from atelier.home import atelier_home, atomic_write_text
from retrieval.documents import Document, load_folder
from training.config import SpecialistConfig

DONE_FILE = "summary.json"


@dataclass
class PipelineHooks:
    """How the pipeline reports to its caller (the CLI draws progress bars with these)."""

    step: Callable[[str, str], None] = lambda name, detail: None  # a step starts: ("dapt", "training 250 steps")
    data_progress: Callable[[str, int, int], None] | None = None  # (what, done, total)
    train_progress: Callable[[int, int, float | None], None] | None = None  # (step, max_steps, loss)
    skipped: Callable[[str, str], None] = lambda path, reason: None  # an unreadable document
    done: Callable[[str, float, str], None] = lambda name, seconds, note: None  # a step finished


@dataclass
class PipelineResult:
    name: str
    run_dir: Path
    report: dict[str, Any]
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    record: Any = None  # the SpecialistRecord when registered
    data_counts: dict[str, int] = field(default_factory=dict)


def _digest(*parts: Any) -> str:
    payload = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def choose_run(name: str, *, new_run: bool = False) -> Path:
    """The newest unfinished run of `name`, else a new run seeded (hard links) from the newest finished one."""
    runs = atelier_home() / "runs" / name
    existing = sorted((p for p in runs.glob("*") if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)
    latest = existing[-1] if existing else None
    if latest is not None and not new_run and not (latest / DONE_FILE).exists():
        return latest
    run_dir = runs / datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    suffix = 1
    while run_dir.exists():
        suffix += 1
        run_dir = runs / f"{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}-{suffix}"
    if latest is not None and not new_run:
        _seed_from(latest, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _seed_from(previous: Path, run_dir: Path) -> None:
    """Hard-link the previous run's outputs into a new run; unchanged steps then skip themselves."""
    tmp = run_dir.with_name(f".{run_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(previous, tmp, copy_function=link, ignore=shutil.ignore_patterns(DONE_FILE))
    os.replace(tmp, run_dir)


def load_documents(docs_dir: Path, hooks: PipelineHooks) -> list[Document]:
    loaded = load_folder(docs_dir)
    for path, reason in loaded.skipped:
        hooks.skipped(path, reason)
    if not loaded.documents:
        raise AtelierError(f"no readable documents in {docs_dir}; add .md, .txt, .html, .pdf or .jsonl files "
                           "(an empty or unreadable folder cannot teach a specialist anything)")
    return loaded.documents


def generate_data(docs: list[Document], data_dir: Path, config: SpecialistConfig, hooks: PipelineHooks):
    """Build (or reuse) the DAPT/SFT/DPO datasets; returns the DataManifest."""
    from training.data import build_datasets, inputs_fingerprint, load_manifest
    from training.teacher import Teacher

    fingerprint = inputs_fingerprint(docs, config.data, config.chunking,
                                     teacher_name=config.teacher.name if config.teacher else None)
    manifest = load_manifest(data_dir)
    if manifest is not None and manifest.inputs_hash == fingerprint:
        return manifest, True
    teacher = Teacher(config.teacher) if config.teacher else None
    try:
        manifest = build_datasets(docs, data_dir, config.data, chunking=config.chunking, teacher=teacher,
                                  progress=hooks.data_progress)
    finally:
        if teacher is not None:
            teacher.close()
    return manifest, False


def evaluate_cached(label: str, model: Path, adapter: Path | None, data_dir: Path, manifest_hash: str,
                    config: SpecialistConfig, eval_dir: Path, stage_stamp: str = "") -> dict[str, float]:
    """Held-out metrics of model (+ adapter), cached under eval_dir/<label>.json by their inputs."""
    from eval.specialist import evaluate_model

    key = _digest(str(model), str(adapter), manifest_hash, config.eval.model_dump(mode="json"), stage_stamp)
    cached = eval_dir / f"{label}.json"
    if cached.exists():
        saved = json.loads(cached.read_text())
        if saved.get("key") == key:
            return saved["metrics"]
    metrics = evaluate_model(model, adapter, data_dir, config.eval)
    atomic_write_text(cached, json.dumps({"key": key, "metrics": metrics}, indent=2) + "\n")
    return metrics


def train_stage(stage: str, model: Path, adapter: Path | None, data_dir: Path, run_dir: Path,
                config: SpecialistConfig, hooks: PipelineHooks):
    from training.dapt import train_dapt
    from training.dpo import train_dpo
    from training.sft import train_sft

    trainers = {"dapt": (train_dapt, config.dapt), "sft": (train_sft, config.sft), "dpo": (train_dpo, config.dpo)}
    train, stage_config = trainers[stage]
    return train(model, data_dir, run_dir / stage, stage_config, config.lora, adapter=adapter,
                 progress=hooks.train_progress)


def route_exemplars(data_dir: Path, count: int, seed: int) -> list[str]:
    """A sample of the specialist's training instructions: what the router matches requests against."""
    path = data_dir / "sft" / "train.jsonl"
    if count <= 0 or not path.exists():
        return []
    questions = []
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        first = next((m["content"] for m in row.get("messages", []) if m.get("role") == "user"), None)
        if first:
            questions.append(first)
    questions = sorted(set(questions))
    random.Random(seed).shuffle(questions)
    return questions[:count]


def run_pipeline(name: str, docs_dir: Path, config: SpecialistConfig, *, force: bool = False,
                 new_run: bool = False, hooks: PipelineHooks | None = None) -> PipelineResult:
    """The whole recipe for one specialist; see the module docstring."""
    from eval.report import compare, write_report
    from specialists.registry import Registry, validate_name
    from training.models import resolve_base

    hooks = hooks or PipelineHooks()
    validate_name(name)
    config.lora.check_available()
    docs = load_documents(Path(docs_dir), hooks)
    run_dir = choose_run(name, new_run=new_run)
    atomic_write_text(run_dir / "config.json", config.model_dump_json(indent=2) + "\n")
    result = PipelineResult(name=name, run_dir=run_dir, report={})

    started = time.perf_counter()
    hooks.step("base", config.base)
    base = resolve_base(config.base, work_dir=run_dir / "base", corpus_texts=[d.text for d in docs], seed=config.seed)
    result.timings["base"] = time.perf_counter() - started
    hooks.done("base", result.timings["base"], str(base))

    started = time.perf_counter()
    hooks.step("data", f"{len(docs)} documents, {'teacher ' + config.teacher.name if config.teacher else 'offline'}")
    data_dir = run_dir / "data"
    manifest, reused = generate_data(docs, data_dir, config, hooks)
    result.data_counts = {path: f.rows for path, f in manifest.files.items() if path.endswith(".jsonl")}
    result.timings["data"] = time.perf_counter() - started
    hooks.done("data", result.timings["data"], ("reused: " if reused else "") + ", ".join(
        f"{k} {v}" for k, v in result.data_counts.items()))

    eval_dir = run_dir / "eval"
    started = time.perf_counter()
    hooks.step("eval", "base model on the held-out split")
    metrics = {"base": evaluate_cached("base", base, None, data_dir, manifest.content_hash, config, eval_dir)}
    result.timings["eval:base"] = time.perf_counter() - started
    hooks.done("eval", result.timings["eval:base"], _brief(metrics["base"]))

    model, adapter = base, None
    for stage in config.stages:
        started = time.perf_counter()
        hooks.step(stage, f"{getattr(config, stage).max_steps} steps")
        outcome = train_stage(stage, model, adapter, data_dir, run_dir, config, hooks)
        model, adapter = Path(outcome.model_path), (Path(outcome.adapter_path) if outcome.adapter_path else None)
        result.stages[stage] = outcome.model_dump(mode="json")
        result.timings[stage] = time.perf_counter() - started
        stamp = (run_dir / stage / "result.json").read_text() if (run_dir / stage / "result.json").exists() else ""
        metrics[stage] = evaluate_cached(stage, model, adapter, data_dir, manifest.content_hash, config, eval_dir,
                                         stage_stamp=stamp)
        result.timings[f"eval:{stage}"] = time.perf_counter() - started - result.timings[stage]
        resumed = f", resumed from step {outcome.resumed_from_step}" if outcome.resumed_from_step else ""
        hooks.done(stage, result.timings[stage], f"{outcome.steps} steps{resumed}; {_brief(metrics[stage])}")

    report = compare(metrics["base"], {s: metrics[s] for s in config.stages})
    write_report(report, eval_dir)
    result.report = report.to_dict()

    hooks.step("register", name)
    try:
        result.record = Registry().register(
            name, base_model=str(model), eval_report=result.report, keywords=manifest.keywords[:20],
            adapter_dir=adapter, model_dir=None if adapter else model,
            data_manifest_hashes={"data": manifest.content_hash,
                                  **{path: f.sha256 for path, f in manifest.files.items()}},
            config=config.model_dump(mode="json"), route_exemplars=route_exemplars(
                data_dir, config.route_exemplars, config.seed), run_dir=run_dir, force=force)
    except AtelierError as exc:
        raise AtelierError(f"{exc} (report: {eval_dir / 'eval.md'})") from None
    finally:
        atomic_write_text(run_dir / DONE_FILE, json.dumps({"report": result.report, "timings": result.timings,
                                                           "stages": result.stages}, indent=2, default=str) + "\n")
    return result


def _brief(metrics: dict[str, float]) -> str:
    parts = []
    if "perplexity" in metrics:
        parts.append(f"ppl {metrics['perplexity']:.1f}")
    if "mcq_accuracy" in metrics:
        parts.append(f"mcq {metrics['mcq_accuracy']:.2f}")
    if "preference_accuracy" in metrics:
        parts.append(f"pref {metrics['preference_accuracy']:.2f}")
    return ", ".join(parts)
