"""What the DAPT, SFT and DPO stages share: config fields, data reading, `run_stage` (resume, train, save), results.

A stage writes everything under its `out_dir`:

    out_dir/stage.json        fingerprint of the inputs (base, adapter, data, configs)
    out_dir/checkpoints/      Hugging Face Trainer checkpoints (resume points)
    out_dir/adapter/ | model/ the stage's output: a LoRA adapter, or a full model
    out_dir/result.json       the StageResult, written last and atomically: the DONE marker

so a killed stage resumes from its newest complete checkpoint, and a finished one is
returned from `result.json` without training again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from atelier.config import StrictModel
from atelier.errors import AtelierError
from atelier.home import atomic_write_text
from atelier.jsonl import iter_jsonl
from training.lora import LoraSettings, save_trained

log = logging.getLogger(__name__)
# transformers 5 deprecates a name its own Trainer still calls: one line of noise per stage, nothing to fix here
warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)

ProgressFn = Callable[..., None]
"""Called after each optimizer step with (step, max_steps, latest logged loss or None) and the
keyword `tokens_seen` (non-padding input tokens so far), from which callers show tokens/s and an ETA."""

RESULT_FILE = "result.json"
STAGE_FILE = "stage.json"


class StageConfig(StrictModel):
    """Fields every training stage has; each stage subclasses it with its own defaults."""

    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; unset: `epochs` passes, or the recipe's "
                                  "default for the base (fixed steps for scratch bases, 1 epoch for pretrained ones).")
    epochs: float | None = Field(None, gt=0, description="Passes over the training data when max_steps is unset; "
                                 "unset too: the recipe's default for the base.")
    learning_rate: float | None = Field(None, gt=0, description="Peak AdamW learning rate after warmup (cosine decay "
                                        "follows); unset: the recipe's default for the base (training/recipe.py).")
    batch_size: int | None = Field(None, ge=1, description="Sequences per device per forward pass; unset: the "
                                   "recipe's choice (the largest micro-batch the memory estimate fits, with "
                                   "gradient accumulation up to an effective batch of 8).")
    grad_accumulation: int = Field(1, ge=1, description="Forward passes per optimizer step "
                                   "(effective batch = batch_size x this).")
    seq_len: int = Field(256, ge=16, description="Tokens per training sequence; longer rows are truncated.")
    warmup_steps: float = Field(0.05, ge=0, description="Linear warmup: a step count, or a fraction of all "
                                "steps if < 1 (under max_steps rounded down, so a short budgeted run does not spend its "
                                "first step at learning rate 0).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    save_steps: int = Field(50, ge=1, description="Write a resumable checkpoint every this many steps "
                            "(the last 2 are kept).")
    logging_steps: int = Field(10, ge=1, description="Log the training loss every this many steps.")
    seed: int = Field(0, description="Seed for data order, dropout and new adapter weights.")
    eval_heldout: bool | None = Field(None, description="Score the held-out split before and after training "
                                      "(reported in the stage's metrics); unset: on for scratch bases (seconds), "
                                      "off for pretrained ones (minutes each; the run's evaluation covers them).")
    report_to: Literal["none", "tensorboard"] = Field(
        "none", description="Where to send training logs: nowhere, or TensorBoard files under "
        "out_dir/checkpoints/runs (needs the tensorboard package).")


class StageResult(BaseModel):
    """What a stage produced and how training went. Saved as out_dir/result.json."""

    stage: Literal["dapt", "sft", "dpo"] = Field(description="Which stage ran.")
    model_path: Path = Field(description="Model directory to load (the next stage's base).")
    adapter_path: Path | None = Field(description="LoRA adapter to apply on model_path; None after full training.")
    steps: int = Field(description="Optimizer steps completed in total (across resumes).")
    train_loss_first: float | None = Field(description="First logged training loss.")
    train_loss_last: float | None = Field(description="Last logged training loss.")
    runtime_s: float = Field(description="Seconds spent in the training loop by the call that finished the stage.")
    tokens_per_s: float = Field(description="Non-padding input tokens per second in that training loop.")
    resumed_from_step: int | None = Field(description="Checkpoint step training resumed from; None for a fresh start.")
    metrics: dict[str, float] = Field(default_factory=dict,
                                      description="Stage-specific scores (held-out loss, rewards).")


# ---------------------------------------------------------------- data


def read_rows(path: Path, keys: tuple[str, ...]) -> list[dict[str, Any]]:
    """JSONL rows reduced to `keys` (extra keys such as source/kind are dropped for TRL).

    A missing or empty file, a bad line or a row without a key is an AtelierError naming
    the file and line, never a traceback from deep inside a trainer.
    """
    path = Path(path)
    if not path.is_file():
        raise AtelierError(f"training data {path} not found; generate the specialist's data first")
    rows = []
    for number, record in iter_jsonl(path, fix="fix or regenerate the file"):
        missing = [key for key in keys if not isinstance(record, dict) or not record.get(key)]
        if missing:
            raise AtelierError(f"{path}:{number} has no {', '.join(missing)}; each row needs {', '.join(keys)}")
        rows.append({key: record[key] for key in keys})
    if not rows:
        raise AtelierError(f"training data {path} is empty; regenerate the specialist's data")
    return rows


def check_messages(rows: list[dict[str, Any]], path: Path, keys: tuple[str, ...]) -> None:
    """Each `keys` column must be a list of {"role", "content": str} turns; say which row is not."""
    for number, row in enumerate(rows, start=1):
        for key in keys:
            turns = row[key]
            ok = isinstance(turns, list) and all(
                isinstance(t, dict) and t.get("role") in ("system", "user", "assistant")
                and isinstance(t.get("content"), str) for t in turns)
            if not ok:
                raise AtelierError(f"{path}: row {number} {key!r} must be a list of "
                                   '{"role": system|user|assistant, "content": text} messages')


def read_optional_rows(path: Path, keys: tuple[str, ...]) -> list[dict[str, Any]]:
    """Like `read_rows`, but a missing or empty held-out file just means no held-out score."""
    path = Path(path)
    if not path.is_file() or not path.read_text(encoding="utf-8").strip():
        log.info("no held-out rows in %s; skipping held-out scores", path)
        return []
    return read_rows(path, keys)


# ---------------------------------------------------------------- stage directory


def fingerprint(**parts: Any) -> str:
    """A short hash of a stage's inputs; Paths to files contribute their content hash."""
    def encode(value: Any) -> Any:
        if isinstance(value, Path) and value.is_file():
            return hashlib.sha256(value.read_bytes()).hexdigest()
        if isinstance(value, BaseModel):
            return value.model_dump(mode="json")
        return str(value) if isinstance(value, Path) else value

    blob = json.dumps({k: encode(v) for k, v in parts.items()}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def latest_checkpoint(out_dir: Path) -> Path | None:
    """Newest complete checkpoint; a half-written one (killed mid-save) is removed.

    The Trainer writes trainer_state.json after the weights and optimizer, so a checkpoint
    without a readable one was interrupted.
    """
    folder = out_dir / "checkpoints"
    if not folder.is_dir():
        return None
    found = sorted((p for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1]), reverse=True)
    for checkpoint in found:
        try:
            json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
            return checkpoint
        except (OSError, ValueError):
            log.warning("removing incomplete checkpoint %s", checkpoint)
            shutil.rmtree(checkpoint, ignore_errors=True)
    return None


