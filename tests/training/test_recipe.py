"""The recipe: defaults that follow the base, batches that fit memory, stages sized to a budget."""

from __future__ import annotations

import pytest

from atelier.errors import AtelierError
from training.dapt import DaptConfig
from training.dpo import DpoConfig
from training.recipe import (
    EFFECTIVE_BATCH,
    MIN_STEPS,
    ModelShape,
    bytes_per_sequence,
    micro_batch,
    plan_budget,
    resolve_stage,
)
from training.sft import SftConfig

SMOLLM2 = ModelShape(parameters=134_515_008, layers=30, hidden=576, heads=9, vocab=49_152)


def test_scratch_bases_keep_step_counts_and_pretrained_ones_train_epochs():
    scratch = resolve_stage("sft", SftConfig(), scratch=True, full=False)
    assert (scratch.max_steps, scratch.learning_rate, scratch.batch_size) == (150, 2e-3, 8)
    pretrained = resolve_stage("sft", SftConfig(batch_size=2), scratch=False, full=False)
    assert pretrained.max_steps is None and pretrained.epochs == 1.0 and pretrained.learning_rate == 1e-3
    assert (scratch.logging_steps, pretrained.logging_steps) == (10, 1)  # a real base's step is slow: log each
    assert resolve_stage("dpo", DpoConfig(batch_size=2), scratch=False, full=False).learning_rate == 5e-5
    assert resolve_stage("dapt", DaptConfig(batch_size=2), scratch=False, full=True).learning_rate == pytest.approx(5e-4)


def test_what_the_user_sets_wins():
    config = resolve_stage("dapt", DaptConfig(max_steps=7, learning_rate=1e-3, batch_size=3, logging_steps=5),
                           scratch=False, full=False)
    assert (config.max_steps, config.learning_rate, config.batch_size, config.epochs) == (7, 1e-3, 3, None)
    assert config.logging_steps == 5


def test_memory_estimate_matches_what_smollm2_used_here():
    """~1.5 GB per 256-token sequence was measured for SmolLM2-135M LoRA training on this CPU."""
    assert 1.1e9 < bytes_per_sequence(SMOLLM2, 256) < 1.9e9
    assert bytes_per_sequence(SMOLLM2, 512) > 2 * bytes_per_sequence(SMOLLM2, 256)


def test_micro_batch_follows_free_memory_and_refuses_what_cannot_fit(smollm2_base):
    gib = 1024 ** 3
    assert micro_batch(smollm2_base, 256, full=False, available=64 * gib) == EFFECTIVE_BATCH
    assert micro_batch(smollm2_base, 256, full=False, available=6 * gib) in (1, 2)
    with pytest.raises(AtelierError, match="lower seq_len"):
        micro_batch(smollm2_base, 4096, full=False, available=4 * gib)


def test_budget_gives_each_stage_the_same_share_of_an_epoch():
    tokens = {"dapt": 40_000, "sft": 100_000, "dpo": 60_000}
    rows = {"dapt": 160, "sft": 400, "dpo": 500}
    plans = plan_budget(600 + 60, tokens, rows, tokens_per_s=100, effective_batch={s: 8 for s in tokens},
                        max_epochs={s: 1.0 for s in tokens})
    shares = {s: p.epochs for s, p in plans.items()}
    assert len(set(shares.values())) == 1 and 0 < shares["sft"] < 1
    assert sum(p.seconds for p in plans.values()) == pytest.approx(600, rel=0.01)
    assert plans["sft"].max_steps == int(shares["sft"] * 400 / 8)
    roomy = plan_budget(10_000, tokens, rows, 100, {s: 8 for s in tokens}, {s: 1.0 for s in tokens})
    assert all(p.epochs == 1.0 for p in roomy.values())  # never more than the recipe's epochs


def test_a_budget_too_tight_for_every_stage_leaves_dpo_then_dapt_out():
    tokens = {"dapt": 40_000, "sft": 100_000, "dpo": 60_000}
    rows = {"dapt": 160, "sft": 400, "dpo": 500}
    batches, epochs = {s: 8 for s in tokens}, {s: 1.0 for s in tokens}
    every = plan_budget(60 + 1200, tokens, rows, 100, batches, epochs)
    assert set(every) == {"dapt", "sft", "dpo"} and min(p.max_steps for p in every.values()) >= MIN_STEPS
    two = plan_budget(360, tokens, rows, 100, batches, epochs)  # equal shares would give dapt 2 steps
    assert list(two) == ["dapt", "sft"] and all(p.max_steps >= MIN_STEPS for p in two.values())
    assert sum(p.seconds for p in two.values()) == pytest.approx(360 - 2 * 20, rel=0.01)  # dpo's time goes to them
    one = plan_budget(150, tokens, rows, 100, batches, epochs)
    assert list(one) == ["sft"] and one["sft"].max_steps >= 2
    assert list(plan_budget(45, {"dpo": 60_000}, {"dpo": 500}, 100, {"dpo": 8}, {"dpo": 1.0})) == ["dpo"]


def test_a_budget_that_leaves_no_training_time_is_a_clear_error():
    with pytest.raises(AtelierError, match="larger --budget"):
        plan_budget(15, {"sft": 1000}, {"sft": 10}, 100, {"sft": 8}, {"sft": 1.0})


def test_evaluation_is_cut_to_its_share_of_a_small_budget():
    from eval.specialist import SpecialistEvalConfig
    from training.pipeline import scale_eval

    full = SpecialistEvalConfig()
    small = scale_eval(full, budget_s=8 * 60, train_tokens_per_s=60)
    assert small.max_mcq_items < full.max_mcq_items and small.max_mcq_items >= 40
    assert small.max_generation_items <= full.max_generation_items
    assert scale_eval(full, budget_s=10 * 3600, train_tokens_per_s=60) == full


def test_a_stage_stops_at_its_time_limit_and_keeps_what_it_trained(tiny_base, small_data, tmp_path):
    from training.dapt import train_dapt
    from training.lora import LoraSettings

    config = DaptConfig(max_steps=500, seq_len=64, eval_heldout=False, save_steps=10_000)
    result = train_dapt(tiny_base, small_data, tmp_path / "out", config, LoraSettings(), time_limit_s=2.0)
    assert 1 <= result.steps < 500 and result.runtime_s < 15
    assert (result.model_path / "model.safetensors").is_file()
