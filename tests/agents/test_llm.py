"""The orchestrator model's layer: names, bounds, and SmolLM2 served by the embedded llama.cpp."""

from __future__ import annotations

import itertools

import pytest
from langchain_core.messages import HumanMessage

from agents.llm import ModelConfig, bounded_stream, load_chat_model, looping
from atelier.errors import AtelierError
from atelier.redact import redact_url
from atelier.servers import ServerConfig, endpoint, ollama_host, parse_model, probe
from tests.conftest import SMOLLM2


def test_one_parser_for_every_provider():
    assert parse_model("ollama:qwen2.5:7b").model == "qwen2.5:7b"
    assert parse_model("ollama:pumps:v3@http://gpu:11434") == parse_model("ollama:pumps:v3@http://gpu:11434/")
    assert parse_model("ollama:pumps:v3@http://gpu:11434").url == "http://gpu:11434"
    assert parse_model("openai:a@b").model == "a@b"  # an @ without a URL belongs to the model name
    assert parse_model("llamacpp:/x/m.gguf").provider == "llamacpp"
    for bad in ("qwen", "vllm:x", "ollama:", ""):
        with pytest.raises(AtelierError, match="provider:model"):
            parse_model(bad)


def test_ollama_host_and_redaction(monkeypatch):
    monkeypatch.setenv("OLLAMA_HOST", "gpu-box:11434")
    assert ollama_host() == "http://gpu-box:11434"
    assert ollama_host("https://x/") == "https://x"
    assert redact_url("https://user:secret@host:8000/v1?key=abc") == "https://host:8000/v1"


def test_unknown_gguf_names_the_fix(tmp_path):
    with pytest.raises(AtelierError, match="llamacpp:PATH.gguf"):
        endpoint(ServerConfig(name="llamacpp:no-such-model"))
    with pytest.raises(AtelierError, match="not found"):
        endpoint(ServerConfig(name=f"llamacpp:{tmp_path}/missing.gguf"))


def test_probe_reports_an_unreachable_server():
    ep = endpoint(ServerConfig(name="openai:m", base_url="http://127.0.0.1:9"))
    assert "not reachable" in probe(ep, timeout=1)


def test_unreachable_model_means_router_only():
    assert load_chat_model(ModelConfig(name="openai:m", base_url="http://127.0.0.1:9")) is None
    assert load_chat_model(ModelConfig()) is None


def test_loop_detection():
    assert looping("The answer is 80 N·m. " + "I am sorry. " * 3)
    assert looping("a\nsame line here\nsame line here\nsame line here")
    assert not looping("The tightening torque of the HX-65 impeller nut is 80 N·m [1]. Use a new tab washer.")


def test_bounded_stream_stops_a_loop_and_a_slow_answer():
    loop = bounded_stream(itertools.repeat("again and again. "), time_limit_s=60)
    assert loop.finish == "loop" and len(loop.text) < 400
    ticks = itertools.count()
    slow = bounded_stream(iter(["a ", "b ", "c ", "d "]), time_limit_s=1.5, clock=lambda: next(ticks))
    assert slow.finish == "time" and slow.text == "a b "


def test_smollm2_on_llamacpp_answers_within_bounds(smollm2):
    model = load_chat_model(ModelConfig(name=SMOLLM2, max_tokens=16))
    assert model.name == SMOLLM2 and model.tools is False  # SmolLM2's template has no tool section
    assert "<|im_end|>" in model.stop
    written = bounded_stream(model.chat.stream([HumanMessage("Say hello.")]), time_limit_s=60)
    assert written.text.strip() and written.finish in ("stop", "length", "loop")
    assert len(written.text) < 200  # 16 tokens
