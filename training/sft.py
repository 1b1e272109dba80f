"""SFT: supervised fine-tuning on the generated question/answer conversations.

Rows `{"messages": [...]}` from data_dir/sft/{train,heldout}.jsonl, trained with TRL's
SFTTrainer and `assistant_only_loss=True`: the chat template's `{% generation %}` markers
mask every token outside the assistant turns, so the loss teaches answering (and stopping
with the end-of-turn token), never reproducing the question.

What trains: the adapter passed in (the DAPT adapter, loaded trainable) keeps training; with
no adapter a new one is created on `base` (after a full DAPT of a scratch base);
`lora.method=full` updates every weight.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pydantic import Field

from atelier.errors import AtelierError
from training.lora import LoraSettings, save_trained, trainable_model
from training.trainer_common import (
    ProgressFn,
    StageConfig,
    StageResult,
    attach_progress,
    check_messages,
    fingerprint,
    finish_stage,
    open_stage,
    quiet_progress,
    read_optional_rows,
    read_rows,
    run_trainer,
    training_kwargs,
)

log = logging.getLogger(__name__)


class SftConfig(StageConfig):
    """SFT settings. Defaults suit a LoRA adapter (r=16) on scratch:tiny; for a Hugging Face
    base use a learning rate near 2e-4."""

    max_steps: int | None = Field(150, ge=1, description="Optimizer steps; None trains for `epochs` instead.")
    learning_rate: float = Field(2e-3, gt=0, description="Peak AdamW learning rate after warmup; cosine decay follows.")
    batch_size: int = Field(8, ge=1, description="Conversations per device per forward pass.")
    seq_len: int = Field(256, ge=16, description="Tokens per conversation; longer ones are cut at the end.")


def train_sft(base: Path, data_dir: Path, out_dir: Path, config: SftConfig, lora: LoraSettings,
              adapter: Path | None = None, progress: ProgressFn | None = None) -> StageResult:
    """Fine-tune `base` (+ `adapter`) on data_dir/sft conversations; outputs under `out_dir`."""
    base, data_dir, out_dir = Path(base), Path(data_dir), Path(out_dir)
    train_file, heldout_file = data_dir / "sft" / "train.jsonl", data_dir / "sft" / "heldout.jsonl"
    stamp = fingerprint(stage="sft", base=base, adapter=adapter, train=train_file, heldout=heldout_file,
                        config=config, lora=lora)
    read_sft_rows(train_file, required=True)
    if (done := open_stage(out_dir, "sft", stamp)) is not None:
        return done
    with quiet_progress(progress is not None):
        trainer = build_sft_trainer(base, data_dir, out_dir, config, lora, adapter, progress)
        metrics = {}
        if trainer.eval_dataset is not None:
            metrics["heldout_loss_before"] = round(trainer.evaluate()["eval_loss"], 4)
        stats = run_trainer(trainer, out_dir)
        if trainer.eval_dataset is not None:
            metrics["heldout_loss"] = round(trainer.evaluate()["eval_loss"], 4)
        model_path, adapter_path = save_trained(trainer.model, trainer.processing_class, out_dir, base)
    result = StageResult(stage="sft", model_path=model_path, adapter_path=adapter_path, metrics=metrics, **stats)
    return finish_stage(out_dir, result)


def read_sft_rows(path: Path, *, required: bool) -> list[dict]:
    """`messages` rows (other keys dropped), checked for shape; [] for an absent held-out file."""
    rows = read_rows(path, ("messages",)) if required else read_optional_rows(path, ("messages",))
    check_messages(rows, path, ("messages",))
    return rows


def build_sft_trainer(base: Path, data_dir: Path, out_dir: Path, config: SftConfig, lora: LoraSettings,
                      adapter: Path | None = None, progress: ProgressFn | None = None):
    """The SFTTrainer `train_sft` runs: exposed so tests can inspect its masked labels."""
    from datasets import Dataset
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    from training.models import load_tokenizer

    base, data_dir = Path(base), Path(data_dir)
    train_rows = read_sft_rows(data_dir / "sft" / "train.jsonl", required=True)
    heldout_rows = read_sft_rows(data_dir / "sft" / "heldout.jsonl", required=False) if config.eval_heldout else []
    set_seed(config.seed)  # new adapter weights are drawn before the Trainer seeds anything
    tokenizer = load_tokenizer(base)
    _check_template(tokenizer, base)
    model = trainable_model(base, adapter, lora, full=lora.method == "full")
    args = SFTConfig(**training_kwargs(config, Path(out_dir), progress), max_length=config.seq_len,
                     assistant_only_loss=True, packing=False, dataset_num_proc=None)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(train_rows),
                         eval_dataset=Dataset.from_list(heldout_rows) if heldout_rows else None,
                         processing_class=tokenizer)
    return attach_progress(trainer, progress)


def _check_template(tokenizer, base: Path) -> None:
    """assistant_only_loss needs {% generation %} markers, or a template TRL knows how to patch."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    if has_generation_markers(tokenizer.chat_template or ""):
        return
    try:
        get_training_chat_template(tokenizer)
    except ValueError:
        raise AtelierError(f"the chat template of {base} has no {{% generation %}} markers, so the loss cannot be "
                           "limited to assistant turns; add them around the assistant content in its "
                           "chat_template.jinja, or use a base whose template TRL supports (Qwen, Llama 3, Gemma)"
                           ) from None
