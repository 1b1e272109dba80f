"""Served specialists against real HTTP servers on 127.0.0.1 (stdlib http.server in a thread)
speaking Ollama's /api/chat NDJSON stream and OpenAI's chat.completion.chunk SSE stream."""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

from atelier.errors import AtelierError
from specialists.generation import GenerationParams
from specialists.registry import Registry
from specialists.runtime import RuntimeConfig, SpecialistRuntime
from specialists.served import OllamaBackend, OpenAICompatibleBackend, backend_for, parse_served_by

ASK = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello?"}]


# ----------------------------------------------------------------------------- a scriptable HTTP server


@pytest.fixture
def server():
    """A real HTTP server. Set `server.reply = fn(handler, body)`; requests land in `server.requests`.

    Ollama's /api/show is answered apart: with `server.show` (a dict) when set, else 404 as an
    old server would; those requests land in `server.shows`.
    """
    state = SimpleNamespace(requests=[], shows=[], reply=None, show=None)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path == "/api/show":
                state.shows.append(body)
                return send_error(self, 200, state.show) if state.show else send_error(self, 404, {"error": "no"})
            state.requests.append(SimpleNamespace(path=self.path, body=body, headers={k.lower(): v for k, v in self.headers.items()}))
            state.reply(self, body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield state
    httpd.shutdown()
    httpd.server_close()


def send_stream(handler: BaseHTTPRequestHandler, content_type: str, pieces: list[str],
                pause: Callable[[int], None] = lambda i: None) -> None:
    handler.send_response(200)
    handler.send_header("Content-Type", content_type)
    handler.end_headers()
    for i, piece in enumerate(pieces):
        pause(i)
        handler.wfile.write(piece.encode())
        handler.wfile.flush()


def send_error(handler: BaseHTTPRequestHandler, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


def ollama_lines(texts: list[str], done_reason: str = "stop", prompt: int = 12, completion: int | None = None):
    parts = [json.dumps({"model": "m", "created_at": "2025-01-01T00:00:00Z",
                         "message": {"role": "assistant", "content": t}, "done": False}) + "\n" for t in texts]
    parts.append(json.dumps({"model": "m", "created_at": "2025-01-01T00:00:01Z", "message": {"role": "assistant",
                             "content": ""}, "done": True, "done_reason": done_reason, "prompt_eval_count": prompt,
                             "eval_count": completion if completion is not None else len(texts)}) + "\n")
    return parts


def sse_events(texts: list[str], finish: str = "stop", usage: tuple[int, int] | None = (9, 4)):
    def chunk(delta: dict, finish_reason=None, choices=True):
        body = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}] if choices else []}
        return body

    events = [chunk({"role": "assistant", "content": ""})] + [chunk({"content": t}) for t in texts]
    events.append(chunk({}, finish))
    if usage:
        events.append({**chunk({}, choices=False), "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1],
                                                             "total_tokens": sum(usage)}})
    return [f"data: {json.dumps(e)}\n\n" for e in events] + ["data: [DONE]\n\n"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- parsing served_by


def test_parse_served_by(monkeypatch):
    monkeypatch.delenv("OLLAMA_HOST", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    assert parse_served_by("ollama:pumps") == ("ollama", "pumps", "http://127.0.0.1:11434")
    assert parse_served_by("ollama:qwen2.5:7b@http://gpu:11434/") == ("ollama", "qwen2.5:7b", "http://gpu:11434")
    assert parse_served_by("openai:org/m@v2@https://h:8000/v1") == ("openai", "org/m@v2", "https://h:8000/v1")
    monkeypatch.setenv("OLLAMA_HOST", "10.0.0.5:11434")
    assert parse_served_by("ollama:qwen2.5:7b").url == "http://10.0.0.5:11434"
    with pytest.raises(AtelierError, match="OPENAI_BASE_URL"):
        parse_served_by("openai:m")
    for bad in ("vllm:m@http://h/v1", "ollama:", "pumps"):
        with pytest.raises(AtelierError, match="not understood"):
            parse_served_by(bad)
    assert isinstance(backend_for("openai:m@http://h:1/v1"), OpenAICompatibleBackend)


# ----------------------------------------------------------------------------- Ollama


def test_ollama_streams_ndjson_and_always_sends_num_ctx(server):
    gate = threading.Event()
    server.gate_was_open = None

    def reply(handler, body):
        def pause(i):  # hold the rest back until the client has shown the first delta
            if i == 1:
                server.gate_was_open = gate.wait(10)
        send_stream(handler, "application/x-ndjson", ollama_lines(["Hel", "lo wor", "ld <EN", "D> never shown"]), pause)

    server.reply = reply
    backend = OllamaBackend("pumps", server.url, num_ctx=4096)
    params = GenerationParams(max_tokens=7, temperature=0.2, top_p=0.9, stop=["<END>"], seed=5)

    stream = backend.stream(ASK, params)
    first = next(stream)
    gate.set()
    deltas = [first, *stream]

    assert "".join(deltas) == stream.generation.text == "Hello world "
    assert server.gate_was_open is True  # really streamed: the first delta arrived before the rest was sent
    assert stream.generation.finish_reason == "stop"
    (request,) = server.requests
    assert request.path == "/api/chat" and request.body["model"] == "pumps" and request.body["stream"] is True
    assert request.body["messages"] == ASK
    assert request.body["options"] == {"num_ctx": 4096, "num_predict": 7, "temperature": 0.2, "top_p": 0.9,
                                       "stop": ["<END>"], "seed": 5}


def test_ollama_num_ctx_is_capped_by_the_models_own_window(server):
    server.reply = lambda h, body: send_stream(h, "application/x-ndjson", ollama_lines(["ok"]))
    server.show = {"parameters": 'stop "<|im_end|>"\nnum_ctx                        512',
                   "model_info": {"general.architecture": "llama", "llama.context_length": 2048}}
    backend = OllamaBackend("tiny", server.url, num_ctx=8192)
    backend.generate(ASK)
    backend.generate(ASK)
    assert [r.body["options"]["num_ctx"] for r in server.requests] == [512, 512]  # the Modelfile's num_ctx
    assert server.shows == [{"model": "tiny"}]  # asked once

    server.show = {"parameters": "", "model_info": {"llama.context_length": 2048}}
    OllamaBackend("other", server.url, num_ctx=8192).generate(ASK)
    assert server.requests[-1].body["options"]["num_ctx"] == 2048  # else the trained context length
    OllamaBackend("other", server.url, num_ctx=1024).generate(ASK)
    assert server.requests[-1].body["options"]["num_ctx"] == 1024  # never above the configured window


def test_ollama_length_and_usage(server):
    server.reply = lambda h, body: send_stream(h, "application/x-ndjson",
                                               ollama_lines(["a", "b", "c"], "length", prompt=21, completion=3))
    result = OllamaBackend("pumps", server.url).generate(ASK, GenerationParams(max_tokens=3))
    assert (result.text, result.finish_reason) == ("abc", "length")
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (21, 3)
    assert server.requests[0].body["options"]["num_ctx"] == 8192  # the default is sent too


def test_ollama_missing_model_says_how_to_pull_it(server):
    server.reply = lambda h, body: send_error(h, 404, {"error": "model 'pumps' not found"})
    with pytest.raises(AtelierError, match="ollama pull pumps"):
        OllamaBackend("pumps", server.url).generate(ASK)


# ----------------------------------------------------------------------------- OpenAI-compatible


def test_openai_sse_stream(server):
    server.reply = lambda h, body: send_stream(h, "text/event-stream", sse_events(["The ", "pump ", "is ok"], "length"))
    backend = OpenAICompatibleBackend("pumps", f"{server.url}/v1", api_key="sk-test")
    params = GenerationParams(max_tokens=3, stop=["###"], seed=1)

    stream = backend.stream(ASK, params)
    deltas = list(stream)

    assert deltas == ["The ", "pump ", "is ok"]
    assert stream.generation.finish_reason == "length"
    assert (stream.generation.usage.prompt_tokens, stream.generation.usage.completion_tokens) == (9, 4)
    (request,) = server.requests
    assert request.path == "/v1/chat/completions" and request.headers["authorization"] == "Bearer sk-test"
    assert request.body == {"model": "pumps", "messages": ASK, "stream": True, "max_tokens": 3, "temperature": 0.0,
                            "top_p": 1.0, "stream_options": {"include_usage": True}, "stop": ["###"], "seed": 1}


def test_openai_stop_is_enforced_even_if_the_server_ignores_it(server):
    server.reply = lambda h, body: send_stream(h, "text/event-stream", sse_events(["An", "swer.\n#", "## next"]))
    backend = OpenAICompatibleBackend("pumps", f"{server.url}/v1")
    params = GenerationParams(stop=["###"])
    streamed = backend.stream(ASK, params)
    assert list(streamed) == ["An", "swer.\n"]  # the lone "#" was held back, then dropped with the stop
    assert backend.generate(ASK, params).text == "Answer.\n" == streamed.generation.text
    assert streamed.generation.finish_reason == "stop"


def test_openai_http_errors_name_the_fix(server):
    server.reply = lambda h, body: send_error(h, 401, {"error": {"message": "bad key", "type": "auth"}})
    with pytest.raises(AtelierError, match="HTTP 401: bad key; set OPENAI_API_KEY"):
        OpenAICompatibleBackend("pumps", f"{server.url}/v1").generate(ASK)


# ----------------------------------------------------------------------------- unreachable servers


def test_unreachable_servers_raise_atelier_errors_naming_url_and_fix():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(AtelierError, match=rf"no server reachable at {url} .*ollama serve"):
        OllamaBackend("pumps", url).generate(ASK)
    with pytest.raises(AtelierError, match=rf"no server reachable at {url}/v1 .*vllm serve"):
        list(OpenAICompatibleBackend("pumps", f"{url}/v1").stream(ASK))


# ----------------------------------------------------------------------------- through the runtime


def fake_adapter(folder: Path) -> Path:
    """Just enough of an adapter for the registry; a served specialist never loads it."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file({"w": torch.zeros(64, 64)}, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    return folder


def test_runtime_serves_a_served_specialist_through_the_same_contract(server, tmp_path):
    registry = Registry(tmp_path / "home")
    registry.register("remote", base_model="unused", adapter_dir=fake_adapter(tmp_path / "a"), eval_report={},
                      force=True, served_by=f"ollama:pumps@{server.url}")
    registry.register("openai-remote", base_model="unused", adapter_dir=fake_adapter(tmp_path / "b"), eval_report={},
                      force=True, served_by=f"openai:pumps@{server.url}/v1")
    runtime = SpecialistRuntime(registry, RuntimeConfig(device="cpu", served_num_ctx=2048))

    server.reply = lambda h, body: send_stream(h, "application/x-ndjson", ollama_lines(["Fine", "."]))
    result = runtime.generate("remote", ASK, GenerationParams(max_tokens=5))
    assert (result.text, result.specialist, result.version) == ("Fine.", "remote", 1)
    assert server.requests[-1].body["options"]["num_ctx"] == 2048

    server.reply = lambda h, body: send_stream(h, "text/event-stream", sse_events(["O", "K"]))
    stream = runtime.stream("openai-remote", ASK, GenerationParams(max_tokens=5))
    assert "".join(stream) == "OK" and stream.generation.specialist == "openai-remote"
    assert runtime.loaded() == {}  # nothing loaded in-process

    registry.register("down", base_model="unused", adapter_dir=fake_adapter(tmp_path / "c"), eval_report={},
                      force=True, served_by=f"ollama:pumps@http://127.0.0.1:{free_port()}")
    with pytest.raises(AtelierError, match="specialist 'down' .*no server reachable"):
        runtime.generate("down", ASK)


# ----------------------------------------------------------------------------- a live Ollama (opt-in)


@pytest.mark.ollama
@pytest.mark.skipif(not os.environ.get("OLLAMA_HOST"), reason="needs a live Ollama: set OLLAMA_HOST "
                    "(and ATELIER_TEST_OLLAMA_MODEL, default qwen2.5:0.5b)")
def test_live_ollama():
    backend = backend_for(f"ollama:{os.environ.get('ATELIER_TEST_OLLAMA_MODEL', 'qwen2.5:0.5b')}")
    result = backend.generate([{"role": "user", "content": "Count from 1 to 20, separated by spaces."}],
                              GenerationParams(max_tokens=64, stop=[" 5"]))
    assert result.text and " 5" not in result.text and result.finish_reason == "stop"
    short = backend.generate([{"role": "user", "content": "Write a long story."}], GenerationParams(max_tokens=4))
    assert short.finish_reason == "length"