# ---------------------------------------------------------------- trainer arguments


def training_kwargs(config: StageConfig, out_dir: Path, progress: ProgressFn | None) -> dict[str, Any]:
    """Keyword arguments shared by TrainingArguments, SFTConfig and DPOConfig.

    Everything that differs between machines or library defaults is explicit: precision
    (TRL turns bf16 on by default, ~4x slower on CPU), gradient checkpointing (TRL turns it
    on; a small model does not need the memory and pays ~20% time), and reporting.
    """
    from training.models import precision_kwargs

    if config.report_to == "tensorboard":
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None:
            raise AtelierError("report_to=tensorboard needs the tensorboard package; pip install tensorboard, "
                               "or set report_to=none")
    if config.learning_rate is None or config.batch_size is None or (config.max_steps is None and config.epochs is None):
        raise AtelierError("stage config not resolved: call resolve_stage_config() before training")  # a bug, not a user error
    steps = {"max_steps": config.max_steps} if config.max_steps else {"num_train_epochs": config.epochs}
    warmup = config.warmup_steps
    if warmup < 1 and config.max_steps:  # transformers rounds a fraction up: 1 of 2 budgeted steps at lr 0
        warmup = math.floor(warmup * config.max_steps)
    return dict(
        output_dir=str(out_dir / "checkpoints"), **steps,
        per_device_train_batch_size=config.batch_size, per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accumulation, learning_rate=config.learning_rate,
        lr_scheduler_type="cosine", warmup_steps=warmup, weight_decay=config.weight_decay,
        logging_steps=config.logging_steps, logging_first_step=True,
        save_strategy="steps", save_steps=config.save_steps, save_total_limit=2,
        seed=config.seed, data_seed=config.seed, report_to=config.report_to,
        disable_tqdm=progress is not None, activation_checkpointing=False,
        include_num_input_tokens_seen="non_padding", dataloader_pin_memory=False,
        **precision_kwargs(),
    )


