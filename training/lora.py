"""How a stage's weights are trained: a LoRA adapter, a QLoRA adapter on a 4-bit base, or all of them.

One adapter is carried through DAPT -> SFT -> DPO: the first LoRA stage creates it, later
stages load it trainable and keep training it. `trainable_model` is the one place that
decides which weights a stage updates.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from pydantic import Field

from atelier.config import StrictModel
from atelier.errors import AtelierError
from specialists.loading import load_model
from specialists.registry import validate_adapter
from training.models import inherit_marker

log = logging.getLogger(__name__)


class LoraSettings(StrictModel):
    """Which weights training updates, and the shape of the adapter when it is LoRA."""

    method: Literal["lora", "qlora", "full"] = Field(
        "lora", description="lora: train a low-rank adapter; qlora: the same on a 4-bit base (needs CUDA and "
        "bitsandbytes); full: update every weight (no adapter).")
    r: int = Field(16, ge=1, description="LoRA rank: the adapter's inner dimension; higher learns more, costs more.")
    alpha: int = Field(32, ge=1, description="LoRA scaling numerator: updates are scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter's input during training.")
    target_modules: str | list[str] = Field(
        "all-linear", description='Modules that get an adapter: "all-linear" (every linear layer but the LM head) '
        "or a list of module names such as [q_proj, v_proj].")

    def check_available(self) -> None:
        """Fail early, with the reason, when this machine cannot run `method`."""
        if self.method != "qlora":
            return
        import importlib.util

        import torch

        if not torch.cuda.is_available():
            raise AtelierError("lora.method=qlora needs a CUDA GPU (4-bit bitsandbytes kernels); "
                               "use lora.method=lora on this machine")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise AtelierError("lora.method=qlora needs the bitsandbytes package; pip install bitsandbytes, "
                               "or use lora.method=lora")

    def peft_config(self):
        """The PEFT LoraConfig for a new adapter."""
        from peft import LoraConfig

        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=self.target_modules, task_type="CAUSAL_LM", bias="none")


def trainable_model(base: Path, adapter: Path | None, lora: LoraSettings, *, full: bool):
    """The model a stage trains, starting from `base` plus `adapter`.

    * full: every weight trains; a given adapter is merged into the base first, so the
      stage still starts from the previous stage's state.
    * LoRA with an adapter: that adapter, loaded trainable, keeps training.
    * LoRA without one: a fresh adapter from `lora`.

    Weights being trained load in fp32 (mixed precision, if any, comes from the Trainer); a
    frozen base under a LoRA adapter on CUDA stays in its checkpoint dtype to save memory.
    """
    import torch

    lora.check_available()
    if adapter is not None:
        validate_adapter(adapter)
    if full:
        model = load_model(base, adapter, trainable=True, merge=True, dtype=torch.float32)
        model.train()
        return model
    if adapter is not None:
        return load_model(base, adapter, trainable=True, **_quantized_kwargs(lora))
    from peft import get_peft_model

    model = load_model(base, None, trainable=True, **_quantized_kwargs(lora))
    if lora.method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return get_peft_model(model, lora.peft_config())


def _quantized_kwargs(lora: LoraSettings) -> dict:
    """from_pretrained arguments loading the base in 4-bit NF4 for QLoRA; empty otherwise."""
    if lora.method != "qlora":
        return {}
    import torch
    from transformers import BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.bfloat16)
    return {"quantization_config": quantization, "device_map": {"": 0}}


def save_trained(model, tokenizer, out_dir: Path, base: Path) -> tuple[Path, Path | None]:
    """Save what a stage trained: (model_path, adapter_path) for the StageResult.

    A PEFT model saves only its "default" adapter (DPO adds a frozen "ref" copy that must
    not travel on); a full model saves weights and tokenizer as the next stage's base.
    """
    from peft import PeftModel

    if isinstance(model, PeftModel):
        target = out_dir / "adapter"
        model.save_pretrained(str(target), selected_adapters=["default"])
        return Path(base), target
    target = out_dir / "model"
    model.save_pretrained(str(target))
    tokenizer.save_pretrained(str(target))
    inherit_marker(Path(base), target)  # a trained scratch base stays a scratch base for the recipe
    return target, None


def trainable_share(model) -> tuple[int, int]:
    """(trainable parameters, all parameters), for reports and the bench."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
