"""GGUF for llama.cpp and Ollama, written with the `gguf` package and read back with its reader.

`write_gguf` does for a merged Llama what llama.cpp's `convert_hf_to_gguf.py` does: the standard
tensor names (through gguf's own TensorNameMap), the metadata keys llama.cpp reads, the byte-level
BPE vocabulary ("gpt2" model, with token types and merges), and the Q/K row permutation. That
permutation exists because llama.cpp's LLAMA rope rotates adjacent pairs (x[2i], x[2i+1]) while
transformers rotates halves (x[i], x[i + d/2]); reordering each head's rows makes both equal.

The byte-level pre-tokenizer is written under llama.cpp's name for it, "gpt-2" (llama.cpp refuses
"gpt2"). Whether the file is right is judged by llama.cpp itself: the export's parity check runs it
in the embedded llama.cpp server (`parity.check_parity_in_llamacpp`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from atelier.errors import AtelierError

log = logging.getLogger(__name__)

# --quantize value -> (GGML tensor type name for 2-D weights, llama.cpp file type number)
GGUF_QUANTS = {"f32": ("F32", 0), "f16": ("F16", 1), "q8_0": ("Q8_0", 7), "q4_k_m": ("Q4_K", 15)}
# The GPT-2 pre-tokenizer regex is ByteLevel's own; Llama 3's is a Split in front of it.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
CONTROL, NORMAL, USER_DEFINED, UNUSED = 3, 1, 4, 5  # gguf.TokenType values
CONVERT_HINT = ("export --to merged and convert that folder with llama.cpp's convert_hf_to_gguf.py "
                "(https://github.com/ggml-org/llama.cpp)")


def check_quantization(quantize: str) -> Any:
    """The GGMLQuantizationType for a --quantize value, or an error naming the tool that can make it."""
    from gguf import GGMLQuantizationType, quants

    if quantize not in GGUF_QUANTS:
        raise AtelierError(f"unsupported quantization {quantize!r} for gguf; use one of {', '.join(GGUF_QUANTS)}")
    qtype = GGMLQuantizationType[GGUF_QUANTS[quantize][0]]
    try:
        quants.quantize(np.zeros((1, 256), dtype=np.float32), qtype)
    except NotImplementedError:
        raise AtelierError(f"the gguf Python package cannot produce {quantize} ({qtype.name}) yet; export "
                           f"--quantize f16, then run llama.cpp's quantizer: `llama-quantize MODEL-f16.gguf "
                           f"MODEL-{quantize}.gguf {quantize.upper()}`") from None
    return qtype


def check_llama(config: Any) -> None:
    """Refuse what this writer does not convert, before any work is done."""
    if getattr(config, "model_type", None) != "llama":
        raise AtelierError(f"GGUF export supports Llama models (scratch:* bases among them); this one is a "
                           f"{getattr(config, 'model_type', '?')} model: {CONVERT_HINT}")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise AtelierError(f"GGUF export does not handle {rope.get('rope_type')} rope scaling yet: {CONVERT_HINT}")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise AtelierError(f"GGUF export does not handle Llama models with bias terms: {CONVERT_HINT}")


def permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf `LlamaModel.permute` of Q (n_head) or K (n_kv_head) rows."""
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def gguf_chat_template(template: str) -> str:
    """The chat template without transformers' {% generation %} markers (training-only; llama.cpp's
    Jinja engine does not know the tag, and rendering is the same without it)."""
    import re

    return re.sub(r"{%-?\s*(?:end)?generation\s*-?%}", "", template)


# ----------------------------------------------------------------------------- writing


