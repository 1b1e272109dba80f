"""Base models for specialists: a Hugging Face causal LM, or a tiny Llama built from scratch.

`resolve_base` turns the `--base` string into a local directory holding a causal LM and a
tokenizer with a chat template. Two kinds of base:

* any Hugging Face causal LM id or local path. A hub id is the one place Atelier downloads
  weights; it is logged, and offline it fails with a message naming the way out.
* a GGUF model: `smollm2-135m` and `gemma3-270m` (installed from the package registry,
  see `atelier.catalog`), any `.gguf` file, or a folder holding one. It is dequantised once
  into an fp32 safetensors folder under `ATELIER_HOME/bases/`, content-addressed by the
  file's SHA-256, and reused afterwards.
* `scratch:tiny` / `scratch:small`: a randomly initialised Llama with a byte-level BPE
  tokenizer trained on the domain documents plus a small general-English corpus shipped in
  `resources/general_en.txt`. It lets the whole pipeline run on a laptop CPU in minutes, and
  its DAPT stage *is* pretraining from scratch on the domain.

Scratch bases are deterministic for the same texts and seed, and a fingerprint file lets a
re-run reuse the directory instead of rebuilding it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from atelier.errors import AtelierError
from atelier.home import atomic_dir, atomic_write_text
from specialists.loading import BASE_MARKER, base_marker, load_gguf, load_model, pick_device
from specialists.registry import sha256_file

log = logging.getLogger(__name__)

GENERAL_CORPUS = Path(__file__).parent / "resources" / "general_en.txt"
_BUILD_VERSION = 1  # bump when the scratch recipe changes, so old bases are rebuilt

# ChatML-style turns. The assistant's content *and* its end-of-turn token sit inside
# {% generation %} markers: TRL's assistant_only_loss then trains the model to stop.
SCRATCH_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>")
SCRATCH_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{%- else -%}"
    "{{ message['content'] + '<|im_end|>' + '\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)

# For Hugging Face tokenizers that ship no template: plain-text role headers, so no new
# tokens (and no embedding resize) are needed; the model's own eos ends each answer.
PLAIN_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '### ' + message['role'] | capitalize + ':\n' }}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\n\n' }}"
    "{%- else -%}"
    "{{ message['content'] + '\n\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '### Assistant:\n' }}{%- endif -%}"
)


def default_chat_template(tokenizer) -> str:
    """The template given to a base that ships none (a pretrained model such as Gemma 3 270M):
    `PLAIN_CHAT_TEMPLATE`'s plain-text role headers, which a pretrained model reads as text,
    led by the bos token when the tokenizer puts one before every text (Gemma does; the
    model is much worse without it)."""
    ids = tokenizer("x")["input_ids"]
    leads_with_bos = tokenizer.bos_token_id is not None and bool(ids) and ids[0] == tokenizer.bos_token_id
    return ("{{ bos_token }}" if leads_with_bos else "") + PLAIN_CHAT_TEMPLATE


@dataclass(frozen=True)
class ScratchSpec:
    """Shape of a from-scratch Llama. Tiny trains in minutes on 2 CPU cores."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int


SCRATCH_SPECS = {
    # ~1.4 M parameters (embeddings tied with the LM head).
    "tiny": ScratchSpec(128, 4, 4, 384, 4096, 512),
    # ~14 M parameters.
    "small": ScratchSpec(384, 6, 6, 1024, 8192, 512),
}


# ---------------------------------------------------------------- hardware


def precision_kwargs() -> dict[str, bool]:
    """Mixed-precision flags for TrainingArguments, always explicit.

    TRL configs default to bf16=True, and on a CPU without native bf16 that made training
    ~4x slower, so bf16 is only on for CUDA devices that support it; fp16 only on older CUDA
    GPUs and never on CPU. On CPU `use_cpu=True` also stops accelerate probing for devices.
    """
    import torch

    kind = pick_device()
    if kind.startswith("cuda"):
        bf16 = torch.cuda.is_bf16_supported()
        return {"bf16": bf16, "fp16": not bf16}
    if kind == "mps":
        return {"bf16": False, "fp16": False}
    return {"bf16": False, "fp16": False, "use_cpu": True}


# ---------------------------------------------------------------- resolving a base


def resolve_base(name: str, *, work_dir: Path, corpus_texts: list[str] | None, seed: int) -> Path:
    """A local directory with a causal LM and a tokenizer that has a chat template.

    `name` is one of: a catalogue name (`smollm2-135m`, `gemma3-270m`: GGUF files installed
    from the package registry), a `.gguf` file or a folder holding one, a Hugging Face model
    folder or hub id, or `scratch:tiny` / `scratch:small`.

    `work_dir` is where a base is written when one has to be built (scratch bases, or a
    copy of a Hugging Face model whose tokenizer lacks a chat template); a Hugging Face
    model that is usable as is is returned where it lies. GGUF bases are converted once into
    `ATELIER_HOME/bases/gguf-<sha256>/` and reused from there by every run.
    """
    work_dir = Path(work_dir)
    if name.startswith("scratch:"):
        size = name.split(":", 1)[1]
        if size not in SCRATCH_SPECS:
            raise AtelierError(f"unknown base {name!r}; use one of {', '.join('scratch:' + s for s in SCRATCH_SPECS)}")
        return build_scratch_base(size, work_dir=work_dir, corpus_texts=corpus_texts or [], seed=seed)
    gguf = gguf_source(name)
    if gguf is not None:
        return convert_gguf(gguf, name)
    path = _local_or_downloaded(name)
    _check_causal_lm(path, name)
    return _with_chat_template(path, name, work_dir)


