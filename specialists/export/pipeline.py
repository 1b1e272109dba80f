"""One export, start to end: check the options, load the specialist and its reference, stage the target's
files, write the model card and the manifest, rename into place; then create in Ollama or register for llama.cpp.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from atelier.config import StrictModel
from atelier.errors import AtelierError
from atelier.home import atelier_home, atomic_dir, atomic_write_text
from specialists.export.common import MANIFEST, check_replaceable, load_specialist, register_served, weights_of
from specialists.export.gguf import write_gguf_target
from specialists.export.merged import write_merged
from specialists.export.model_card import model_card
from specialists.export.ollama import maybe_create_in_ollama, ollama_base_tag, ollama_reachable, write_ollama
from specialists.export.parity import ParityReport, held_out_conversations, reference_probes
from specialists.export.vllm import write_vllm
from specialists.registry import Registry, SpecialistRecord

TARGETS = ("merged", "gguf", "ollama", "vllm")
QUANTIZE = {"merged": ("f32", "f16"), "gguf": ("f32", "f16", "q8_0", "q4_k_m"),
            "ollama": ("f32", "f16", "q8_0", "q4_k_m"), "vllm": ()}
WRITERS = {"merged": write_merged, "gguf": write_gguf_target, "vllm": write_vllm, "ollama": write_ollama}


class ExportResult(StrictModel):
    """What `export_specialist` wrote and what to run next."""

    name: str
    version: int
    target: str
    out_dir: str
    files: list[str]
    quantize: str | None
    parity: ParityReport
    commands: list[str]
    adapter_parity: ParityReport | None = None  # gguf: the base GGUF + GGUF LoRA adapter in llama.cpp
    served_by: str | None = None
    seconds: float


def export_specialist(name: str, to: str, *, out: Path | None = None, quantize: str | None = None,
                      version: int | None = None, registry: Registry | None = None,
                      create: bool | None = None, serve: bool = False,
                      reachable: Callable[[str], bool] = ollama_reachable) -> ExportResult:
    """Export specialist `name` (active version unless `version`) to `to`; see the package docstring.

    create: ollama only: create the model in the Ollama server and register `served_by`
            (None: when `reachable` finds a server at OLLAMA_HOST or 127.0.0.1:11434).
    serve:  gguf only: register a version served by llama.cpp from this export (`served_by: llamacpp:OUT_DIR`).
    """
    started = time.perf_counter()
    registry = registry or Registry()
    record = registry.get(name, version)
    check_options(record, to, quantize)
    if serve and to != "gguf":
        raise AtelierError(f"--serve registers a specialist served by llama.cpp and applies to --to gguf, not --to {to}"
                           + ("; for Ollama use --create" if to == "ollama" else ""))
    out_dir = Path(out) if out else atelier_home() / "exports" / f"{name}-v{record.version}-{to}"
    check_replaceable(out_dir)
    model, tokenizer = load_specialist(record)
    probes = reference_probes(model, tokenizer, held_out_conversations(record))
    with atomic_dir(out_dir) as tmp:
        staged = WRITERS[to](record, model, tokenizer, probes, tmp, quantize, out_dir)
        atomic_write_text(tmp / "README.md", model_card(record, to, staged))
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file()) + [MANIFEST]
        result = ExportResult(name=name, version=record.version, target=to, out_dir=str(out_dir), files=files,
                              quantize=quantize, parity=staged.parity, commands=staged.commands,
                              adapter_parity=staged.adapter_parity, seconds=round(time.perf_counter() - started, 2))
        atomic_write_text(tmp / MANIFEST, json.dumps({**result.model_dump(mode="json"), **staged.details},
                                                     indent=2, default=str) + "\n")
    served_by = None
    if staged.ollama is not None:
        served_by = maybe_create_in_ollama(registry, record, out_dir, staged.ollama, create, reachable)
    if serve:
        served_by = f"llamacpp:{out_dir.resolve()}"
        register_served(registry, record, served_by)
    if served_by:
        result.served_by = served_by
        manifest = json.loads((out_dir / MANIFEST).read_text(encoding="utf-8"))
        atomic_write_text(out_dir / MANIFEST, json.dumps({**manifest, "served_by": served_by}, indent=2) + "\n")
    result.seconds = round(time.perf_counter() - started, 2)
    return result


def check_options(record: SpecialistRecord, to: str, quantize: str | None) -> None:
    """Fail on a bad target or quantization before anything is loaded."""
    if to not in TARGETS:
        raise AtelierError(f"unknown export target {to!r}; use --to {' | '.join(TARGETS)}")
    if quantize is not None and quantize not in QUANTIZE[to]:
        allowed = f"use one of {', '.join(QUANTIZE[to])}" if QUANTIZE[to] else "leave --quantize out"
        raise AtelierError(f"unsupported quantization {quantize!r} for --to {to}; {allowed}"
                           + ("" if to == "gguf" else " (quantized files: --to gguf)"))
    if to == "gguf":
        from transformers import AutoConfig

        from specialists.export import gguf_writer

        gguf_writer.check_quantization(quantize or "f16")
        gguf_writer.check_llama(AutoConfig.from_pretrained(weights_of(record), local_files_only=True))
    if to == "ollama" and quantize and ollama_base_tag(record):
        raise AtelierError(f"--quantize does not apply: the adapter goes on Ollama's own build of "
                           f"{ollama_base_tag(record)}; leave --quantize out")
    if to == "vllm" and record.full_model:
        raise AtelierError(f"specialist {record.name!r} is a full model, not an adapter; export --to merged "
                           "and serve that folder with `vllm serve DIR`")