# ---------------------------------------------------------------- running


Scores = Callable[[Any, bool], dict[str, float]]
"""(trainer, trained) -> a stage's own metrics, measured before (trained=False) and after training."""


def run_stage(stage: Literal["dapt", "sft", "dpo"], build: Callable[..., Any], scores: Scores, base: Path,
              data_dir: Path, out_dir: Path, config: StageConfig, lora: LoraSettings, adapter: Path | None,
              progress: ProgressFn | None, time_limit_s: float | None) -> StageResult:
    """What every stage does around its trainer, top to bottom.

    Claim `out_dir` for these inputs (a finished run's result is returned as it is), fix the recipe's
    choices for the life of `out_dir`, build the trainer (`build` takes the arguments after `scores`,
    the config resolved; it attaches progress) with the libraries' progress bars hidden, score, train
    (resuming from the newest complete checkpoint, so a killed stage goes on where it was), score
    again, save the adapter or model, and write result.json last (the DONE marker).
    """
    stamp = fingerprint(stage=stage, base=base, adapter=adapter, train=data_dir / stage / "train.jsonl",
                        heldout=data_dir / stage / "heldout.jsonl", config=config, lora=lora)
    out_dir.mkdir(parents=True, exist_ok=True)
    stage_file, result_file = out_dir / STAGE_FILE, out_dir / RESULT_FILE
    if stage_file.is_file():  # a directory holding a run with other inputs is refused rather than mixed
        saved = json.loads(stage_file.read_text(encoding="utf-8"))
        if saved.get("stage") != stage or saved.get("fingerprint") != stamp:
            raise AtelierError(f"{out_dir} holds a {saved.get('stage')} run with different inputs; "
                               "delete it or pass a new output directory")
    else:
        atomic_write_text(stage_file, json.dumps({"stage": stage, "fingerprint": stamp}) + "\n")
    if result_file.is_file():
        log.info("%s already done in %s; reusing it", stage, out_dir)
        return StageResult.model_validate_json(result_file.read_text(encoding="utf-8"))
    config = resolve_stage_config(stage, config, out_dir, base, lora)
    with quiet_progress(progress is not None):
        trainer = build(base, data_dir, out_dir, config, lora, adapter, progress, time_limit_s)
        metrics = scores(trainer, False)
        stats = run_trainer(trainer, out_dir)
        metrics.update(scores(trainer, True))
        model_path, adapter_path = save_trained(trainer.model, trainer.processing_class, out_dir, base)
    result = StageResult(stage=stage, model_path=model_path, adapter_path=adapter_path, metrics=metrics, **stats)
    atomic_write_text(result_file, result.model_dump_json(indent=2) + "\n")  # last: the DONE marker
    for checkpoint in (out_dir / "checkpoints").glob("checkpoint-*"):  # TensorBoard logs in checkpoints/runs stay
        shutil.rmtree(checkpoint, ignore_errors=True)
    with contextlib.suppress(OSError):
        (out_dir / "checkpoints").rmdir()  # only when empty
    return result


