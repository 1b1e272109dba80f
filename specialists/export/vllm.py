"""`--to vllm`: the adapter laid out for `vllm serve --enable-lora --lora-modules`, with SERVE.md."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from atelier.errors import AtelierError
from atelier.home import atomic_write_text
from specialists.export.common import Staged, adapter_on_base, copy_adapter
from specialists.export.parity import check_parity, torch_logits
from specialists.loading import load_tokenizer
from specialists.registry import check_adapter_files

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's --max-lora-rank accepts


def write_vllm(record, model, tokenizer, probes, folder: Path, quantize: str | None, out_dir: Path) -> Staged:
    """The adapter with base_model_name_or_path set to what `vllm serve` is given, plus SERVE.md."""
    config = copy_adapter(record, folder)
    if config.get("modules_to_save"):
        raise AtelierError(f"the adapter of {record.name!r} trains whole modules ({config['modules_to_save']}), "
                           "which vLLM's LoRA support does not load; export --to merged and `vllm serve` that folder")
    _copy_tokenizer_if_changed(check_adapter_files(record), folder, tokenizer)
    parity = check_parity(probes, torch_logits(adapter_on_base(record, folder)), "f32", "vLLM adapter", tokenizer)
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


def _copy_tokenizer_if_changed(source: Path, folder: Path, base_tokenizer) -> None:
    """vLLM takes a LoRA's own tokenizer from its folder: copy it when it has a vocabulary the base lacks."""
    files = [p for p in source.iterdir() if p.name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                                                       "special_tokens_map.json")]
    if "tokenizer.json" in {p.name for p in files} and len(load_tokenizer(source)) != len(base_tokenizer):
        for path in files:
            shutil.copyfile(path, folder / path.name)