def gguf_source(name: str) -> Path | None:
    """The GGUF file `name` stands for (a catalogue name, a .gguf file, a folder with one and no
    config.json), or None when `name` is something else."""
    from atelier.catalog import catalog_gguf, is_catalog_name

    if is_catalog_name(name):
        return catalog_gguf(name)
    local = Path(name).expanduser()
    if local.is_file() and local.suffix.lower() == ".gguf":
        return local.resolve()
    if local.is_dir() and not (local / "config.json").is_file():
        found = sorted(local.glob("*.gguf"))
        if len(found) > 1:
            raise AtelierError(f"base {name} holds {len(found)} .gguf files ({', '.join(p.name for p in found)}); "
                               "pass the one to use")
        if found:
            return found[0].resolve()
    return None


def convert_gguf(gguf: Path, name: str) -> Path:
    """Dequantise a GGUF model once into an fp32 safetensors folder under ATELIER_HOME/bases/.

    transformers loads GGUF files but refuses to save them ("quantized with gguf"), so the
    weights are moved into a model built from the same config without the quantization
    entry. The folder is named by the GGUF's SHA-256, carries the tokenizer and a chat
    template (the file's own, or `PLAIN_CHAT_TEMPLATE` for a pretrained model that has none),
    and is written to a temporary sibling first: a killed conversion never looks complete.
    """
    from filelock import FileLock

    from atelier.home import atelier_home

    digest = sha256_file(gguf)
    target = atelier_home() / "bases" / f"gguf-{digest[:16]}"
    fingerprint = _hash_json({"gguf": digest, "version": _GGUF_CONVERSION_VERSION})
    target.parent.mkdir(parents=True, exist_ok=True)
    # two runs converting the same base at once: the second waits and reuses the first's folder
    with FileLock(target.parent / f".{target.name}.lock"):
        return _convert_locked(gguf, name, target, digest, fingerprint)


def _convert_locked(gguf: Path, name: str, target: Path, digest: str, fingerprint: str) -> Path:
    if _marker_matches(target, fingerprint):
        log.debug("reusing converted base %s in %s", name, target)
        return target
    log.info("converting %s (%s) to safetensors in %s, once", name, gguf.name, target)
    try:
        model, tokenizer = load_gguf(gguf)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise AtelierError(f"base {name}: transformers cannot load {gguf} ({exc}); check that the file is a "
                           "complete GGUF of a supported architecture (llama, gemma3, qwen2, mistral, phi3, ...)"
                           ) from None
    if not tokenizer.chat_template:
        tokenizer.chat_template = default_chat_template(tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return _save_base(target, model, tokenizer, {"name": name, "kind": "gguf", "fingerprint": fingerprint,
                                                  "gguf": str(gguf), "gguf_sha256": digest,
                                                  "parameters": model.num_parameters()})


_GGUF_CONVERSION_VERSION = 2  # 2: bos-led default template


def _local_or_downloaded(name: str) -> Path:
    local = Path(name).expanduser()
    if local.exists():
        if not local.is_dir():
            raise AtelierError(f"base {name} is a file but not a .gguf; pass a .gguf file or a model "
                               "directory (with config.json)")
        return local.resolve()
    if name.startswith(("/", ".", "~")) or name.count("/") != 1:
        raise AtelierError(f"base {name} does not exist; pass a model directory, a Hugging Face id "
                           "such as Qwen/Qwen2.5-0.5B-Instruct, or scratch:tiny")
    return download_base(name)


def download_base(repo_id: str) -> Path:
    """Fetch a model from the Hugging Face hub (cache first). The only download Atelier makes."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    unreachable = (f"base {repo_id} not found locally and the hub is unreachable; "
                   "pass a local path or scratch:tiny")
    if _hub_offline():
        raise AtelierError(unreachable + " (HF_HUB_OFFLINE is set)")
    log.warning("downloading base model %s from the Hugging Face hub", repo_id)
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except GatedRepoError:
        raise AtelierError(f"base {repo_id} is gated on the hub; accept its licence and log in "
                           "with `hf auth login`, or pass a local path") from None
    except RepositoryNotFoundError:
        raise AtelierError(f"no model {repo_id} on the Hugging Face hub; check the id, or pass a local path") from None
    except Exception as exc:  # network errors come in many types; all mean the same to the user
        log.debug("hub download failed", exc_info=True)
        raise AtelierError(f"{unreachable} ({type(exc).__name__})") from None


def _hub_offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    return flag or bool(constants.HF_HUB_OFFLINE)


def _check_causal_lm(path: Path, name: str) -> None:
    """Fail with a clear message unless `path` holds a config of a causal-LM architecture."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if not (path / "config.json").is_file():
        raise AtelierError(f"base {name} has no config.json and no .gguf file; pass a Hugging Face model directory, "
                           "a .gguf file, smollm2-135m or scratch:tiny")
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as exc:
        raise AtelierError(f"base {name}: cannot read its config.json ({exc})") from None
    heads = config.architectures or []
    generative = not heads or any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in heads)
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or not generative:
        kind = heads[0] if heads else config.model_type
        raise AtelierError(f"base {name} is a {kind} model, not a causal language model; "
                           "pass a decoder model such as Qwen/Qwen2.5-0.5B-Instruct, or scratch:tiny")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise AtelierError(f"base {name} has a config but no weights (*.safetensors); pass a complete model directory")


