"""SFT: supervised fine-tuning on the generated question/answer conversations.

Rows `{"messages": [...]}` from data_dir/sft/{train,heldout}.jsonl. Each conversation is
handed to TRL's SFTTrainer as a conversational prompt–completion pair (every turn before the
last assistant turn is the prompt; that turn is the completion), with completion-only loss:
TRL renders the prompt with the generation prompt and the whole conversation with the
base's own chat template, and trains only the tokens after their common prefix — the
answer and the template's end-of-turn token, so the model learns to stop. This works with
any chat template (SmolLM2's, Llama 3's and Qwen's have no `{% generation %}` markers), and
`check_chat_template` proves it on a sample conversation before any expensive step.

Sequences are packed with best-fit decreasing (TRL's "bfd", padding-free: conversations
sit side by side in one row, kept apart by their position ids), so short pairs do not pay
for padding.

What trains: the adapter passed in (the DAPT adapter, loaded trainable) keeps training; with
no adapter a new one is created on `base` (after a full DAPT of a scratch base);
`lora.method=full` updates every weight.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pydantic import Field

from atelier.errors import AtelierError
from training.lora import LoraSettings, trainable_model
from training.trainer_common import (
    ProgressFn,
    StageConfig,
    StageResult,
    attach_progress,
    check_messages,
    read_optional_rows,
    read_rows,
    resolve_stage_config,
    run_stage,
    training_kwargs,
)

log = logging.getLogger(__name__)


class SftConfig(StageConfig):
    """SFT settings. Unset steps, learning rate and batch follow the base (training/recipe.py):
    150 steps at 2e-3 for scratch bases, one epoch at 1e-3 for a LoRA adapter on a pretrained one."""

    seq_len: int = Field(256, ge=16, description="Tokens per packed row; a longer conversation is cut at the end.")
    packing: bool = Field(True, description="Pack conversations padding-free into seq_len rows (best-fit "
                          "decreasing); off: one conversation per row, padded per batch.")


def train_sft(base: Path, data_dir: Path, out_dir: Path, config: SftConfig, lora: LoraSettings,
              adapter: Path | None = None, progress: ProgressFn | None = None,
              time_limit_s: float | None = None) -> StageResult:
    """Fine-tune `base` (+ `adapter`) on data_dir/sft conversations; outputs under `out_dir`."""
    read_sft_rows(Path(data_dir) / "sft" / "train.jsonl", required=True)  # bad data fails before out_dir is claimed
    return run_stage("sft", build_sft_trainer, _heldout_loss, Path(base), Path(data_dir), Path(out_dir), config, lora,
                     adapter, progress, time_limit_s)


def _heldout_loss(trainer, trained: bool) -> dict[str, float]:
    if trainer.eval_dataset is None:
        return {}
    return {"heldout_loss" if trained else "heldout_loss_before": round(trainer.evaluate()["eval_loss"], 4)}


def read_sft_rows(path: Path, *, required: bool) -> list[dict]:
    """`messages` rows (other keys dropped), checked for shape; [] for an absent held-out file."""
    rows = read_rows(path, ("messages",)) if required else read_optional_rows(path, ("messages",))
    check_messages(rows, path, ("messages",))
    return rows


def build_sft_trainer(base: Path, data_dir: Path, out_dir: Path, config: SftConfig, lora: LoraSettings,
                      adapter: Path | None = None, progress: ProgressFn | None = None,
                      time_limit_s: float | None = None):
    """The SFTTrainer `train_sft` runs: exposed so tests can inspect its masked labels."""
    from datasets import Dataset
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    from specialists.loading import load_tokenizer

    base, data_dir = Path(base), Path(data_dir)
    config = resolve_stage_config("sft", config, Path(out_dir), base, lora)
    train_rows = read_sft_rows(data_dir / "sft" / "train.jsonl", required=True)
    heldout_rows = read_sft_rows(data_dir / "sft" / "heldout.jsonl", required=False) if config.eval_heldout else []
    set_seed(config.seed)  # new adapter weights are drawn before the Trainer seeds anything
    tokenizer = load_tokenizer(base)
    check_chat_template(tokenizer, base)
    model = trainable_model(base, adapter, lora, full=lora.method == "full")
    packing = {"packing": True, "packing_strategy": "bfd"} if config.packing else {"packing": False}
    args = SFTConfig(**training_kwargs(config, Path(out_dir), progress), max_length=config.seq_len,
                     completion_only_loss=True, assistant_only_loss=False, dataset_num_proc=None, **packing)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(to_prompt_completion(train_rows)),
                         eval_dataset=Dataset.from_list(to_prompt_completion(heldout_rows)) if heldout_rows else None,
                         processing_class=tokenizer)
    return attach_progress(trainer, progress, time_limit_s)


def to_prompt_completion(rows: list[dict]) -> list[dict]:
    """`messages` rows as conversational prompt–completion rows: the last assistant turn is the
    completion, everything before it the prompt. Rows without a final assistant turn are dropped."""
    converted = []
    for row in rows:
        turns = row["messages"]
        if len(turns) >= 2 and turns[-1]["role"] == "assistant":
            converted.append({"prompt": turns[:-1], "completion": turns[-1:]})
    return converted


SAMPLE_CONVERSATION = [{"role": "user", "content": "What does fault code E14 mean?"},
                       {"role": "assistant", "content": "Dry running: the pump lost suction."}]


def check_chat_template(tokenizer, base: Path | str) -> None:
    """Fail fast unless the base's chat template renders a conversation the way SFT needs it:
    the prompt with the generation prompt is a prefix of the whole conversation, and what
    follows it is the answer plus an end-of-turn token the model can learn to stop on."""
    if not tokenizer.chat_template:
        raise AtelierError(f"the tokenizer of {base} has no chat template; resolve the base with "
                           "training.models.resolve_base, which gives template-less bases a default one")
    try:
        prompt = tokenizer.apply_chat_template(SAMPLE_CONVERSATION[:1], add_generation_prompt=True, tokenize=False)
        whole = tokenizer.apply_chat_template(SAMPLE_CONVERSATION, tokenize=False)
    except Exception as exc:
        raise AtelierError(f"the chat template of {base} cannot render a conversation ({exc}); fix its "
                           "chat_template.jinja") from None
    answer = SAMPLE_CONVERSATION[1]["content"]
    if not whole.startswith(prompt):
        raise AtelierError(f"the chat template of {base} renders the prompt differently alone and inside the "
                           "conversation, so the answer cannot be told apart from it; fix its chat_template.jinja")
    tail = whole[len(prompt):]
    stops = {t for t in (tokenizer.eos_token, *getattr(tokenizer, "all_special_tokens", [])) if t}
    if not tail.startswith(answer) or not any(stop in tail[len(answer):] for stop in stops):
        raise AtelierError(f"the chat template of {base} does not end the assistant turn with an end-of-turn "
                           f"token (after the answer it renders {tail[len(answer):]!r}); the model could not learn "
                           "to stop. Fix its chat_template.jinja")
