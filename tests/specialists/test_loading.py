"""The one loader: the device picker's order, and a base with its adapter attached, merged or stacked."""

from __future__ import annotations

import pytest
import torch

from atelier.errors import AtelierError
from specialists.loading import load_model, load_tokenizer, pick_device
from tests.tinymodels import build_adapter, build_base, build_tokenizer


def test_an_explicit_device_wins_then_cuda_then_mps_then_cpu(monkeypatch):
    assert pick_device("cuda:1") == "cuda:1" and pick_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert pick_device() == "cpu"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert pick_device("auto") == "mps"  # the eval picker used to skip MPS
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device() == "cuda"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("loading")
    base = build_base(root / "base", build_tokenizer(), seed=0)
    return base, build_adapter(base, root / "one", seed=1), build_adapter(base, root / "two", seed=2)


def test_attached_merged_and_stacked_adapters_give_the_same_logits(tiny):
    base, one, two = tiny
    ids = torch.tensor([load_tokenizer(base)("the pump lost suction")["input_ids"]])
    with torch.inference_mode():
        plain = load_model(base, device="cpu")(ids).logits
        attached = load_model(base, one, device="cpu")
        merged = load_model(base, one, merge=True, device="cpu")
        assert type(attached).__name__ == "PeftModel" and type(merged).__name__ != "PeftModel"
        assert not attached.training and merged.dtype == torch.float32
        assert torch.allclose(attached(ids).logits, merged(ids).logits, atol=1e-5)
        assert not torch.allclose(plain, merged(ids).logits, atol=1e-3)  # the adapter does something
        stacked = load_model(base, [one, two], device="cpu")  # one merged, two attached on top
        both = load_model(base, [one, two], merge=True, device="cpu")
        assert torch.allclose(stacked(ids).logits, both(ids).logits, atol=1e-4)
        assert not torch.allclose(both(ids).logits, merged(ids).logits, atol=1e-3)


def test_a_missing_model_or_adapter_is_a_clear_error(tiny, tmp_path):
    base, _, _ = tiny
    with pytest.raises(AtelierError, match="cannot load model .*; it must be on this machine"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AtelierError, match="adapter_config.json"):
        load_model(base, tmp_path / "empty")
