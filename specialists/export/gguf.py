"""`--to gguf`: one GGUF file of the merged model for llama.cpp, and for an adapter specialist its LoRA adapter
as a GGUF LoRA adapter beside a base GGUF; each is run in llama.cpp itself by the parity check."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from specialists.export.common import FP32, Staged
from specialists.export.parity import check_parity_in_llamacpp
from specialists.loading import base_marker, load_model, merge_adapter
from specialists.registry import SpecialistRecord, check_adapter_files, sha256_file

log = logging.getLogger("specialists.export")  # the export's one log


def write_gguf_target(record, model, tokenizer, probes, folder: Path, quantize: str | None, out_dir: Path,
                      *, with_adapter: bool = True) -> Staged:
    """One GGUF file of the merged model, read back with GGUFReader and run in llama.cpp itself; for an
    adapter specialist also (with_adapter) the adapter as a GGUF LoRA adapter, run in llama.cpp on its base GGUF."""
    from specialists.export import gguf_writer

    quantize = quantize or "f16"
    adapter_dir = None if record.full_model or not with_adapter else check_adapter_files(record)
    merged = merge_adapter(model)
    path = folder / f"{record.name}-v{record.version}-{quantize}.gguf"
    gguf_writer.write_gguf(merged, tokenizer, path, quantize, name=f"{record.name}-v{record.version}")
    gf = gguf_writer.check_gguf(path, merged.config, merged.config.vocab_size)
    gguf_writer.check_tokenizer(path, {p.text: p.prompt_ids for p in probes})
    parity = check_parity_in_llamacpp(probes, path, quantize, "GGUF file", tokenizer)
    final = out_dir / path.name
    commands = [f"llama-cli -m {final} -cnv", f"llama-server -m {final} --port 8080 --jinja"]
    details: dict[str, Any] = {"gguf": gf.summary()}
    adapter_parity = None
    if adapter_dir is not None:
        from specialists.export.gguf_lora import write_lora_gguf

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
    from specialists.export import gguf_writer

    original = _original_gguf(Path(record.base_model))
    if original is not None:
        return original, gguf_writer.file_precision(original), False
    path = folder / f"base-{quantize}.gguf"
    base = load_model(record.base_model, **FP32)
    gguf_writer.write_gguf(base, tokenizer, path, quantize, name=f"{Path(record.base_model).name}-base")
    return path, quantize, True


def _original_gguf(base: Path) -> Path | None:
    """The GGUF a converted base came from, when its marker names it and the file still has that SHA-256."""
    info = base_marker(base)
    source = Path(info.get("gguf") or "")
    if info.get("kind") != "gguf" or not source.is_file():
        return None
    if sha256_file(source) != info.get("gguf_sha256"):
        log.warning("%s changed since %s was converted from it; exporting the base instead", source, base)
        return None
    return source
