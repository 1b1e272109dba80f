"""What every export target shares: the specialist loaded, the adapter copied out, the output folder.

A target writer gets the loaded specialist and a staging folder (`atelier.home.atomic_dir`) and returns
a `Staged`; the pipeline lets the folder into place only once everything in it passed its checks.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from atelier.errors import AtelierError
from atelier.home import atomic_write_text
from specialists.export.parity import ParityReport
from specialists.loading import load_model, load_tokenizer
from specialists.registry import Registry, SpecialistRecord, check_adapter_files

FP32 = {"dtype": "float32", "use_safetensors": True}  # how every export loads: exact, and no pickles
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
    adapter = None if record.full_model else check_adapter_files(record)
    return load_model(weights_of(record), adapter, **FP32), load_tokenizer(weights_of(record))


def weights_of(record: SpecialistRecord) -> str:
    return str(record.model_path if record.full_model else record.base_model)


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
    return load_model(record.base_model, adapter, **FP32)


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
