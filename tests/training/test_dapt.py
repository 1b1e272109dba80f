"""DAPT: packing, pretraining from scratch lowers held-out perplexity, reuse, LoRA on other bases, errors."""

from __future__ import annotations

import json

import pytest

from atelier.errors import AtelierError
from specialists.loading import load_tokenizer
from training.dapt import DaptConfig, PadCollator, to_blocks, train_dapt
from training.lora import LoraSettings


def test_packing_fills_blocks_and_keeps_every_token(tiny_base, texts):
    tokenizer = load_tokenizer(tiny_base)
    sample = texts[:3]
    total = sum(len(ids) + 1 for ids in tokenizer(sample, add_special_tokens=False)["input_ids"])  # +1: eos
    packed = to_blocks(sample, tokenizer, 128, packing=True)
    unpacked = to_blocks(sample, tokenizer, 128, packing=False)
    assert all(len(b["input_ids"]) == 128 for b in packed[:-1])
    assert sum(len(b["input_ids"]) for b in packed) == sum(len(b["input_ids"]) for b in unpacked) == total
    assert len(unpacked) > len(packed)  # one short, padded tail per document
    batch = PadCollator(tokenizer.pad_token_id)([unpacked[0], {"input_ids": [5, 6, 7]}])
    assert batch["attention_mask"][1].tolist() == [1, 1, 1] + [0] * 125
    assert (batch["labels"][1, 3:] == -100).all() and batch["labels"][1, :3].tolist() == [5, 6, 7]


def test_pretraining_from_scratch_lowers_heldout_perplexity(dapt_run):
    result = dapt_run.result
    before, after = result.metrics["heldout_perplexity_before"], result.metrics["heldout_perplexity"]
    assert after < before / 4, (before, after)
    assert result.train_loss_last < result.train_loss_first - 1.0
    assert result.steps == 40 and result.resumed_from_step is None and result.tokens_per_s > 0
    # A scratch base is trained in full: its output is a model directory, not an adapter.
    assert result.adapter_path is None and (result.model_path / "model.safetensors").is_file()
    assert load_tokenizer(result.model_path).chat_template  # the next stages need the template
    assert not (dapt_run.out_dir / "checkpoints").exists()  # dropped once the result is saved
    steps = [step for step, _, _ in dapt_run.calls]
    assert steps == list(range(1, 41)) and {total for _, total, _ in dapt_run.calls} == {40}
    assert dapt_run.calls[-1][2] is not None


def test_finished_stage_is_returned_without_training(dapt_run, tiny_base, small_data, recorder):
    again = train_dapt(tiny_base, small_data, dapt_run.out_dir, dapt_run.config, LoraSettings(), progress=recorder)
    assert again == dapt_run.result and recorder.calls == []
    saved = json.loads((dapt_run.out_dir / "result.json").read_text())
    assert saved["stage"] == "dapt" and saved["steps"] == 40


def test_same_out_dir_with_other_inputs_is_refused(dapt_run, tiny_base, small_data):
    changed = dapt_run.config.model_copy(update={"max_steps": 41})
    with pytest.raises(AtelierError, match="different inputs"):
        train_dapt(tiny_base, small_data, dapt_run.out_dir, changed, LoraSettings())


def test_other_bases_get_a_lora_adapter(dapt_result, small_data, tmp_path):
    """The DAPT output is an ordinary Hugging Face model dir, so DAPT on it trains an adapter."""
    config = DaptConfig(max_steps=3, seq_len=64, logging_steps=1, eval_heldout=False)
    result = train_dapt(dapt_result.model_path, small_data, tmp_path / "out", config, LoraSettings(r=4))
    assert result.model_path == dapt_result.model_path
    assert (result.adapter_path / "adapter_model.safetensors").is_file()
    assert json.loads((result.adapter_path / "adapter_config.json").read_text())["r"] == 4


def test_unpacked_training_runs(tiny_base, small_data, tmp_path):
    config = DaptConfig(max_steps=2, seq_len=64, packing=False, eval_heldout=False)
    result = train_dapt(tiny_base, small_data, tmp_path / "out", config, LoraSettings())
    assert result.steps == 2 and result.train_loss_first is not None


def test_missing_or_empty_data_names_the_file(tiny_base, tmp_path):
    config = DaptConfig(max_steps=1)
    with pytest.raises(AtelierError, match=r"dapt/train.jsonl not found"):
        train_dapt(tiny_base, tmp_path, tmp_path / "out", config, LoraSettings())
    (tmp_path / "dapt").mkdir()
    (tmp_path / "dapt" / "train.jsonl").write_text("\n")
    with pytest.raises(AtelierError, match=r"dapt/train.jsonl is empty"):
        train_dapt(tiny_base, tmp_path, tmp_path / "out", config, LoraSettings())
    (tmp_path / "dapt" / "train.jsonl").write_text('{"source": "a.md"}\n')
    with pytest.raises(AtelierError, match=r"train.jsonl:1 has no text"):
        train_dapt(tiny_base, tmp_path, tmp_path / "out", config, LoraSettings())