def _with_chat_template(path: Path, name: str, work_dir: Path) -> Path:
    """`path` itself when its tokenizer has a chat template, else a copy with a simple one."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise AtelierError(f"base {name}: cannot load its tokenizer ({exc})") from None
    if tokenizer.chat_template:
        return path
    fingerprint = _hash_json({"source": str(path), "template": default_chat_template(tokenizer)})
    if _marker_matches(work_dir, fingerprint):
        return work_dir
    log.info("base %s has no chat template; writing a copy with one to %s", name, work_dir)
    tokenizer.chat_template = default_chat_template(tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = load_model(path, dtype="auto")  # a copy: the checkpoint's own dtype
    return _save_base(work_dir, model, tokenizer, {"name": name, "kind": "hf-copy", "fingerprint": fingerprint})


# ---------------------------------------------------------------- scratch bases


def build_scratch_base(size: str, *, work_dir: Path, corpus_texts: list[str], seed: int) -> Path:
    """Train a BPE tokenizer on the texts, initialise a Llama with `seed`, save both to `work_dir`."""
    spec = SCRATCH_SPECS[size]
    general = GENERAL_CORPUS.read_text(encoding="utf-8")
    texts = [t for t in corpus_texts if t.strip()] + [general]
    fingerprint = _hash_json({"spec": asdict(spec), "seed": seed, "version": _BUILD_VERSION,
                              "texts": hashlib.sha256("\x00".join(texts).encode()).hexdigest()})
    if _marker_matches(work_dir, fingerprint):
        log.info("reusing scratch:%s base in %s", size, work_dir)
        return work_dir
    tokenizer = train_tokenizer(texts, spec.vocab_size, spec.max_position_embeddings)
    model = _init_llama(spec, tokenizer, seed)
    _save_base(work_dir, model, tokenizer, {"name": f"scratch:{size}", "kind": "scratch",
                                            "fingerprint": fingerprint, "parameters": model.num_parameters()})
    log.info("built scratch:%s base (%d parameters) in %s", size, model.num_parameters(), work_dir)
    return work_dir


def train_tokenizer(texts: list[str], vocab_size: int, max_length: int = 512):
    """A byte-level BPE tokenizer (no unknown tokens) with ChatML specials and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=list(SCRATCH_SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|pad|>",
                                        bos_token="<|endoftext|>", model_max_length=max_length)
    tokenizer.chat_template = SCRATCH_CHAT_TEMPLATE
    return tokenizer


def _init_llama(spec: ScratchSpec, tokenizer, seed: int):
    """Random weights from `seed`, without disturbing the caller's global RNG state."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_attention_heads, max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def inherit_marker(base: Path, trained: Path) -> None:
    """Mark a fully trained copy of `base` with the base's kind (its recipe defaults still apply)."""
    if base_marker(Path(base)).get("kind") in ("scratch", "scratch-trained"):
        _write_marker(Path(trained), {"kind": "scratch-trained", "trained_from": str(base), "fingerprint": None})


def uses_scratch_recipe(path: Path) -> bool:
    """True for a scratch base and for models trained from one: they take the scratch recipe's
    step counts and learning rates (training/recipe.py)."""
    return base_marker(Path(path)).get("kind") in ("scratch", "scratch-trained")


def is_scratch_base(path: Path) -> bool:
    """True for a directory `build_scratch_base` wrote (its DAPT stage is full pretraining)."""
    return base_marker(Path(path)).get("kind") == "scratch"


# ---------------------------------------------------------------- marker files


def _hash_json(data: dict) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _marker_matches(path: Path, fingerprint: str) -> bool:
    return base_marker(path).get("fingerprint") == fingerprint and any(path.glob("*.safetensors"))


def _write_marker(path: Path, data: dict) -> None:
    atomic_write_text(path / BASE_MARKER, json.dumps(data, indent=2, sort_keys=True) + "\n")


def _save_base(target: Path, model, tokenizer, marker: dict) -> Path:
    """Save a base whole into `target` (`atomic_dir`: a killed build never looks complete), its marker last.

    Refuses to replace a non-empty directory that this module did not write.
    """
    if target.exists() and any(target.iterdir()) and not (target / BASE_MARKER).is_file():
        raise AtelierError(f"{target} already holds files Atelier did not write; choose an empty work_dir")
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _write_marker(tmp, marker)
    return target