def write_gguf(model: Any, tokenizer: Any, path: Path, quantize: str, *, name: str) -> Path:
    """Write the (merged, plain transformers) Llama `model` with its tokenizer to `path`."""
    import gguf

    config = model.config
    check_llama(config)
    qtype = check_quantization(quantize)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_type("model")
    writer.add_name(name)
    writer.add_file_type(GGUF_QUANTS[quantize][1])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float((config.rope_parameters or {}).get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    _add_vocab(writer, tokenizer, config.vocab_size)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reads token_embd when there is no output tensor, as convert_hf_to_gguf writes it
        new_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new_name is None:
            raise AtelierError(f"no GGUF name for tensor {hf_name}: {CONVERT_HINT}")
        data = tensor.detach().float().cpu().numpy()
        if hf_name.endswith("q_proj.weight"):
            data = permute(data, heads)
        elif hf_name.endswith("k_proj.weight"):
            data = permute(data, kv_heads)
        _add_tensor(writer, new_name, data, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_tensor(writer: Any, name: str, data: np.ndarray, qtype: Any) -> None:
    """Norms and other 1-D tensors stay F32; 2-D weights take `qtype`, F16 when rows do not fit its blocks."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

    if data.ndim < 2 or qtype == GGMLQuantizationType.F32:
        writer.add_tensor(name, data.astype(np.float32))
        return
    if data.shape[-1] % GGML_QUANT_SIZES[qtype][0] != 0:
        qtype = GGMLQuantizationType.F16  # llama.cpp's converter falls back the same way
    packed = quants.quantize(data, qtype)
    writer.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=qtype)


def _add_vocab(writer: Any, tokenizer: Any, vocab_size: int) -> None:
    """tokenizer.ggml.*: the byte-level BPE vocabulary as convert_hf_to_gguf's `_set_vocab_gpt2` writes it."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str()) if getattr(tokenizer, "is_fast", False) else {}
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise AtelierError(f"GGUF export writes byte-level BPE tokenizers; this one is not: {CONVERT_HINT}")
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    if max(reverse) >= vocab_size:
        raise AtelierError(f"the tokenizer has ids up to {max(reverse)} but the model only {vocab_size} embeddings")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        else:
            tokens.append(reverse[i])
            types.append((CONTROL if added[i].special else USER_DEFINED) if i in added else NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(spec.get("pre_tokenizer") or {}))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])])
    for key, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                     ("pad_token_id", writer.add_pad_token_id)):
        if getattr(tokenizer, key, None) is not None:
            add(getattr(tokenizer, key))
    plain, special = tokenizer("a", add_special_tokens=False)["input_ids"], tokenizer("a")["input_ids"]
    writer.add_add_bos_token(len(special) > len(plain) and special[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(False)
    if tokenizer.chat_template:
        writer.add_chat_template(gguf_chat_template(tokenizer.chat_template))


def _pre_tokenizer(pre: dict) -> str:
    """llama.cpp's name for the pre-tokenizer: "gpt-2" (ByteLevel's regex) or "llama-bpe" (Llama 3)."""
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    parts = pre.get("pretokenizers", [])
    if (pre.get("type") == "Sequence" and len(parts) == 2 and parts[0].get("type") == "Split"
            and parts[0].get("pattern", {}).get("Regex") == LLAMA3_SPLIT and parts[1].get("type") == "ByteLevel"):
        return "llama-bpe"
    raise AtelierError(f"GGUF export knows the GPT-2 and Llama 3 pre-tokenizers, not this one: {CONVERT_HINT}")


# ----------------------------------------------------------------------------- reading back


def file_precision(path: Path) -> str:
    """A GGUF model's precision as the parity tolerances name it: f32, f16, bf16, q8_0, or "quantized"
    (4-6-bit files such as Q4_1 or Q4_K_M, whose matmuls llama.cpp runs on 8-bit activations)."""
    from gguf import GGUFReader, LlamaFileType

    field = GGUFReader(str(path)).fields.get("general.file_type")
    if field is None:
        return "quantized"
    kind = LlamaFileType(int(field.parts[field.data[0]][0])).name
    return {"ALL_F32": "f32", "MOSTLY_F16": "f16", "MOSTLY_BF16": "bf16", "MOSTLY_Q8_0": "q8_0"}.get(kind, "quantized")



class GgufFile:
    """A GGUF file opened with gguf.GGUFReader: metadata values and tensors by name."""

    def __init__(self, path: Path):
        from gguf import GGUFReader

        try:
            self.reader = GGUFReader(str(path))
        except (ValueError, OSError) as exc:
            raise AtelierError(f"{path} is not a readable GGUF file ({exc}); export again") from None
        self.path = Path(path)
        self.tensors = {t.name: t for t in self.reader.tensors}

    def value(self, key: str, default: Any = None) -> Any:
        field = self.reader.get_field(key)
        return default if field is None else field.contents()

    def weight(self, name: str) -> np.ndarray:
        """Tensor `name` as float32 in transformers' (rows, columns) layout, dequantized."""
        from gguf import quants

        tensor = self.tensors[name]
        return np.asarray(quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)

    def summary(self) -> dict[str, Any]:
        """What export.json records: metadata (no vocabulary) and each tensor's type and shape."""
        skip = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.chat_template")
        meta = {k: self.value(k) for k in self.reader.fields if not k.startswith("GGUF.") and k not in skip}
        return {"metadata": meta, "tensors": {n: {"type": t.tensor_type.name, "shape": [int(d) for d in t.shape]}
                                              for n, t in self.tensors.items()}}


def check_gguf(path: Path, config: Any, vocab: int) -> GgufFile:
    """Read the file back and check its metadata and tensor set against the model it came from."""
    gf = GgufFile(path)
    expect = {"general.architecture": "llama", "llama.block_count": config.num_hidden_layers,
              "llama.embedding_length": config.hidden_size, "llama.context_length": config.max_position_embeddings,
              "llama.attention.head_count": config.num_attention_heads, "tokenizer.ggml.model": "gpt2"}
    wrong = {k: (v, gf.value(k)) for k, v in expect.items() if gf.value(k) != v}
    if len(gf.value("tokenizer.ggml.tokens", [])) != vocab:
        wrong["tokenizer.ggml.tokens"] = (vocab, len(gf.value("tokenizer.ggml.tokens", [])))
    wanted = {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{part}.weight" for i in range(config.num_hidden_layers) for part in
        ("attn_q", "attn_k", "attn_v", "attn_output", "attn_norm", "ffn_gate", "ffn_up", "ffn_down", "ffn_norm")}
    if not getattr(config, "tie_word_embeddings", False):
        wanted.add("output.weight")
    missing = sorted(wanted - set(gf.tensors))
    if wrong or missing:
        raise AtelierError(f"{path} read back wrong: metadata (expected, found) {wrong or 'ok'}; "
                           f"missing tensors {missing or 'none'}; export again")
    return gf


def check_tokenizer(path: Path, encoded: dict[str, list[int]]) -> None:
    """Rebuild the tokenizer from the file's tokens and merges (transformers' GGUF reader, which reads
    llama.cpp's files) and check it encodes each text to the same ids as the original tokenizer."""
    from transformers import AutoTokenizer

    try:
        rebuilt = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    except Exception as exc:
        raise AtelierError(f"the vocabulary in {path.name} cannot be read back ({exc}): {CONVERT_HINT}") from None
    for text, ids in encoded.items():
        got = rebuilt(text, add_special_tokens=False)["input_ids"]
        if got[-len(ids):] != ids:
            raise AtelierError(f"the vocabulary in {path.name} tokenizes {text[:60]!r} differently from the "
                               f"original tokenizer ({got[:12]}... vs {ids[:12]}...): {CONVERT_HINT}")
