"""SFT: loss only on assistant tokens, the adapter carried from DAPT, resume after SIGKILL, bad rows."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from atelier.errors import AtelierError
from training.dapt import DaptConfig, train_dapt
from training.lora import LoraSettings
from training.sft import SftConfig, build_sft_trainer, train_sft

ROOT = Path(__file__).resolve().parents[2]


def test_user_tokens_are_masked_out_of_the_loss(dapt_result, small_data, tmp_path):
    trainer = build_sft_trainer(dapt_result.model_path, small_data, tmp_path, SftConfig(seq_len=128, packing=False),
                                LoraSettings())
    tokenizer = trainer.processing_class
    row = json.loads((small_data / "sft" / "train.jsonl").read_text().splitlines()[0])
    batch = trainer.data_collator([trainer.train_dataset[0]])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    trained = [i for i, label in zip(ids, labels, strict=True) if label != -100]
    assert tokenizer.decode(trained).startswith(row["messages"][1]["content"] + "<|im_end|>")
    question = tokenizer(row["messages"][0]["content"], add_special_tokens=False)["input_ids"]
    start = next(i for i in range(len(ids)) if ids[i:i + len(question)] == question)
    assert all(label == -100 for label in labels[: start + len(question) + 2])  # role header, question, end of turn


def test_packed_rows_train_only_answers_and_keep_conversations_apart(dapt_result, small_data, tmp_path):
    trainer = build_sft_trainer(dapt_result.model_path, small_data, tmp_path, SftConfig(seq_len=128), LoraSettings())
    tokenizer = trainer.processing_class
    answers = {json.loads(line)["messages"][1]["content"]
               for line in (small_data / "sft" / "train.jsonl").read_text().splitlines()}
    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    assert len(rows) < len(answers)  # several conversations share a row
    batch = trainer.data_collator(rows[:2])
    assert "attention_mask" not in batch or batch["attention_mask"].all()  # padding-free
    positions, labels, ids = batch["position_ids"][0].tolist(), batch["labels"][0].tolist(), batch["input_ids"][0]
    starts = [i for i, p in enumerate(positions) if p == 0]
    assert len(starts) >= 2  # position ids restart at each conversation
    pieces = [tokenizer.decode([t for t, lab in zip(ids[a:b].tolist(), labels[a:b], strict=True) if lab != -100])
              for a, b in zip(starts, starts[1:] + [len(positions)], strict=True)]
    assert all(piece.endswith("<|im_end|>\n") for piece in pieces[:-1])  # each answer trained with its end of turn
    assert all(piece.removesuffix("\n").removesuffix("<|im_end|>") in answers for piece in pieces[:-1])


def test_a_template_without_generation_markers_trains(dapt_result, small_data, tmp_path):
    """SmolLM2, Llama 3 and Qwen templates carry no {% generation %} markers: SFT must still
    train on answers only."""
    from specialists.loading import load_tokenizer

    plain = tmp_path / "plain-template"
    import shutil

    shutil.copytree(dapt_result.model_path, plain)
    tokenizer = load_tokenizer(plain)
    tokenizer.chat_template = (
        "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}"
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    tokenizer.save_pretrained(plain)
    config = SftConfig(max_steps=4, seq_len=128, packing=False, eval_heldout=False)
    trainer = build_sft_trainer(plain, small_data, tmp_path / "out", config, LoraSettings())
    row = json.loads((small_data / "sft" / "train.jsonl").read_text().splitlines()[0])
    batch = trainer.data_collator([trainer.train_dataset[0]])
    trained = [i for i, lab in zip(batch["input_ids"][0].tolist(), batch["labels"][0].tolist(), strict=True)
               if lab != -100]
    assert trainer.processing_class.decode(trained) == row["messages"][1]["content"] + "<|im_end|>\n"


def test_a_template_that_cannot_stop_is_refused_before_training(dapt_result, tmp_path):
    from specialists.loading import load_tokenizer
    from training.sft import check_chat_template

    tokenizer = load_tokenizer(dapt_result.model_path)
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + ' ' }}{% endfor %}"
    with pytest.raises(AtelierError, match="end-of-turn"):
        check_chat_template(tokenizer, "b")
    tokenizer.chat_template = "{{ messages[0]['nope'].x() }}"
    with pytest.raises(AtelierError, match="cannot render"):
        check_chat_template(tokenizer, "b")


def test_sft_trains_a_new_adapter_on_the_dapt_model(sft_result, dapt_result):
    assert sft_result.model_path == dapt_result.model_path  # SFT starts from the DAPT output
    assert (sft_result.adapter_path / "adapter_model.safetensors").is_file()
    assert sft_result.metrics["heldout_loss"] < sft_result.metrics["heldout_loss_before"]
    assert sft_result.steps == 30


def test_sft_continues_the_dapt_adapter(dapt_result, small_data, tmp_path):
    """On a LoRA base the DAPT adapter is loaded trainable: SFT starts from its weights."""
    from safetensors.torch import load_file

    dapt = train_dapt(dapt_result.model_path, small_data, tmp_path / "dapt",
                      DaptConfig(max_steps=3, seq_len=64, eval_heldout=False, learning_rate=1e-2), LoraSettings())
    trainer = build_sft_trainer(dapt.model_path, small_data, tmp_path / "sft", SftConfig(), LoraSettings(),
                                dapt.adapter_path)
    saved = load_file(str(dapt.adapter_path / "adapter_model.safetensors"))
    live = {name: p for name, p in trainer.model.named_parameters() if "lora_B" in name}
    assert live and all(p.requires_grad for p in live.values())
    name = next(n for n in saved if "lora_B" in n and "q_proj" in n)
    match = next(p for n, p in live.items() if n.replace(".default", "").endswith(name.split("model.", 1)[-1]))
    assert saved[name].abs().sum() > 0 and (match.detach() == saved[name]).all()


_CHILD = """
import sys, time
from pathlib import Path
from training.lora import LoraSettings
from training.sft import SftConfig, train_sft
base, data, out = map(Path, sys.argv[1:4])
config = SftConfig(max_steps=20, save_steps=5, logging_steps=1, seq_len=64, eval_heldout=False)
train_sft(base, data, out, config, LoraSettings(), None, progress=lambda *a, **k: time.sleep(0.3))
"""


def test_sft_resumes_after_sigkill(dapt_result, small_data, tmp_path, recorder):
    out = tmp_path / "sft"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    log = tmp_path / "child.log"
    with log.open("wb") as sink:
        child = subprocess.Popen([sys.executable, "-c", _CHILD, str(dapt_result.model_path), str(small_data), str(out)],
                                 cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoints" / "checkpoint-5" / "trainer_state.json").is_file():
            assert child.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint written in 120 s"
            time.sleep(0.2)
        time.sleep(0.5)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert not (out / "result.json").exists()

    config = SftConfig(max_steps=20, save_steps=5, logging_steps=1, seq_len=64, eval_heldout=False)
    result = train_sft(dapt_result.model_path, small_data, out, config, LoraSettings(), None, progress=recorder)
    assert result.resumed_from_step is not None and 5 <= result.resumed_from_step < 20
    assert recorder.calls[0][0] == result.resumed_from_step + 1  # the global step continues
    assert result.steps == 20 and (result.adapter_path / "adapter_model.safetensors").is_file()


def test_malformed_rows_are_named(dapt_result, tmp_path):
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "train.jsonl").write_text(json.dumps({"messages": "hello", "source": "x"}) + "\n")
    with pytest.raises(AtelierError, match="row 1 'messages' must be a list"):
        train_sft(dapt_result.model_path, tmp_path, tmp_path / "out", SftConfig(), LoraSettings())
    (tmp_path / "sft" / "train.jsonl").write_text("{not json\n")
    with pytest.raises(AtelierError, match="train.jsonl:1 is not valid JSON"):
        train_sft(dapt_result.model_path, tmp_path, tmp_path / "out", SftConfig(), LoraSettings())


def test_broken_adapter_is_refused(dapt_result, small_data, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(AtelierError, match="too small to hold real weights"):
        train_sft(dapt_result.model_path, small_data, tmp_path / "out", SftConfig(), LoraSettings(), adapter)


def test_packed_loss_equals_the_loss_of_each_conversation_alone(dapt_result, small_data, tmp_path):
    """Padding-free packing must not let a conversation attend to the one before it (the
    position ids keep them apart only when the forward pass runs without a KV cache)."""
    import torch

    trainer = build_sft_trainer(dapt_result.model_path, small_data, tmp_path, SftConfig(seq_len=128), LoraSettings())
    trainer.model.eval()
    for index in range(len(trainer.train_dataset)):
        batch = trainer.data_collator([trainer.train_dataset[index]])
        positions = batch["position_ids"][0].tolist()
        starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
        if len(starts) > 3:
            break
    with torch.no_grad():
        packed = float(trainer.compute_loss(trainer.model, dict(batch)))
        total, count = 0.0, 0
        for a, b in zip(starts, starts[1:]):
            alone = {"input_ids": batch["input_ids"][:, a:b], "labels": batch["labels"][:, a:b],
                     "position_ids": batch["position_ids"][:, a:b]}
            n = int((alone["labels"][:, 1:] != -100).sum())
            if n:
                total += float(trainer.compute_loss(trainer.model, alone)) * n
                count += n
    assert len(starts) > 2 and abs(packed - total / count) < 1e-3
