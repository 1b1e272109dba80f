"""DPO: preference tuning on (prompt, chosen, rejected) conversations, after SFT.

Rows from data_dir/dpo/{train,heldout}.jsonl. The SFT adapter is loaded trainable and keeps
training; a frozen copy of it is the reference.

Which reference, and why: DPO's implicit KL term keeps the policy near the reference, and
the policy it should stay near is the one SFT produced. TRL 1.16 does exactly this when it
is handed a PeftModel that already has an adapter and no `ref_model`: it copies the adapter
into a frozen "ref" adapter and computes reference log-probs with it (a *new* adapter would
instead use the adapter-disabled base, i.e. the model before SFT, which would pull the
policy back towards a model that never learned the answer format). With `lora.method=full`
the reference is a frozen copy of the starting (SFT) weights. So at step 0 policy and
reference agree and every reward is 0; the rewards then measure movement away from SFT.

Alternatives (`preference`), as TRL 1.16 ships them:
* dpo   - trl.DPOTrainer, any of its `loss_type`s (sigmoid, ipo, hinge, robust, ...).
* simpo - trl.experimental.cpo.CPOTrainer with loss_type="simpo", cpo_alpha=0: reference-free,
          length-normalised rewards with a target margin (`simpo_gamma`).
* orpo  - trl.experimental.orpo.ORPOTrainer: reference-free, SFT loss plus an odds-ratio term.
* kto   - trl.KTOTrainer (stable): pairs are split into a desirable and an undesirable
          example each; reference is the SFT adapter as for DPO.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Literal

from pydantic import Field

from atelier.errors import AtelierError
from training.lora import LoraSettings, trainable_model
from training.trainer_common import (
    ProgressFn,
    StageConfig,
    StageResult,
    attach_progress,
    check_messages,
    last_logged,
    read_optional_rows,
    read_rows,
    resolve_stage_config,
    run_stage,
    training_kwargs,
)

log = logging.getLogger(__name__)

PREFERENCE_KEYS = ("prompt", "chosen", "rejected")
DpoLoss = Literal["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]


class DpoConfig(StageConfig):
    """Preference-tuning settings. Unset steps, learning rate and batch follow the base
    (training/recipe.py): 60 steps at 5e-4 on scratch bases, one epoch at 5e-5 on pretrained ones."""

    seq_len: int = Field(256, ge=16, description="Tokens per prompt+answer; longer ones are cut at the end.")
    logging_steps: int = Field(5, ge=1, description="Log loss and rewards every this many steps.")
    save_steps: int = Field(20, ge=1, description="Write a resumable checkpoint every this many steps "
                            "(the last 2 are kept).")
    preference: Literal["dpo", "simpo", "orpo", "kto"] = Field(
        "dpo", description="Algorithm: dpo (reference = SFT model), simpo and orpo (reference-free, TRL "
        "experimental), kto (unpaired desirable/undesirable examples).")
    loss_type: DpoLoss = Field("sigmoid", description="DPO loss (preference=dpo only), as TRL 1.16 names them.")
    beta: float = Field(0.1, gt=0, description="Strength of the pull towards the reference (dpo, kto), the reward "
                        "scale (simpo), or the odds-ratio weight (orpo).")
    simpo_gamma: float = Field(0.5, ge=0, description="SimPO target reward margin (preference=simpo only).")
    sft_weight: float = Field(0.0, ge=0, description="preference=dpo only: add TRL's 'sft' loss (the chosen answer's "
                              "NLL) with this weight beside loss_type, as RPO does, so the chosen answer's likelihood "
                              "rises instead of only the rejected one falling (corrections from feedback).")


def train_dpo(base: Path, data_dir: Path, out_dir: Path, config: DpoConfig, lora: LoraSettings,
              adapter: Path | None = None, progress: ProgressFn | None = None,
              time_limit_s: float | None = None) -> StageResult:
    """Preference-tune `base` + the SFT `adapter` on data_dir/dpo; outputs under `out_dir`."""
    read_pairs(Path(data_dir) / "dpo" / "train.jsonl", required=True)  # bad data fails before out_dir is claimed
    return run_stage("dpo", build_dpo_trainer, _rewards, Path(base), Path(data_dir), Path(out_dir), config, lora,
                     adapter, progress, time_limit_s)


def _rewards(trainer, trained: bool) -> dict[str, float]:
    """The last logged training rewards and the held-out loss and rewards, after training."""
    if not trained:
        return {}
    metrics = {f"train_{k.replace('/', '_')}": round(v, 4) for k, v in last_logged(trainer, "rewards/").items()}
    if trainer.eval_dataset is not None:
        scores = trainer.evaluate()
        metrics.update({f"heldout_{k[5:].replace('/', '_')}": round(float(v), 4) for k, v in scores.items()
                        if k.startswith(("eval_rewards/", "eval_loss"))})
    return metrics


def read_pairs(path: Path, *, required: bool) -> list[dict]:
    """Conversational preference rows (source/kind dropped); [] for an absent held-out file."""
    rows = read_rows(path, PREFERENCE_KEYS) if required else read_optional_rows(path, PREFERENCE_KEYS)
    check_messages(rows, path, PREFERENCE_KEYS)
    return rows


def build_dpo_trainer(base: Path, data_dir: Path, out_dir: Path, config: DpoConfig, lora: LoraSettings,
                      adapter: Path | None = None, progress: ProgressFn | None = None,
                      time_limit_s: float | None = None):
    """The TRL trainer for `config.preference`, on base + adapter, ready to train."""
    from datasets import Dataset
    from transformers import set_seed

    from specialists.loading import load_tokenizer

    data_dir = Path(data_dir)
    config = resolve_stage_config("dpo", config, Path(out_dir), Path(base), lora)
    train_rows = read_pairs(data_dir / "dpo" / "train.jsonl", required=True)
    heldout_rows = read_pairs(data_dir / "dpo" / "heldout.jsonl", required=False) if config.eval_heldout else []
    config_cls, trainer_cls, settings = _algorithm(config)
    set_seed(config.seed)  # new adapter weights are drawn before the Trainer seeds anything
    tokenizer = load_tokenizer(base)
    full = lora.method == "full"
    model = trainable_model(base, adapter, lora, full=full)
    train, heldout = Dataset.from_list(train_rows), Dataset.from_list(heldout_rows) if heldout_rows else None
    if config.preference == "kto":
        train, heldout = _unpaired(train), _unpaired(heldout) if heldout is not None else None
    args = config_cls(**training_kwargs(config, Path(out_dir), progress), max_length=config.seq_len, **settings)
    extra = {}
    if full and config.preference in ("dpo", "kto"):
        extra["ref_model"] = copy.deepcopy(model).eval()  # the frozen starting (SFT) weights
    trainer = trainer_cls(model=model, args=args, train_dataset=train, eval_dataset=heldout,
                          processing_class=tokenizer, **extra)
    return attach_progress(trainer, progress, time_limit_s)


def _algorithm(config: DpoConfig):
    """(config class, trainer class, algorithm-specific config kwargs) for `config.preference`."""
    if config.preference == "dpo":
        from trl import DPOConfig, DPOTrainer

        mixed = {"loss_type": [config.loss_type, "sft"], "loss_weights": [1.0, config.sft_weight]}
        return DPOConfig, DPOTrainer, {"beta": config.beta, **(mixed if config.sft_weight else
                                                               {"loss_type": [config.loss_type]})}
    if config.sft_weight:
        raise AtelierError("sft_weight applies to preference=dpo only; remove it or set preference=dpo")
    if config.loss_type != "sigmoid":
        raise AtelierError(f"loss_type={config.loss_type} applies to preference=dpo only; "
                           f"remove it or set preference=dpo")
    if config.preference == "kto":
        from trl import KTOConfig, KTOTrainer

        return KTOConfig, KTOTrainer, {"beta": config.beta}
    try:
        if config.preference == "simpo":
            from trl.experimental.cpo import CPOConfig, CPOTrainer

            return CPOConfig, CPOTrainer, {"loss_type": "simpo", "cpo_alpha": 0.0, "beta": config.beta,
                                           "simpo_gamma": config.simpo_gamma}
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        return ORPOConfig, ORPOTrainer, {"beta": config.beta}
    except ImportError:
        raise AtelierError(f"preference={config.preference} is not in the installed TRL (it lives in "
                           "trl.experimental and may have moved); use preference=dpo or preference=kto") from None


def _unpaired(dataset):
    """KTO wants single answers labelled good or bad: each pair becomes one of each."""
    from trl.data_utils import unpair_preference_dataset

    return unpair_preference_dataset(dataset)
