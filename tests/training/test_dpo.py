"""DPO: the SFT adapter is both the start and the reference, rewards are reported, alternatives run."""

from __future__ import annotations

import json

import pytest

from atelier.errors import AtelierError
from training.dpo import DpoConfig, build_dpo_trainer, train_dpo
from training.lora import LoraSettings

FAST = {"seq_len": 128, "logging_steps": 1, "save_steps": 50}


def test_reference_is_the_sft_adapter(sft_result, small_data, tmp_path):
    """Policy and reference both start as the SFT adapter, so the first step's rewards are exactly 0."""
    from safetensors.torch import load_file

    config = DpoConfig(max_steps=2, eval_heldout=False, **FAST)
    trainer = build_dpo_trainer(sft_result.model_path, small_data, tmp_path, config, LoraSettings(),
                                sft_result.adapter_path)
    saved = load_file(str(sft_result.adapter_path / "adapter_model.safetensors"))
    weights = {name: p for name, p in trainer.model.named_parameters() if ".default." in name and "lora_B" in name}
    refs = {name: p for name, p in trainer.model.named_parameters() if ".ref." in name}
    assert refs and not any(p.requires_grad for p in refs.values())
    assert float(sum(p.detach().abs().sum() for p in weights.values())) == pytest.approx(
        float(sum(t.abs().sum() for n, t in saved.items() if "lora_B" in n)), rel=1e-6)
    trainer.train()
    first = trainer.state.log_history[0]
    assert first["step"] == 1
    assert first["rewards/chosen"] == pytest.approx(0, abs=1e-5)
    assert first["rewards/margins"] == pytest.approx(0, abs=1e-5)


def test_dpo_continues_the_sft_adapter_and_reports_rewards(sft_result, small_data, tmp_path):
    config = DpoConfig(max_steps=12, learning_rate=2e-3, **FAST)
    result = train_dpo(sft_result.model_path, small_data, tmp_path / "out", config, LoraSettings(),
                       sft_result.adapter_path)
    assert result.stage == "dpo" and result.steps == 12 and result.model_path == sft_result.model_path
    for key in ("train_rewards_accuracies", "train_rewards_margins", "heldout_rewards_accuracies",
                "heldout_rewards_margins", "heldout_loss"):
        assert key in result.metrics, result.metrics
    assert result.metrics["train_rewards_margins"] > 0  # chosen answers gained on rejected ones
    # Only the trained adapter travels on; the frozen reference copy stays behind.
    assert (result.adapter_path / "adapter_model.safetensors").is_file()
    assert not (result.adapter_path / "ref").exists()
    assert json.loads((result.adapter_path / "adapter_config.json").read_text())["r"] == 16


@pytest.mark.parametrize("preference", ["simpo", "orpo", "kto"])
def test_preference_alternatives_run(preference, sft_result, small_data, tmp_path):
    config = DpoConfig(preference=preference, max_steps=2, eval_heldout=False, **FAST)
    result = train_dpo(sft_result.model_path, small_data, tmp_path / "out", config, LoraSettings(),
                       sft_result.adapter_path)
    assert result.steps == 2 and result.train_loss_first is not None
    assert (result.adapter_path / "adapter_model.safetensors").is_file()


def test_loss_type_belongs_to_dpo(sft_result, small_data, tmp_path):
    with pytest.raises(AtelierError, match="preference=dpo only"):
        train_dpo(sft_result.model_path, small_data, tmp_path / "out",
                  DpoConfig(preference="orpo", loss_type="ipo"), LoraSettings(), sft_result.adapter_path)


def test_malformed_pairs_are_named(sft_result, tmp_path):
    (tmp_path / "dpo").mkdir()
    row = {"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": [{"role": "assistant"}]}
    (tmp_path / "dpo" / "train.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(AtelierError, match="row 1 'chosen' must be a list"):
        train_dpo(sft_result.model_path, tmp_path, tmp_path / "out", DpoConfig(), LoraSettings(),
                  sft_result.adapter_path)
