"""Loading a causal LM: device, dtype, tokenizer, a base with its LoRA adapter(s) attached or merged.

Training, the specialist runtime, export and evaluation load models here, so a base reads the same
everywhere: local files only (the one download is `training.models.download_base`), fp32 off CUDA,
an adapter checked by the registry before PEFT reads it. It lives in specialists/ because every user
may import it there (the kernel in atelier/ imports no package). Heavy imports happen inside functions.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from atelier.errors import AtelierError
from specialists.registry import validate_adapter

BASE_MARKER = "atelier-base.json"  # written last into every base training.models builds


def pick_device(setting: str = "auto") -> str:
    """Where a model runs: an explicit setting ("cpu", "cuda:1", "mps") as given; "auto": cuda, then mps, else cpu."""
    if setting != "auto":
        return setting
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def dtype_for(device: str):
    """fp32 off CUDA; on CUDA bf16 where the GPU supports it, else fp16."""
    import torch

    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_tokenizer(path: Path | str, **kwargs: Any):
    """The tokenizer of a local model (or a cached hub id), with a pad token (eos when it has none) for batching."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, **kwargs)
    except (OSError, ValueError) as exc:
        raise _unloadable(path, exc) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    path: Path | str,
    adapters: Path | str | Sequence[Path | str] | None = None,
    *,
    trainable: bool = False,
    merge: bool = False,
    device: str | None = None,
    **kwargs: Any,
):
    """A causal LM from local files, with LoRA adapter(s) attached (or merged into its weights).

    adapters:  one adapter folder or several; several are merged in order (stages trained on top of each other).
    trainable: the adapter's weights load trainable (PEFT freezes them otherwise, and a stage continuing
               it fails with "tensors does not require grad"); the model stays in train mode.
    merge:     fold the adapters into the weights and return the plain transformers model.
    device:    move the model there (and pick its dtype for it); None leaves placement to the caller
               (the Trainer, or a `device_map` in kwargs), in the dtype of the device it will pick.
    kwargs:    passed to `from_pretrained` (dtype, use_safetensors, quantization_config, ...).
    """
    from transformers import AutoModelForCausalLM

    kwargs.setdefault("dtype", dtype_for(device or pick_device()))
    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, **kwargs)
    except (OSError, ValueError) as exc:
        raise _unloadable(path, exc) from None
    folders = [adapters] if isinstance(adapters, (str, Path)) else list(adapters or [])
    for number, adapter in enumerate(folders, start=1):
        validate_adapter(Path(adapter))
        model = attach_adapter(model, Path(adapter), trainable=trainable)
        if merge or number < len(folders):
            model = model.merge_and_unload()
    if device is not None:
        model = model.to(device)
    return model if trainable else model.eval()


def attach_adapter(model, adapter: Path, *, name: str = "default", trainable: bool = False, device: str | None = None):
    """`model` with the LoRA adapter in folder `adapter` attached as `name` (a PeftModel gets one more adapter).

    The caller has checked the folder (`validate_adapter`, or the registry's `check_adapter_files`)."""
    from peft import PeftModel

    where = {"torch_device": device} if device is not None else {}
    with warnings.catch_warnings():  # peft 0.21 asks transformers 5 a deprecated question; not ours to fix
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        if isinstance(model, PeftModel):
            model.load_adapter(str(adapter), adapter_name=name, is_trainable=trainable, **where)
            return model
        return PeftModel.from_pretrained(model, str(adapter), adapter_name=name, is_trainable=trainable, **where)


def merge_adapter(model):
    """The plain transformers model with its adapter folded into the weights (a plain model as it is)."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def base_marker(path: Path | str) -> dict[str, Any]:
    """What `atelier-base.json` says about a base Atelier built (kind: gguf, scratch, ...); {} for any other."""
    try:
        return json.loads((Path(path) / BASE_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def load_gguf(gguf: Path):
    """(fp32 model, tokenizer) dequantised from a GGUF file, without per-tensor progress bars.

    transformers loads GGUF files but refuses to save them ("quantized with gguf"), so the weights move
    into a model built from the same config without the quantization entry, which `save_pretrained` writes.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    real_missing = [
        k for k in missing if k not in getattr(model, "_tied_weights_keys", {}) and not k.endswith("lm_head.weight")
    ]
    if real_missing or unexpected:
        raise ValueError(
            f"weights do not match the architecture (missing {real_missing[:3]}, unexpected {unexpected[:3]})"
        )
    model.tie_weights()
    model.generation_config = loaded.generation_config
    return model.eval(), tokenizer


def _unloadable(path: Path | str, exc: Exception) -> AtelierError:
    return AtelierError(
        f"cannot load model {path} ({exc}); it must be on this machine: a folder (or a cached hub "
        "model) with config.json, a tokenizer and *.safetensors weights"
    )
