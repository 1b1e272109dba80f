"""A PEFT LoRA adapter as a GGUF LoRA adapter, the file llama.cpp loads beside its base GGUF.

What llama.cpp's `convert_lora_to_gguf.py` writes, for Llama models: `general.architecture`
of the base, `general.type = "adapter"`, `adapter.type = "lora"`, `adapter.lora.alpha`, and for
every adapted weight `W` of the base (by its GGUF name, e.g. `blk.0.attn_q.weight`) two tensors,
`blk.0.attn_q.weight.lora_a` (PEFT's lora_A, rank x in) and `.lora_b` (lora_B, out x rank).
llama.cpp adds `scale * alpha / rank * B @ A` to `W`'s product, rank being lora_b's inner size.

Two details follow the base's own conversion: lora_B of q_proj and k_proj gets the same row
permutation as the base's Q/K weights (see `gguf_writer.permute`), and when PEFT's scaling is not
a plain alpha / r (rsLoRA, per-module rank or alpha patterns) it is folded into lora_B and the
file's alpha is 0, which llama.cpp reads as "no further scaling".

Heavy imports (safetensors, gguf) happen inside the functions.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from atelier.errors import AtelierError

ADAPTER_HINT = ("export --to merged for a GGUF of the merged model instead, or convert the adapter with llama.cpp's "
                "convert_lora_to_gguf.py (https://github.com/ggml-org/llama.cpp)")


def _module_scaling(config: dict[str, Any], module: str, rank: int) -> float:
    """PEFT's scaling of one module: alpha / r (alpha / sqrt(r) with rsLoRA), per-module patterns applied."""
    alpha = float(config.get("lora_alpha", 8))
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.search(rf"(^|\.){re.escape(pattern)}$", module) or re.fullmatch(pattern, module):
            alpha = float(value)
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def write_lora_gguf(adapter_dir: Path, base_config: Any, path: Path, *, name: str) -> Path:
    """Write the PEFT adapter in `adapter_dir` (on a Llama base with `base_config`) to `path` as a GGUF adapter."""
    import gguf
    from safetensors.numpy import load_file

    from specialists.export.gguf_writer import check_llama, permute

    check_llama(base_config)
    adapter_dir = Path(adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora"):
        kind = "DoRA" if config.get("use_dora") else config["peft_type"]
        raise AtelierError(f"the adapter in {adapter_dir} is {kind}, "
                           f"not a plain LoRA, which llama.cpp's adapters cannot express: {ADAPTER_HINT}")
    if config.get("modules_to_save"):
        raise AtelierError(f"the adapter in {adapter_dir} trains whole modules ({config['modules_to_save']}), which a "
                           f"GGUF LoRA adapter cannot carry: {ADAPTER_HINT}")
    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    heads = base_config.num_attention_heads
    kv_heads = base_config.num_key_value_heads or heads
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, base_config.num_hidden_layers)
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, tensor in weights.items():
        match = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.default)?\.weight", key)
        if match is None:
            raise AtelierError(f"adapter tensor {key} is not a LoRA A/B matrix (embedding or bias adapters are not "
                               f"supported): {ADAPTER_HINT}")
        pairs.setdefault(match.group(1), {})[match.group(2)] = tensor.astype(np.float32)
    uniform = not (config.get("use_rslora") or config.get("rank_pattern") or config.get("alpha_pattern"))
    tied = bool(getattr(base_config, "tie_word_embeddings", False))
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_name(name)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(config.get("lora_alpha", 8)) if uniform else 0.0)
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise AtelierError(f"adapter module {module} has lora_{''.join(ab)} only; the adapter is incomplete")
        if tied and module.endswith("lm_head"):
            raise AtelierError(f"the adapter changes lm_head, which this base ties to its embeddings (llama.cpp "
                               f"ignores it there): {ADAPTER_HINT}")
        target = names.get_name(module + ".weight", try_suffixes=(".weight",))
        if target is None:
            raise AtelierError(f"no GGUF name for adapted module {module}: {ADAPTER_HINT}")
        a, b = ab["A"], ab["B"]
        if not uniform:
            b = b * _module_scaling(config, module, a.shape[0])
        if module.endswith("q_proj"):
            b = permute(b, heads)
        elif module.endswith("k_proj"):
            b = permute(b, kv_heads)
        writer.add_tensor(target + ".lora_a", np.ascontiguousarray(a))
        writer.add_tensor(target + ".lora_b", np.ascontiguousarray(b))
    if not pairs:
        raise AtelierError(f"the adapter in {adapter_dir} holds no LoRA tensors")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def read_adapter_metadata(path: Path) -> dict[str, Any]:
    """general.architecture/type, adapter.type/lora.alpha and the tensor names of a GGUF adapter."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))

    def value(key: str) -> Any:
        field = reader.fields.get(key)
        if field is None:
            return None
        part = field.parts[field.data[0]]
        return bytes(part).decode() if part.dtype == np.uint8 else part.tolist()[0]

    return {"general.architecture": value("general.architecture"), "general.type": value("general.type"),
            "adapter.type": value("adapter.type"), "adapter.lora.alpha": value("adapter.lora.alpha"),
            "tensors": {t.name: [int(d) for d in t.shape] for t in reader.tensors}}
