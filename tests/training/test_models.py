"""Bases, loading, precision and LoRA settings: offline, on the real tiny scratch model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from atelier.errors import AtelierError
from specialists.loading import BASE_MARKER, load_model, load_tokenizer, pick_device
from specialists.registry import validate_adapter
from training.lora import LoraSettings
from training.models import is_scratch_base, precision_kwargs, resolve_base


def _files(path):
    return {name: (path / name).read_bytes() for name in ("model.safetensors", "tokenizer.json")}


def test_scratch_base_is_deterministic_per_seed(tmp_path, texts):
    texts = texts[:3]
    first = resolve_base("scratch:tiny", work_dir=tmp_path / "a", corpus_texts=texts, seed=0)
    again = resolve_base("scratch:tiny", work_dir=tmp_path / "b", corpus_texts=texts, seed=0)
    other = resolve_base("scratch:tiny", work_dir=tmp_path / "c", corpus_texts=texts, seed=1)
    assert _files(first) == _files(again)
    assert _files(other)["tokenizer.json"] == _files(first)["tokenizer.json"]
    assert _files(other)["model.safetensors"] != _files(first)["model.safetensors"]


def test_scratch_base_is_reused_until_its_inputs_change(tmp_path, texts):
    texts = texts[:2]
    path = resolve_base("scratch:tiny", work_dir=tmp_path / "base", corpus_texts=texts, seed=0)
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    resolve_base("scratch:tiny", work_dir=tmp_path / "base", corpus_texts=texts, seed=0)
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    resolve_base("scratch:tiny", work_dir=tmp_path / "base", corpus_texts=texts[:1], seed=0)
    assert (path / "model.safetensors").stat().st_mtime_ns != stamp


def test_scratch_tiny_has_chat_template_with_assistant_mask(tiny_base):
    tokenizer = load_tokenizer(tiny_base)
    model = load_model(tiny_base)
    assert 1_000_000 <= model.num_parameters() <= 3_000_000
    assert model.config.model_type == "llama" and is_scratch_base(tiny_base)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|pad|>"
    assert "{% generation %}" in tokenizer.chat_template
    messages = [{"role": "user", "content": "How is the impeller nut tightened?"},
                {"role": "assistant", "content": "To 95 N·m with thread locker."}]
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    answer = [tok for tok, keep in zip(out["input_ids"], out["assistant_masks"], strict=True) if keep]
    assert tokenizer.decode(answer) == "To 95 N·m with thread locker.<|im_end|>"


def test_local_model_without_chat_template_gets_one(tmp_path, tiny_base):
    bare = tmp_path / "bare"
    shutil.copytree(tiny_base, bare)
    (bare / BASE_MARKER).unlink()
    (bare / "chat_template.jinja").unlink()
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    assert not load_tokenizer(bare).chat_template

    resolved = resolve_base(str(bare), work_dir=tmp_path / "work", corpus_texts=None, seed=0)
    assert resolved == tmp_path / "work"
    tokenizer = load_tokenizer(resolved)
    assert "{% generation %}" in tokenizer.chat_template and not is_scratch_base(resolved)
    messages = [{"role": "user", "content": "Which oil?"}, {"role": "assistant", "content": "ISO VG 68."}]
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    answer = [tok for tok, keep in zip(out["input_ids"], out["assistant_masks"], strict=True) if keep]
    assert tokenizer.decode(answer) == "ISO VG 68." + tokenizer.eos_token
    # A model that has a template is used where it lies.
    assert resolve_base(str(tiny_base), work_dir=tmp_path / "unused", corpus_texts=None, seed=0) == tiny_base
    assert not (tmp_path / "unused").exists()


def test_missing_local_path_is_a_clear_error(tmp_path):
    with pytest.raises(AtelierError, match="does not exist"):
        resolve_base(str(tmp_path / "nope"), work_dir=tmp_path / "w", corpus_texts=None, seed=0)


def test_non_causal_model_is_refused(tmp_path):
    from transformers import BertConfig, T5Config

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
               architectures=["BertForMaskedLM"]).save_pretrained(tmp_path / "bert")
    T5Config(d_model=32, num_layers=1, num_heads=2).save_pretrained(tmp_path / "t5")
    for name in ("bert", "t5"):
        with pytest.raises(AtelierError, match="not a causal language model"):
            resolve_base(str(tmp_path / name), work_dir=tmp_path / "w", corpus_texts=None, seed=0)


def test_folder_without_model_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(AtelierError, match="no config.json"):
        resolve_base(str(tmp_path / "empty"), work_dir=tmp_path / "w", corpus_texts=None, seed=0)


def test_hub_id_offline_names_the_way_out(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(AtelierError, match="hub is unreachable; pass a local path or scratch:tiny"):
        resolve_base("atelier-tests/no-such-model", work_dir=tmp_path / "w", corpus_texts=None, seed=0)


def test_unknown_scratch_size(tmp_path):
    with pytest.raises(AtelierError, match="scratch:tiny"):
        resolve_base("scratch:huge", work_dir=tmp_path, corpus_texts=[], seed=0)


@pytest.mark.skipif(pick_device() != "cpu", reason="checks the CPU settings")
def test_cpu_precision_is_fp32_even_for_trl_configs(tmp_path):
    from trl import DPOConfig, SFTConfig

    from training.sft import SftConfig
    from training.trainer_common import training_kwargs

    assert precision_kwargs() == {"bf16": False, "fp16": False, "use_cpu": True}
    for cls in (SFTConfig, DPOConfig):  # both default to bf16=True when not told
        args = cls(**training_kwargs(SftConfig(max_steps=2, learning_rate=1e-4, batch_size=2), tmp_path, None))
        assert (args.bf16, args.fp16, args.use_cpu, args.activation_checkpointing) == (False, False, True, False)


def test_a_short_run_spends_no_step_at_learning_rate_zero(tmp_path):
    """transformers rounds a warmup fraction up: 1 warmup step of 2 is a step at lr 0. Fractions round down here."""
    import torch
    from transformers import TrainingArguments, get_scheduler

    from training.sft import SftConfig
    from training.trainer_common import training_kwargs

    def first_rates(max_steps: int, warmup: float) -> list[float]:
        config = SftConfig(max_steps=max_steps, learning_rate=1e-3, batch_size=2, warmup_steps=warmup)
        args = TrainingArguments(**training_kwargs(config, tmp_path, None))
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.learning_rate)
        scheduler = get_scheduler(args.lr_scheduler_type, optimizer, args.get_warmup_steps(max_steps), max_steps)
        rates = []
        for _ in range(2):
            rates.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
        return rates

    assert first_rates(2, 0.05)[0] == pytest.approx(1e-3)  # no warmup under 20 steps
    assert first_rates(100, 0.05) == [0.0, pytest.approx(1e-3 / 5)]  # 5 warmup steps of 100
    assert first_rates(2, 1)[0] == 0.0  # an explicit step count is kept as given


def test_adapter_without_weights_is_refused(tmp_path, tiny_base):
    from safetensors.torch import save_file

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    with pytest.raises(AtelierError, match="adapter_config.json"):
        load_model(tiny_base, adapter)
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(AtelierError, match="no adapter_model.safetensors"):
        validate_adapter(adapter)
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(AtelierError, match="too small to hold real weights"):
        load_model(tiny_base, adapter, trainable=True)
    save_file({}, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(AtelierError, match="too small to hold real weights"):
        validate_adapter(adapter)


def test_lora_settings_are_documented_and_strict():
    from pydantic import ValidationError

    assert all(field.description for field in LoraSettings.model_fields.values())
    assert LoraSettings().target_modules == "all-linear"
    with pytest.raises(ValidationError):
        LoraSettings(rank=8)


@pytest.mark.skipif(pick_device() == "cuda", reason="checks the no-GPU message")
def test_qlora_without_cuda_says_why():
    with pytest.raises(AtelierError, match="CUDA"):
        LoraSettings(method="qlora").check_available()


def test_smollm2_gguf_base_is_converted_once_with_its_template(smollm2_base, tmp_path, monkeypatch):
    """`--base smollm2-135m` resolves to the GGUF in its package, dequantised into safetensors."""
    import json

    from specialists.loading import BASE_MARKER, load_tokenizer
    from training.sft import check_chat_template

    marker = json.loads((smollm2_base / BASE_MARKER).read_text())
    assert marker["kind"] == "gguf" and marker["parameters"] > 130_000_000
    assert (smollm2_base / "model.safetensors").stat().st_size > 500_000_000
    tokenizer = load_tokenizer(smollm2_base)
    assert "<|im_start|>" in tokenizer.chat_template
    check_chat_template(tokenizer, smollm2_base)  # no generation markers, yet SFT can train on it
    # the same file passed as a path, or its folder, finds the same converted base without converting again
    monkeypatch.setenv("ATELIER_HOME", str(smollm2_base.parents[1]))
    mtime = (smollm2_base / "model.safetensors").stat().st_mtime_ns
    again = resolve_base(marker["gguf"], work_dir=tmp_path / "w", corpus_texts=None, seed=0)
    folder = resolve_base(str(Path(marker["gguf"]).parent), work_dir=tmp_path / "w", corpus_texts=None, seed=0)
    assert again == folder == smollm2_base
    assert (smollm2_base / "model.safetensors").stat().st_mtime_ns == mtime


def test_a_broken_gguf_is_a_clear_error(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(AtelierError, match="cannot load"):
        resolve_base(str(bad), work_dir=tmp_path / "w", corpus_texts=None, seed=0)
    (tmp_path / "two").mkdir()
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / "two" / name).write_bytes(b"GGUF")
    with pytest.raises(AtelierError, match="holds 2 .gguf files"):
        resolve_base(str(tmp_path / "two"), work_dir=tmp_path / "w", corpus_texts=None, seed=0)