def resolve_stage_config(stage: str, config: StageConfig, out_dir: Path, base: Path, lora) -> StageConfig:
    """The stage's config with the recipe's choices filled in (training/recipe.py), fixed for the
    life of `out_dir`: a resumed stage reuses the choices it started with (plan.json), so a
    different amount of free memory never changes the batch under a checkpoint."""
    from training.models import uses_scratch_recipe
    from training.recipe import resolve_stage

    plan_file = out_dir / "plan.json"
    if plan_file.is_file():
        with contextlib.suppress(ValueError):
            return type(config).model_validate_json(plan_file.read_text(encoding="utf-8"))
    resolved = resolve_stage(stage, config, scratch=uses_scratch_recipe(base), full=lora.method == "full", base=base)
    atomic_write_text(plan_file, resolved.model_dump_json(indent=2) + "\n")
    return resolved


@contextlib.contextmanager
def quiet_progress(enabled: bool) -> Iterator[None]:
    """Hide the library progress bars (dataset maps, weight loading and saving) while the
    caller draws its own progress; restores them afterwards."""
    if not enabled:
        yield
        return
    import datasets
    from transformers.utils import logging as hf_logging

    datasets_on, transformers_on = datasets.is_progress_bar_enabled(), hf_logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if datasets_on:
            datasets.enable_progress_bars()
        if transformers_on:
            hf_logging.enable_progress_bar()


def attach_progress(trainer, progress: ProgressFn | None, time_limit_s: float | None = None):
    """Route step reports to `progress` instead of the Trainer's own printing, and end training at the first
    step boundary past `time_limit_s` seconds when given (a budgeted stage's share: the adapter trained so far
    is saved as the stage's result); returns trainer."""
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    class Steps(TrainerCallback):
        """Forwards (step, max_steps, loss, tokens_seen=...) to `progress`; stops at the time limit."""

        loss: float | None = None
        started = time.perf_counter()

        def on_train_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.loss = float(logs["loss"])

        def on_step_end(self, args, state, control, **kwargs):
            if progress is not None:
                progress(state.global_step, state.max_steps, self.loss, tokens_seen=state.num_input_tokens_seen)
            late = time_limit_s is not None and time.perf_counter() - self.started > time_limit_s
            if late and state.global_step < state.max_steps:
                log.warning("stage time limit of %.0f s reached at step %d of %d; stopping there",
                            time_limit_s, state.global_step, state.max_steps)
                control.should_training_stop = True

    if progress is not None:
        trainer.remove_callback(PrinterCallback)  # with tqdm off it prints every log dict to stdout
    trainer.add_callback(Steps())
    return trainer


def run_trainer(trainer, out_dir: Path) -> dict[str, Any]:
    """Train, resuming from the newest complete checkpoint in out_dir; return loop statistics."""
    checkpoint = latest_checkpoint(out_dir)
    resumed, tokens_before = None, 0
    if checkpoint is not None:
        state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
        resumed, tokens_before = state["global_step"], state.get("num_input_tokens_seen", 0)
        log.info("resuming from %s (step %d)", checkpoint, resumed)
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    runtime = time.perf_counter() - started
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    tokens = trainer.state.num_input_tokens_seen - tokens_before
    return {"steps": trainer.state.global_step, "train_loss_first": losses[0] if losses else None,
            "train_loss_last": losses[-1] if losses else None, "runtime_s": round(runtime, 3),
            "tokens_per_s": round(tokens / runtime, 1) if runtime > 0 else 0.0, "resumed_from_step": resumed}


def last_logged(trainer, prefix: str) -> dict[str, float]:
    """The most recent logged value of every training metric starting with `prefix`."""
    found: dict[str, float] = {}
    for entry in trainer.state.log_history:
        for key, value in entry.items():
            if key.startswith(prefix) and isinstance(value, int | float):
                found[key] = float(value)
    return found
