"""How long and how hard each stage trains: defaults that follow the base and the data,
micro-batches that fit the machine's memory, and stage lengths sized to a time budget.

A stage config leaves `max_steps`, `learning_rate` and `batch_size` unset (None) to let the
recipe choose; any value set in YAML or on the command line wins.

* **Defaults by base kind.** A `scratch:*` base is a 1–14 M-parameter model that must learn
  the language from the documents alone: many passes (fixed step counts) at high learning
  rates. A pretrained base already writes English; it gets passes over the data (`epochs`)
  at learning rates measured on the sample manuals with SmolLM2-135M (`bench/lr_sweep.py`,
  bench/results/lr-sweep*.json): LoRA 2e-3 for DAPT and 1e-3 for SFT, where the published
  small-model values (1e-4–2e-4) barely moved held-out loss in the same steps (DAPT perplexity
  31.5 -> 29.4 at 2e-4, 22.5 at 2e-3; SFT answer loss 4.42 -> 3.92 at 2e-4, 3.41 at 1e-3) and
  general-English perplexity fell rather than rose. Both sit below the sweep's best (5e-3),
  which only 8 steps measured; a full epoch takes more steps at the same rate. DPO keeps 5e-5
  (not swept). Full fine-tuning takes a quarter of the LoRA rate.
* **Batch from memory.** The effective batch is `EFFECTIVE_BATCH` sequences; the
  micro-batch is the largest that the activation estimate fits in the memory at hand, the
  rest is gradient accumulation. A sequence that does not fit even alone fails before any
  expensive step, naming the setting to lower.
* **Budget.** With `budget_minutes`, the pipeline measures the training throughput on the
  real model (`measure_throughput`: two optimizer steps on real blocks), subtracts what it
  has spent and what the final evaluation will cost, and gives each stage the same share of
  an epoch (`plan_budget`); a budget too tight for every stage leaves DPO, then DAPT, out
  rather than train each for a step or two. A time limit on every stage keeps the run inside
  the budget even when the machine slows down.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

from atelier.errors import AtelierError

log = logging.getLogger(__name__)

EFFECTIVE_BATCH = 8  # sequences per optimizer step for pretrained bases (micro-batch x accumulation)
MEMORY_SHARE = 0.6  # share of the free memory training may plan to use

# stage -> (scratch defaults, pretrained-LoRA defaults)
_DEFAULTS = {
    "dapt": ({"max_steps": 300, "learning_rate": 3e-3, "batch_size": 8}, {"epochs": 1.0, "learning_rate": 2e-3}),
    "sft": ({"max_steps": 150, "learning_rate": 2e-3, "batch_size": 8}, {"epochs": 1.0, "learning_rate": 1e-3}),
    "dpo": ({"max_steps": 60, "learning_rate": 5e-4, "batch_size": 8}, {"epochs": 1.0, "learning_rate": 5e-5}),
}
FULL_FINETUNE_LR_SCALE = 0.25  # full fine-tuning of a pretrained base: 2.5e-4 where LoRA uses 1e-3
# Forward+backward token cost of a stage relative to DAPT's: DPO scores chosen and rejected
# (the prompt twice) and runs the frozen reference forward as well.
STAGE_COST = {"dapt": 1.0, "sft": 1.0, "dpo": 1.35}


def resolve_stage(stage: str, config, *, scratch: bool, full: bool, base: Path | None = None):
    """`config` with every field left to the recipe (None) filled in for this base kind.

    A step count set by the user is kept; otherwise scratch bases train fixed step counts
    and pretrained bases `epochs` passes. The micro-batch for a pretrained base comes from
    the memory estimate (`base` is read for its shape).
    """
    scratch_defaults, pretrained_defaults = _DEFAULTS[stage]
    defaults = dict(scratch_defaults if scratch else pretrained_defaults)
    if not scratch and full:
        defaults["learning_rate"] *= FULL_FINETUNE_LR_SCALE
    update = {}
    if config.eval_heldout is None:
        update["eval_heldout"] = scratch
    if config.learning_rate is None:
        update["learning_rate"] = defaults["learning_rate"]
    if config.max_steps is None and config.epochs is None:
        if "max_steps" in defaults:
            update["max_steps"] = defaults["max_steps"]
        else:
            update["epochs"] = defaults["epochs"]
    if not scratch and "logging_steps" not in config.model_fields_set:
        update["logging_steps"] = 1  # a step on a real base takes seconds to minutes: show each one's loss
    if config.batch_size is None:
        if scratch or base is None:
            update["batch_size"] = defaults.get("batch_size", EFFECTIVE_BATCH)
        else:
            micro = micro_batch(base, training_length(stage, config.seq_len), full=full)
            update["batch_size"] = micro
            if config.grad_accumulation == 1:
                update["grad_accumulation"] = max(1, EFFECTIVE_BATCH // micro)
    return config.model_copy(update=update) if update else config


# ---------------------------------------------------------------- memory


def training_length(stage: str, seq_len: int) -> int:
    """Tokens one training row of `stage` holds: DPO scores chosen and rejected, each up to seq_len."""
    return seq_len * (2 if stage == "dpo" else 1)


@dataclass(frozen=True)
class ModelShape:
    parameters: int
    layers: int
    hidden: int
    heads: int
    vocab: int


def model_shape(base: Path) -> ModelShape:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base).get_text_config()
    hidden = config.hidden_size
    layers = config.num_hidden_layers
    inter = getattr(config, "intermediate_size", 4 * hidden)
    vocab = config.vocab_size
    parameters = vocab * hidden + layers * (4 * hidden * hidden + 3 * hidden * inter)
    return ModelShape(parameters, layers, hidden, config.num_attention_heads, vocab)


def bytes_per_sequence(shape: ModelShape, seq_len: int) -> float:
    """Training memory one sequence of `seq_len` tokens costs, in fp32.

    Activations per layer follow Korthikanti et al.'s estimate (s·h·(34 + 5·a·s/h) bytes
    at 16 bits, doubled for fp32); the logits over the vocabulary are kept about four times
    (logits, log-softmax, their gradients). The sum is scaled by MEASURED_OVERHEAD, fitted to
    what LoRA training of SmolLM2-135M took here (~1.5 GB per 256-token sequence: LoRA's
    dropout copies of each adapted layer's input and the allocator's slack come on top).
    """
    s, h, a = seq_len, shape.hidden, shape.heads
    activations = shape.layers * s * h * (34 + 5 * a * s / h) * 2
    logits = 4 * s * shape.vocab * 4
    return (activations + logits) * MEASURED_OVERHEAD


MEASURED_OVERHEAD = 2.2


def free_memory() -> int:
    """Bytes training may use: free CUDA memory on a GPU, else available system memory."""
    import torch

    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def micro_batch(base: Path, seq_len: int, *, full: bool, available: int | None = None) -> int:
    """The largest micro-batch (≤ EFFECTIVE_BATCH) whose estimate fits MEMORY_SHARE of free memory."""
    shape = model_shape(base)
    weights = shape.parameters * 4 * (4 if full else 1.2)  # fp32 weights (+ grads and Adam states when full)
    budget = (available if available is not None else free_memory()) * MEMORY_SHARE - weights
    per_sequence = bytes_per_sequence(shape, seq_len)
    fits = int(budget // per_sequence)
    if fits < 1:
        gib = 1024 ** 3
        raise AtelierError(f"one training sequence of {seq_len} tokens needs about {per_sequence / gib:.1f} GiB "
                           f"beyond the {weights / gib:.1f} GiB of weights, but only "
                           f"{max(budget, 0) / gib:.1f} GiB is free; lower seq_len (e.g. sft.seq_len: "
                           f"{max(16, seq_len // 2)}) or free memory")
    return max(1, min(EFFECTIVE_BATCH, fits))


# ---------------------------------------------------------------- budget


def measure_throughput(base: Path, blocks: list[dict[str, list[int]]], lora, *, full: bool, batch_size: int,
                       collate, steps: int = 2) -> float:
    """Training tokens per second on the real model: `steps` optimizer steps on real blocks batched by
    `collate` (DAPT's PadCollator), after one warm-up step: the same kind of work every stage does."""
    import torch

    from training.lora import trainable_model

    model = trainable_model(base, None, lora, full=full)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    batch = collate(blocks[:batch_size])
    tokens = int(batch["attention_mask"].sum())
    timings = []
    for step in range(steps + 1):
        started = time.perf_counter()
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:
            timings.append(time.perf_counter() - started)
    del model, optimizer
    return tokens / (sum(timings) / len(timings))


@dataclass
class StagePlan:
    stage: str
    max_steps: int
    epochs: float  # share of one pass over the stage's data
    seconds: float  # time allotted


MIN_STEPS = 4  # a stage given fewer optimizer steps than this teaches too little to pay its own overhead
# Under a budget too tight for every stage, stages are left out in this order: DPO costs the most per
# step and only refines answers SFT taught; DAPT's text lowers perplexity, but SFT's answers (domain
# text too) move both numbers the gate requires. SFT, when asked for, always stays.
DROP_ORDER = ("dpo", "dapt")


def plan_budget(seconds_left: float, tokens_per_epoch: dict[str, int], rows_per_epoch: dict[str, int],
                tokens_per_s: float, effective_batch: dict[str, int], max_epochs: dict[str, float],
                overhead_s: float = 20.0) -> dict[str, StagePlan]:
    """Steps for each stage so that all of them end within `seconds_left`; left-out stages are absent.

    Every stage gets the same share of an epoch (capped at its `max_epochs`), since each
    teaches something the others do not (text, answers, preferences). When that share gives a
    stage fewer than MIN_STEPS steps, stages are left out in DROP_ORDER (their time goes to the
    rest) until every stage kept has MIN_STEPS, or only one is left (it gets at least 2).
    """
    stages = list(tokens_per_epoch)
    while True:
        plans = _equal_share(stages, seconds_left, tokens_per_epoch, rows_per_epoch, tokens_per_s, effective_batch,
                             max_epochs, overhead_s)
        droppable = [s for s in DROP_ORDER if s in stages] if len(stages) > 1 else []
        if plans is not None and (not droppable or min(p.max_steps for p in plans.values()) >= MIN_STEPS):
            return {s: replace(p, max_steps=max(2, p.max_steps)) for s, p in plans.items()}
        if not droppable:
            raise AtelierError(f"the time budget leaves {max(seconds_left, 0) / 60:.1f} min for training after "
                               "data and evaluation; give a larger --budget, or set eval.max_mcq_items lower")
        stages.remove(droppable[0])


def _equal_share(stages, seconds_left, tokens_per_epoch, rows_per_epoch, tokens_per_s, effective_batch, max_epochs,
                 overhead_s) -> dict[str, StagePlan] | None:
    """Plans giving every stage the same share of an epoch; None when no training time is left."""
    train_s = seconds_left - overhead_s * len(stages)
    if train_s <= 0 or tokens_per_s <= 0:
        return None
    epoch_s = {s: tokens_per_epoch[s] * STAGE_COST[s] / tokens_per_s for s in stages}
    share = train_s / sum(epoch_s.values())
    plans = {}
    for stage in stages:
        epochs = min(share, max_epochs[stage])
        steps = math.floor(epochs * rows_per_epoch[stage] / effective_batch[stage])
        plans[stage] = StagePlan(stage, steps, round(epochs, 3), epoch_s[stage] * epochs)
    return plans
