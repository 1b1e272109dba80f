"""What every export target shares: the specialist loaded, the adapter copied out, the staging folder.

A target writer gets the loaded specialist and a staging folder and returns a `Staged`; the
pipeline renames the staging folder into place only once everything in it passed its checks.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from atelier.errors import AtelierError
from atelier.home import atomic_write_text
from specialists.export.parity import ParityReport
from specialists.registry import Registry, SpecialistRecord, check_adapter_files

MANIFEST = "export.json"  # written last into every export folder; marks folders an export may replace


@dataclass
class Staged:
    """What a target writer produced in the staging folder."""

    parity: ParityReport
    commands: list[str] = field(default_factory=list)
    card: dict[str, Any] = field(default_factory=dict)  # library_name / tags for the model card
    ollama: Any = None  # ollama.OllamaPlan: the model the ollama target creates once the export is in place
    details: dict[str, Any] = field(default_factory=dict)
    adapter_parity: ParityReport | None = None


# ----------------------------------------------------------------------------- the specialist


def load_specialist(record: SpecialistRecord):
    """(model, tokenizer): the adapter on its base in fp32 (or the full model), safetensors only, offline."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = weights_of(record)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, use_safetensors=True,
                                                     local_files_only=True)
    except (OSError, ValueError) as exc:
        raise AtelierError(f"cannot load {source} for specialist {record.name!r} ({exc}); the base must be "
                           "on this machine") from None
    if not record.full_model:
        model = attach(model, check_adapter_files(record))
    return model.eval(), tokenizer


def weights_of(record: SpecialistRecord) -> str:
    return str(record.model_path if record.full_model else record.base_model)


def attach(model, adapter: Path):
    import warnings

    from peft import PeftModel

    with warnings.catch_warnings():  # peft 0.21 asks transformers 5 a deprecated question; not ours to fix
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return PeftModel.from_pretrained(model, str(adapter), is_trainable=False).eval()


def merge(model):
    """The plain transformers model with the adapter folded into its weights (a full model as it is)."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def copy_adapter(record: SpecialistRecord, folder: Path) -> dict[str, Any]:
    """The registered adapter's files (safetensors only) in `folder`, its config pointing at the base."""
    source = check_adapter_files(record)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source / "adapter_model.safetensors", folder / "adapter_model.safetensors")
    config = json.loads((source / "adapter_config.json").read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = hub_id(record.base_model) or record.base_model
    atomic_write_text(folder / "adapter_config.json", json.dumps(config, indent=2) + "\n")
    return config


def adapter_on_base(record: SpecialistRecord, adapter: Path):
    """A fresh base with the exported adapter files attached: what vLLM / Ollama will be given."""
    import torch
    from transformers import AutoModelForCausalLM

    return attach(AutoModelForCausalLM.from_pretrained(record.base_model, dtype=torch.float32, use_safetensors=True,
                                                       local_files_only=True), adapter)


def hub_id(base_model: str) -> str | None:
    """The Hugging Face id of a base: from a hub cache path (models--ORG--NAME/snapshots/...) or an id itself."""
    match = re.search(r"models--([^/]+?)--([^/]+)/snapshots/", base_model)
    if match:
        return f"{match.group(1)}/{match.group(2)}"
    if not Path(base_model).exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", base_model):
        return base_model
    return None


def register_served(registry: Registry, record: SpecialistRecord, served_by: str) -> SpecialistRecord:
    """A new version of `record`, the same in every respect but served by `served_by`."""
    return registry.register_from(record, served_by=served_by)


# ----------------------------------------------------------------------------- output folder


def check_replaceable(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / MANIFEST).is_file())):
        raise AtelierError(f"{out_dir} already holds files that no export wrote; choose another --out")


@contextmanager
def staging(out_dir: Path) -> Iterator[Path]:
    """A hidden sibling folder to build in; renamed over `out_dir` (an older export) only on success."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _readable(tmp)
    old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}") if out_dir.exists() else None
    if old:
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def _readable(folder: Path) -> None:
    """Usual permissions (umask applied): mkdtemp/mkstemp make 0700/0600, which a server running as
    another user (vLLM in a container, llama-server under systemd) could not read."""
    mask = umask()
    for path in [folder, *folder.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def umask() -> int:
    """The process umask, read without os.umask(), which would briefly change it for every thread."""
    try:
        status = Path("/proc/self/status").read_text(encoding="utf-8")
        return int(re.search(r"^Umask:\s*([0-7]+)", status, re.MULTILINE).group(1), 8)
    except (OSError, AttributeError):
        return 0o022
