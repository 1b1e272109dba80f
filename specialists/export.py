"""`atelier specialist export NAME --to merged|gguf|ollama|vllm`: ship a specialist where users run models.

    merged   the LoRA adapter merged into its base: safetensors, tokenizer, chat template, model card
    gguf     that merged model as one GGUF file for llama.cpp (f32, f16, q8_0; see gguf_export.py), and
             for an adapter specialist its LoRA adapter as a GGUF LoRA adapter (gguf_lora.py) beside a
             base GGUF: the original GGUF file when the base was converted from one, else the base
             exported at the same precision. With --serve, registered back as `served_by:
             llamacpp:OUT_DIR`, so llama.cpp in this process serves it (base + adapter, chosen per request)
    ollama   a Modelfile: FROM an Ollama library base + ADAPTER when Ollama knows the base, else FROM
             a GGUF (Llama) or the merged folder, with the chat template translated to Go syntax;
             created in a reachable Ollama server and registered back as `served_by: ollama:NAME`
    vllm     the adapter laid out for `vllm serve --enable-lora --lora-modules`, with SERVE.md

Nothing is written unless the artefact passes a parity check: its greedy continuations of a few
held-out prompts must be those of the adapter on its base. Each export is assembled in a hidden
temporary folder and renamed into place at the end, so a failure leaves no half-written output.
Heavy imports (torch, transformers, gguf) happen inside the functions: `atelier --help` stays light.

This module is the entry point, the merged/gguf/vllm writers and the output folder; the parity check
is in export_parity.py, the Ollama target in ollama_export.py, the README in model_card.py.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer

from atelier.config import StrictModel
from atelier.errors import AtelierError
from atelier.home import atelier_home, atomic_write_text
from specialists.export_parity import (  # noqa: F401  (re-exported: `from specialists.export import ...` keeps working)
    BUILTIN_PROMPTS,
    MAX_PROMPTS,
    NEW_TOKENS,
    TOLERANCES,
    LogitsFn,
    ParityReport,
    Probe,
    Tolerance,
    _attach,
    _weights_of,
    check_parity,
    check_parity_in_llamacpp,
    held_out_conversations,
    load_specialist,
    reference_probes,
    torch_logits,
)
from specialists.model_card import EXPORTED_AS, model_card  # noqa: F401
from specialists.ollama_export import (  # noqa: F401
    CHATML_GO_TEMPLATE,
    DEFAULT_OLLAMA_URL,
    OLLAMA_BASES,
    OllamaPlan,
    _maybe_create_in_ollama,
    create_in_ollama,
    ollama_base_tag,
    ollama_reachable,
    ollama_template,
    stop_strings,
    write_ollama,
)
from specialists.registry import Registry, SpecialistRecord, check_adapter_files

log = logging.getLogger(__name__)

TARGETS = ("merged", "gguf", "ollama", "vllm")
QUANTIZE = {"merged": ("f32", "f16"), "gguf": ("f32", "f16", "q8_0", "q4_k_m"),
            "ollama": ("f32", "f16", "q8_0", "q4_k_m"), "vllm": ()}
MANIFEST = "export.json"  # written last into every export folder; marks folders an export may replace
BASE_MARKER = "atelier-base.json"  # training.models writes it into every base it converts (GGUF source, SHA-256)
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's --max-lora-rank accepts


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


@dataclass
class Staged:
    """What a target writer produced in the staging folder."""

    parity: ParityReport
    commands: list[str] = field(default_factory=list)
    card: dict[str, Any] = field(default_factory=dict)  # library_name / tags for the model card
    ollama: OllamaPlan | None = None
    details: dict[str, Any] = field(default_factory=dict)
    adapter_parity: ParityReport | None = None


# ----------------------------------------------------------------------------- the entry point


def export_specialist(name: str, to: str, *, out: Path | None = None, quantize: str | None = None,
                      version: int | None = None, registry: Registry | None = None,
                      create: bool | None = None, serve: bool = False) -> ExportResult:
    """Export specialist `name` (active version unless `version`) to `to`; see the module docstring.

    create: ollama only: create the model in the Ollama server and register `served_by`
            (None: when a server answers at OLLAMA_HOST or 127.0.0.1:11434).
    serve:  gguf only: register a version served by llama.cpp from this export (`served_by: llamacpp:OUT_DIR`).
    """
    started = time.perf_counter()
    registry = registry or Registry()
    record = registry.get(name, version)
    _check_options(record, to, quantize)
    if serve and to != "gguf":
        raise AtelierError(f"--serve registers a specialist served by llama.cpp and applies to --to gguf, not --to {to}"
                           + ("; for Ollama use --create" if to == "ollama" else ""))
    out_dir = Path(out) if out else atelier_home() / "exports" / f"{name}-v{record.version}-{to}"
    _check_replaceable(out_dir)
    model, tokenizer = load_specialist(record)
    probes = reference_probes(model, tokenizer, held_out_conversations(record))
    with _staging(out_dir) as tmp:
        staged = WRITERS[to](record, model, tokenizer, probes, tmp, quantize, out_dir)
        atomic_write_text(tmp / "README.md", model_card(record, to, staged))
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file()) + [MANIFEST]
        result = ExportResult(name=name, version=record.version, target=to, out_dir=str(out_dir), files=files,
                              quantize=quantize, parity=staged.parity, commands=staged.commands,
                              adapter_parity=staged.adapter_parity, seconds=round(time.perf_counter() - started, 2))
        atomic_write_text(tmp / MANIFEST, json.dumps({**result.model_dump(mode="json"), **staged.details},
                                                     indent=2, default=str) + "\n")
    if staged.ollama is not None and (served_by := _maybe_create_in_ollama(registry, record, out_dir, staged.ollama,
                                                                           create)):
        result.served_by = served_by
        manifest = json.loads((out_dir / MANIFEST).read_text(encoding="utf-8"))
        atomic_write_text(out_dir / MANIFEST, json.dumps({**manifest, "served_by": served_by}, indent=2) + "\n")
    if serve:
        result.served_by = f"llamacpp:{out_dir.resolve()}"
        register_served(registry, record, result.served_by)
        manifest = json.loads((out_dir / MANIFEST).read_text(encoding="utf-8"))
        atomic_write_text(out_dir / MANIFEST, json.dumps({**manifest, "served_by": result.served_by}, indent=2) + "\n")
    result.seconds = round(time.perf_counter() - started, 2)
    return result


def register_served(registry: Registry, record: SpecialistRecord, served_by: str) -> SpecialistRecord:
    """A new version of `record`, the same in every respect but served by `served_by`."""
    return registry.register(record.name, base_model=record.base_model, eval_report=record.eval_report,
                             keywords=record.keywords, description=record.description,
                             adapter_dir=None if record.full_model else Path(record.adapter_path or ""),
                             model_dir=Path(record.model_path or "") if record.full_model else None,
                             data_manifest_hashes=record.data_manifest_hashes, config=record.config,
                             route_exemplars=record.route_exemplars, served_by=served_by, run_dir=record.run_dir,
                             force=record.forced)


def _check_options(record: SpecialistRecord, to: str, quantize: str | None) -> None:
    """Fail on a bad target or quantization before anything is loaded."""
    if to not in TARGETS:
        raise AtelierError(f"unknown export target {to!r}; use --to {' | '.join(TARGETS)}")
    if quantize is not None and quantize not in QUANTIZE[to]:
        allowed = f"use one of {', '.join(QUANTIZE[to])}" if QUANTIZE[to] else "leave --quantize out"
        raise AtelierError(f"unsupported quantization {quantize!r} for --to {to}; {allowed}"
                           + ("" if to == "gguf" else " (quantized files: --to gguf)"))
    if to == "gguf":
        from transformers import AutoConfig

        from specialists import gguf_export

        gguf_export.check_quantization(quantize or "f16")
        gguf_export.check_llama(AutoConfig.from_pretrained(_weights_of(record), local_files_only=True))
    if to == "ollama" and quantize and ollama_base_tag(record):
        raise AtelierError(f"--quantize does not apply: the adapter goes on Ollama's own build of "
                           f"{ollama_base_tag(record)}; leave --quantize out")
    if to == "vllm" and record.full_model:
        raise AtelierError(f"specialist {record.name!r} is a full model, not an adapter; export --to merged "
                           "and serve that folder with `vllm serve DIR`")


# ----------------------------------------------------------------------------- target writers


def write_merged(record, model, tokenizer, probes, folder: Path, quantize: str | None, out_dir: Path) -> Staged:
    """merge_and_unload, save safetensors + tokenizer (chat_template.jinja), reload with transformers, compare."""
    import torch
    from transformers import AutoModelForCausalLM

    merged = _merge(model)
    precision = quantize or {"float16": "f16", "bfloat16": "bf16"}.get(_source_dtype(record), "f32")
    merged.to({"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32}[precision]).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True).eval()
    parity = check_parity(probes, torch_logits(reloaded), precision, "merged model", tokenizer)
    run = (f"python -c \"from transformers import pipeline; print(pipeline('text-generation', '{out_dir}')"
           "([{'role': 'user', 'content': 'Hello'}]))\"")
    return Staged(parity, [run],
                  card={"library_name": "transformers", "tags": ["merged"]})


def write_gguf_target(record, model, tokenizer, probes, folder: Path, quantize: str | None, out_dir: Path,
                      *, with_adapter: bool = True) -> Staged:
    """One GGUF file of the merged model, read back with GGUFReader and run in llama.cpp itself; for an
    adapter specialist also (with_adapter) the adapter as a GGUF LoRA adapter, run in llama.cpp on its base GGUF."""
    from specialists import gguf_export

    quantize = quantize or "f16"
    adapter_dir = None if record.full_model or not with_adapter else check_adapter_files(record)
    merged = _merge(model)
    path = folder / f"{record.name}-v{record.version}-{quantize}.gguf"
    gguf_export.write_gguf(merged, tokenizer, path, quantize, name=f"{record.name}-v{record.version}")
    gf = gguf_export.check_gguf(path, merged.config, merged.config.vocab_size)
    gguf_export.check_tokenizer(path, {p.text: p.prompt_ids for p in probes})
    parity = check_parity_in_llamacpp(probes, path, quantize, "GGUF file", tokenizer)
    final = out_dir / path.name
    commands = [f"llama-cli -m {final} -cnv", f"llama-server -m {final} --port 8080 --jinja"]
    details: dict[str, Any] = {"gguf": gf.summary()}
    adapter_parity = None
    if adapter_dir is not None:
        from specialists.gguf_lora import write_lora_gguf

        lora = folder / f"{record.name}-v{record.version}-lora.gguf"
        write_lora_gguf(adapter_dir, merged.config, lora, name=f"{record.name}-v{record.version}-lora")
        base, base_precision, staged_base = base_gguf(record, tokenizer, folder, quantize)
        adapter_parity = check_parity_in_llamacpp(probes, base, base_precision, "base GGUF + GGUF LoRA adapter",
                                                  tokenizer, adapter=lora)
        base_final = out_dir / base.name if staged_base else base
        details["llamacpp"] = {"base": str(base_final), "adapter": str(out_dir / lora.name),
                               "base_precision": base_precision}
        commands.append(f"llama-server -m {base_final} --lora-init-without-apply --lora {out_dir / lora.name} "
                        "--port 8080 --jinja   # then per request: \"lora\": [{\"id\": 0, \"scale\": 1.0}]")
    return Staged(parity, commands, card={"tags": ["gguf", "llama.cpp"]}, details=details,
                  adapter_parity=adapter_parity)


def base_gguf(record: SpecialistRecord, tokenizer, folder: Path, quantize: str) -> tuple[Path, str, bool]:
    """(base GGUF, its precision, whether it was written into `folder`): the GGUF file the base was
    converted from (its atelier-base.json marker names it and its SHA-256), else the base exported."""
    import torch
    from transformers import AutoModelForCausalLM

    from specialists import gguf_export

    original = _original_gguf(Path(record.base_model))
    if original is not None:
        return original, gguf_export.file_precision(original), False
    path = folder / f"base-{quantize}.gguf"
    base = AutoModelForCausalLM.from_pretrained(record.base_model, dtype=torch.float32, use_safetensors=True,
                                                local_files_only=True).eval()
    gguf_export.write_gguf(base, tokenizer, path, quantize, name=f"{Path(record.base_model).name}-base")
    return path, quantize, True


def _original_gguf(base: Path) -> Path | None:
    """The GGUF a converted base came from, when its marker names it and the file still has that SHA-256."""
    from specialists.registry import sha256_file

    marker = base / BASE_MARKER
    try:
        info = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    source = Path(info.get("gguf") or "")
    if info.get("kind") != "gguf" or not source.is_file():
        return None
    if sha256_file(source) != info.get("gguf_sha256"):
        log.warning("%s changed since %s was converted from it; exporting the base instead", source, base)
        return None
    return source


def write_vllm(record, model, tokenizer, probes, folder: Path, quantize: str | None, out_dir: Path) -> Staged:
    """The adapter with base_model_name_or_path set to what `vllm serve` is given, plus SERVE.md."""
    config = _copy_adapter(record, folder)
    if config.get("modules_to_save"):
        raise AtelierError(f"the adapter of {record.name!r} trains whole modules ({config['modules_to_save']}), "
                           "which vLLM's LoRA support does not load; export --to merged and `vllm serve` that folder")
    _copy_tokenizer_if_changed(check_adapter_files(record), folder, tokenizer)
    parity = check_parity(probes, torch_logits(_adapter_on_base(record, folder)), "f32", "vLLM adapter", tokenizer)
    base = config["base_model_name_or_path"]
    rank = next((r for r in VLLM_RANKS if r >= int(config.get("r", 8))), VLLM_RANKS[-1])
    serve = (f"vllm serve {base} --enable-lora --lora-modules {record.name}={out_dir} --max-lora-rank {rank} "
             f"--max-model-len {model.config.max_position_embeddings}")
    load = (f"curl -X POST http://localhost:8000/v1/load_lora_adapter -H 'Content-Type: application/json' "
            f"-d '{json.dumps({'lora_name': record.name, 'lora_path': str(out_dir)})}'")
    atomic_write_text(folder / "SERVE.md", "\n".join([
        f"# Serving {record.name} v{record.version} with vLLM", "",
        "Start vLLM with the adapter:", "", "```bash", serve, "```", "",
        "or load it into a running server (started with `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True` and `--enable-lora`):",
        "", "```bash", load, "```", "",
        (f"Requests then name the model `{record.name}`. For Atelier's orchestrator to call it, register the "
         f"specialist with `served_by: openai:{record.name}@http://localhost:8000/v1`."), ""]))
    return Staged(parity, [serve, load], card={"library_name": "peft", "tags": ["lora", "vllm"]})


WRITERS = {"merged": write_merged, "gguf": write_gguf_target, "vllm": write_vllm, "ollama": write_ollama}


def _merge(model):
    """The plain transformers model with the adapter folded into its weights (a full model as it is)."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def _source_dtype(record: SpecialistRecord) -> str:
    """The dtype the base (or full model) is stored in, as 'float32', 'bfloat16', ..."""
    from transformers import AutoConfig

    dtype = getattr(AutoConfig.from_pretrained(_weights_of(record), local_files_only=True), "dtype", None)
    return str(dtype).removeprefix("torch.")


