"""`--to merged`: the adapter merged into its base, saved as safetensors with the tokenizer, reloaded and checked."""

from __future__ import annotations

from pathlib import Path

from specialists.export.common import FP32, Staged, weights_of
from specialists.export.parity import check_parity, torch_logits
from specialists.loading import load_model, merge_adapter
from specialists.registry import SpecialistRecord


def write_merged(record, model, tokenizer, probes, folder: Path, quantize: str | None, out_dir: Path) -> Staged:
    """merge_and_unload, save safetensors + tokenizer (chat_template.jinja), reload with transformers, compare."""
    import torch

    merged = merge_adapter(model)
    precision = quantize or {"float16": "f16", "bfloat16": "bf16"}.get(source_dtype(record), "f32")
    merged.to({"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32}[precision]).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    reloaded = load_model(folder, **FP32)
    parity = check_parity(probes, torch_logits(reloaded), precision, "merged model", tokenizer)
    run = (f"python -c \"from transformers import pipeline; print(pipeline('text-generation', '{out_dir}')"
           "([{'role': 'user', 'content': 'Hello'}]))\"")
    return Staged(parity, [run], card={"library_name": "transformers", "tags": ["merged"]})


def source_dtype(record: SpecialistRecord) -> str:
    """The dtype the base (or full model) is stored in, as 'float32', 'bfloat16', ..."""
    from transformers import AutoConfig

    dtype = getattr(AutoConfig.from_pretrained(weights_of(record), local_files_only=True), "dtype", None)
    return str(dtype).removeprefix("torch.")
