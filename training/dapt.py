"""DAPT: domain-adaptive (continued) pretraining, next-token loss on the domain's raw text.

Rows `{"text"}` from data_dir/dapt/{train,heldout}.jsonl. With packing, every text gets an
eos and all are concatenated and cut into `seq_len` blocks, so no compute goes to padding;
without it each text is split into `seq_len` pieces that are padded per batch. A plain
`transformers.Trainer` does this about 2x faster than TRL's SFTTrainer with packing here.

What trains: a scratch base is trained in full (DAPT *is* its pretraining, and its output
becomes the specialist's base model); a Hugging Face base gets a new LoRA adapter unless
`lora.method=full`.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from pydantic import Field

from training.lora import LoraSettings, trainable_model
from training.trainer_common import (
    ProgressFn,
    StageConfig,
    StageResult,
    attach_progress,
    read_optional_rows,
    read_rows,
    run_stage,
    training_kwargs,
)

log = logging.getLogger(__name__)


class DaptConfig(StageConfig):
    """DAPT settings. Unset steps, learning rate and batch follow the base (training/recipe.py):
    300 steps at 3e-3 for a scratch base, one epoch at 2e-3 for a LoRA adapter on a pretrained one."""

    seq_len: int = Field(256, ge=16, description="Tokens per training block.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    packing: bool = Field(True, description="Concatenate texts into full seq_len blocks (no padding); "
                          "off: each text is split and padded on its own.")


def train_dapt(base: Path, data_dir: Path, out_dir: Path, config: DaptConfig, lora: LoraSettings,
               adapter: Path | None = None, progress: ProgressFn | None = None,
               time_limit_s: float | None = None) -> StageResult:
    """Continue pretraining `base` (+ `adapter`) on data_dir/dapt; outputs under `out_dir`."""
    read_rows(Path(data_dir) / "dapt" / "train.jsonl", ("text",))  # bad data fails before out_dir is claimed
    return run_stage("dapt", build_dapt_trainer, _perplexity, Path(base), Path(data_dir), Path(out_dir), config, lora,
                     adapter, progress, time_limit_s)


def build_dapt_trainer(base: Path, data_dir: Path, out_dir: Path, config: DaptConfig, lora: LoraSettings,
                       adapter: Path | None = None, progress: ProgressFn | None = None,
                       time_limit_s: float | None = None):
    """A plain Trainer on the model and its blocks; the held-out blocks ride along as its eval_dataset."""
    from transformers import Trainer, TrainingArguments, set_seed

    from specialists.loading import load_tokenizer
    from training.models import is_scratch_base

    texts = [row["text"] for row in read_rows(data_dir / "dapt" / "train.jsonl", ("text",))]
    heldout = [row["text"] for row in read_optional_rows(data_dir / "dapt" / "heldout.jsonl", ("text",))
               ] if config.eval_heldout else []
    set_seed(config.seed)  # new adapter weights are drawn before the Trainer seeds anything
    full = lora.method == "full" or is_scratch_base(base)
    tokenizer = load_tokenizer(base)
    model = trainable_model(base, adapter, lora, full=full)
    blocks = to_blocks(texts, tokenizer, config.seq_len, packing=config.packing)
    eval_blocks = to_blocks(heldout, tokenizer, config.seq_len, packing=True)
    args = TrainingArguments(**training_kwargs(config, out_dir, progress), label_names=["labels"])
    trainer = Trainer(model=model, args=args, train_dataset=blocks, eval_dataset=eval_blocks or None,
                      data_collator=PadCollator(tokenizer.pad_token_id), processing_class=tokenizer)
    return attach_progress(trainer, progress, time_limit_s)


def _perplexity(trainer, trained: bool) -> dict[str, float]:
    """Blocks trained on, and held-out perplexity before and after training (when there is held-out text)."""
    metrics = {} if trained else {"train_blocks": float(len(trainer.train_dataset))}
    if trainer.eval_dataset:
        metrics["heldout_perplexity" if trained else "heldout_perplexity_before"] = heldout_perplexity(
            trainer.model, trainer.eval_dataset, trainer.processing_class, trainer.args.per_device_eval_batch_size)
    return metrics


def to_blocks(texts: list[str], tokenizer, seq_len: int, *, packing: bool) -> list[dict[str, list[int]]]:
    """Token blocks of at most `seq_len`; each text ends with eos so documents stay apart.

    Packed: one stream cut into full blocks (only the last may be short). Unpacked: each
    text cut on its own, so its last piece is short and gets padded in the batch.
    """
    if not texts:
        return []
    encoded = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    eos = tokenizer.eos_token_id
    pieces = [ids + [eos] for ids in encoded]
    if packing:
        stream = [token for ids in pieces for token in ids]
        pieces = [stream]
    return [{"input_ids": ids[start:start + seq_len]} for ids in pieces for start in range(0, len(ids), seq_len)]


class PadCollator:
    """Pads a batch to its longest block; padding is masked out of attention and loss."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict[str, list[int]]]) -> dict:
        import torch

        width = max(len(row["input_ids"]) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : len(row["input_ids"])] = torch.tensor(row["input_ids"])
            attention[i, : len(row["input_ids"])] = 1
        labels = input_ids.masked_fill(attention == 0, -100)
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def heldout_perplexity(model, blocks: list[dict[str, list[int]]], tokenizer, batch_size: int) -> float:
    """exp(mean next-token loss) over the held-out blocks, weighting every token equally."""
    import torch

    collate = PadCollator(tokenizer.pad_token_id)
    was_training = model.training
    model.eval()
    total_loss, total_tokens = 0.0, 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for start in range(0, len(blocks), batch_size):
            batch = {k: v.to(device) for k, v in collate(blocks[start:start + batch_size]).items()}
            count = int((batch["labels"][:, 1:] != -100).sum())
            if count == 0:
                continue
            loss = model(**batch).loss
            total_loss += float(loss) * count
            total_tokens += count
    model.train(was_training)
    return round(math.exp(total_loss / total_tokens), 3) if total_tokens else float("nan")