def _copy_adapter(record: SpecialistRecord, folder: Path) -> dict[str, Any]:
    """The registered adapter's files (safetensors only) in `folder`, its config pointing at the base."""
    source = check_adapter_files(record)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source / "adapter_model.safetensors", folder / "adapter_model.safetensors")
    config = json.loads((source / "adapter_config.json").read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = hub_id(record.base_model) or record.base_model
    atomic_write_text(folder / "adapter_config.json", json.dumps(config, indent=2) + "\n")
    return config


def _copy_tokenizer_if_changed(source: Path, folder: Path, base_tokenizer) -> None:
    """vLLM takes a LoRA's own tokenizer from its folder: copy it when it has a vocabulary the base lacks."""
    files = [p for p in source.iterdir() if p.name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                                                       "special_tokens_map.json")]
    if files and "tokenizer.json" in {p.name for p in files}:
        from transformers import AutoTokenizer

        if len(AutoTokenizer.from_pretrained(source, local_files_only=True)) != len(base_tokenizer):
            for path in files:
                shutil.copyfile(path, folder / path.name)


def _adapter_on_base(record: SpecialistRecord, adapter: Path):
    """A fresh base with the exported adapter files attached: what vLLM / Ollama will be given."""
    import torch
    from transformers import AutoModelForCausalLM

    return _attach(AutoModelForCausalLM.from_pretrained(record.base_model, dtype=torch.float32, use_safetensors=True,
                                                        local_files_only=True), adapter)


