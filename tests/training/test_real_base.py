"""The stages on the real SmolLM2-135M base (converted from its installed GGUF): a couple of
optimizer steps each, to prove the real path — its ChatML template without generation markers,
packing, the pretrained recipe's defaults, an adapter carried from SFT into DPO."""

from __future__ import annotations

import json
import math

from training.dpo import DpoConfig, train_dpo
from training.lora import LoraSettings
from training.sft import SftConfig, build_sft_trainer, train_sft


def test_sft_then_dpo_on_smollm2(smollm2_base, small_data, tmp_path):
    config = SftConfig(max_steps=2, batch_size=1, seq_len=96, eval_heldout=False, logging_steps=1)
    sft = train_sft(smollm2_base, small_data, tmp_path / "sft", config, LoraSettings(r=4))
    assert sft.steps == 2 and math.isfinite(sft.train_loss_last)
    plan = json.loads((tmp_path / "sft" / "plan.json").read_text())
    assert plan["learning_rate"] == 1e-3  # the pretrained-LoRA default for SFT, not scratch's 2e-3
    dpo = train_dpo(smollm2_base, small_data, tmp_path / "dpo", DpoConfig(max_steps=1, batch_size=1, seq_len=96,
                                                                        eval_heldout=False),
                    LoraSettings(r=4), adapter=sft.adapter_path)
    assert dpo.steps == 1 and (dpo.adapter_path / "adapter_model.safetensors").is_file()


def test_smollm2_sft_trains_the_answer_and_its_end_of_turn_only(smollm2_base, small_data, tmp_path):
    config = SftConfig(max_steps=1, batch_size=1, seq_len=128, packing=False, eval_heldout=False)
    trainer = build_sft_trainer(smollm2_base, small_data, tmp_path, config, LoraSettings(r=4))
    row = json.loads((small_data / "sft" / "train.jsonl").read_text().splitlines()[0])
    batch = trainer.data_collator([trainer.train_dataset[0]])
    trained = [i for i, lab in zip(batch["input_ids"][0].tolist(), batch["labels"][0].tolist(), strict=True)
               if lab != -100]
    text = trainer.processing_class.decode(trained)
    assert text == row["messages"][1]["content"] + "<|im_end|>\n"
    assert "SmolLM" in trainer.processing_class.decode(batch["input_ids"][0])  # the template's own system turn