def hub_id(base_model: str) -> str | None:
    """The Hugging Face id of a base: from a hub cache path (models--ORG--NAME/snapshots/...) or an id itself."""
    match = re.search(r"models--([^/]+?)--([^/]+)/snapshots/", base_model)
    if match:
        return f"{match.group(1)}/{match.group(2)}"
    if not Path(base_model).exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", base_model):
        return base_model
    return None


# ----------------------------------------------------------------------------- output folder


def _check_replaceable(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / MANIFEST).is_file())):
        raise AtelierError(f"{out_dir} already holds files that no export wrote; choose another --out")


@contextmanager
def _staging(out_dir: Path) -> Iterator[Path]:
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
    umask = _umask()
    for path in [folder, *folder.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _umask() -> int:
    """The process umask, read without os.umask(), which would briefly change it for every thread."""
    try:
        status = Path("/proc/self/status").read_text(encoding="utf-8")
        return int(re.search(r"^Umask:\s*([0-7]+)", status, re.MULTILINE).group(1), 8)
    except (OSError, AttributeError):
        return 0o022


# ----------------------------------------------------------------------------- CLI


def register_export(app: typer.Typer) -> None:
    """Add `export` to the `atelier specialist` group."""
    app.command("export")(export_command)


def export_command(
    name: str = typer.Argument(..., help="Specialist to export (its active version unless --version)."),
    to: str = typer.Option(..., "--to", help="merged | gguf | ollama | vllm."),
    out: str | None = typer.Option(None, "--out", help="Output folder (default: ATELIER_HOME/exports/NAME-vN-TARGET)."),
    quantize: str | None = typer.Option(None, "--quantize", help="f32 | f16 | q8_0 | q4_k_m (gguf, ollama); f32 | f16 "
                                        "(merged). Default: f16 for GGUF, the base's dtype for merged."),
    version: int | None = typer.Option(None, "--version", min=1, help="Export this version, not the active one."),
    create: bool | None = typer.Option(None, "--create/--no-create", help="ollama: create the model in Ollama and "
                                       "register served_by (default: when a server answers at OLLAMA_HOST or 127.0.0.1:11434)."),
    serve: bool = typer.Option(False, "--serve", help="gguf: register a version served by llama.cpp in-process from "
                               "this export (base GGUF + GGUF LoRA adapter): served_by llamacpp:OUT_DIR."),
) -> None:
    """Export a specialist as merged weights, GGUF, an Ollama Modelfile or a vLLM LoRA adapter, parity-checked."""
    result = export_specialist(name, to, out=Path(out) if out else None, quantize=quantize, version=version,
                               create=create, serve=serve)
    parity = result.parity
    typer.echo(f"exported {result.name} v{result.version} to {result.target} in {result.seconds:.1f} s: {result.out_dir}")
    for path in result.files:
        typer.echo(f"  {path}")
    typer.echo(f"parity: {parity.prompts} prompts, {parity.tokens} greedy tokens matched; max logit drift "
               f"{parity.max_drift_sigma:.2g}σ ({parity.precision})")
    if (adapter := result.adapter_parity) is not None:
        typer.echo(f"adapter parity: {adapter.prompts} prompts, {adapter.tokens} greedy tokens matched; max drift "
                   f"{adapter.max_drift_sigma:.2g}σ (base {adapter.precision}, GGUF LoRA adapter in llama.cpp)")
    if result.served_by:
        where = "created in Ollama" if result.served_by.startswith("ollama:") else "registered for llama.cpp"
        typer.echo(f"{where}; {result.name} is now served_by {result.served_by}")
    typer.echo("next:" if not result.served_by else "try:")
    for command in result.commands:
        typer.echo(f"  {command}")
