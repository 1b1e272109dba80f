"""The teacher against real HTTP servers on 127.0.0.1 that speak OpenAI's and Ollama's chat APIs."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from atelier.errors import AtelierError
from training.prompts import parse_pairs, render_prompt
from training.teacher import Rejected, Teacher, TeacherConfig

Reply = tuple[int, object]  # (HTTP status, JSON body or raw text)


class ChatServer:
    """A threaded local server; `answer(request_json) -> (status, body)` scripts each chat reply."""

    def __init__(self, answer: Callable[[dict], Reply], *, delay: float = 0.0, models: tuple[str, ...] = ()):
        self.answer, self.delay, self.models = answer, delay, models
        self.requests: list[dict] = []
        self.in_flight = self.max_in_flight = 0
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, body: object, content_type: str = "application/json") -> None:
                data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path.endswith("/models"):
                    self._send(200, {"object": "list", "data": [{"id": m, "object": "model"} for m in server.models]})
                elif self.path == "/api/tags":
                    self._send(200, {"models": [{"name": m, "model": m} for m in server.models]})  # as Ollama answers
                else:
                    self._send(404, {"error": "not found"})

            def do_POST(self):
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server._lock:
                    server.requests.append(request)
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    time.sleep(server.delay)
                    status, body = server.answer(request)
                finally:
                    with server._lock:
                        server.in_flight -= 1
                if status == 200 and self.path == "/api/chat":
                    body = {"model": request["model"], "message": {"role": "assistant", "content": body},
                            "done": True, "done_reason": "stop", "prompt_eval_count": len(prompt_of(request)),
                            "eval_count": len(body)}
                elif status == 200 and isinstance(body, str) and not body.startswith("<"):
                    body = {"id": "x", "object": "chat.completion", "model": request["model"],
                            "choices": [{"index": 0, "message": {"role": "assistant", "content": body},
                                         "finish_reason": "stop"}],
                            "usage": {"prompt_tokens": len(prompt_of(request)), "completion_tokens": len(body),
                                      "total_tokens": len(prompt_of(request)) + len(body)}}
                self._send(status, body)

        return Handler

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    servers: list[ChatServer] = []

    def start(answer: Callable[[dict], Reply], **kwargs) -> ChatServer:
        servers.append(ChatServer(answer, **kwargs))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def openai_teacher(server: ChatServer, tmp_path, **settings) -> Teacher:
    settings = {"backoff_s": 0.01, "cache_path": tmp_path / "teacher.sqlite", **settings}
    return Teacher(TeacherConfig(name="openai:test-model", base_url=f"{server.url}/v1", **settings))


def prompt_of(request: dict) -> str:
    return request["messages"][-1]["content"]


def test_transient_errors_are_retried_with_backoff_then_succeed(serve, tmp_path):
    script = iter([(500, {"error": "boom"}), (429, {"error": "slow down"}), (503, "<html>busy</html>"), (200, "fine")])
    server = serve(lambda request: next(script))
    teacher = openai_teacher(server, tmp_path, max_retries=3)
    started = time.perf_counter()
    assert teacher.complete("hello?") == "fine"
    assert len(server.requests) == 4
    assert teacher.stats["retries"] == 3
    assert time.perf_counter() - started >= 0.01 + 0.02 + 0.04  # backoff doubled each time


def test_client_errors_are_not_retried_and_are_counted(serve, tmp_path):
    server = serve(lambda request: (400, {"error": "context too long"}))
    batch = openai_teacher(server, tmp_path).complete_many(["a", "b"], str)
    assert batch.results == [None, None]
    assert batch.rejected == {"teacher_http_400": 2}
    assert len(server.requests) == 2


def test_retries_give_up_after_max_and_count_the_item(serve, tmp_path):
    server = serve(lambda request: (502, {"error": "bad gateway"}))
    batch = openai_teacher(server, tmp_path, max_retries=2).complete_many(["a", "b", "c"], str)
    assert batch.rejected == {"teacher_unavailable": 3}
    assert len(server.requests) == 3 * 3


def test_bad_api_key_stops_the_run(serve, tmp_path):
    server = serve(lambda request: (401, {"error": "invalid key"}))
    with pytest.raises(AtelierError, match="http_401.*run without --teacher"):
        openai_teacher(server, tmp_path).complete_many(["a"], str)


def test_cache_means_a_rerun_makes_no_requests(serve, tmp_path):
    server = serve(lambda request: (200, f"answer to {prompt_of(request)}"))
    prompts = [f"question {i}" for i in range(6)]
    first = openai_teacher(server, tmp_path).complete_many(prompts, str, concurrency=3)
    assert len(server.requests) == 6
    again = openai_teacher(server, tmp_path)  # a new process would open the same SQLite file
    second = again.complete_many(prompts, str, concurrency=3)
    assert len(server.requests) == 6
    assert second.results == first.results == [f"answer to {p}" for p in prompts]
    assert again.stats["cache_hits"] == 6 and again.stats["requests"] == 0


def test_cache_key_covers_the_sampling_parameters(serve, tmp_path):
    server = serve(lambda request: (200, "same"))
    openai_teacher(server, tmp_path).complete("q")
    openai_teacher(server, tmp_path, temperature=0.1).complete("q")
    assert len(server.requests) == 2


def test_malformed_answers_are_rejected_and_counted_not_raised(serve, tmp_path):
    good = json.dumps({"pairs": [{"question": "What is X?", "answer": "X is a part."}]})
    vague = {"question": "What does the passage say?", "answer": "Things."}
    replies = {"p0": good, "p1": "I think the answer is... {not json", "p2": '{"items": 3}',
               "p3": f"Sure [1]:\n```json\n{good}\n```", "p4": '{"pairs": [{"question": "only a question"}]}',
               "p5": json.dumps([vague, {"question": "What is Y?", "answer": "Y is a bolt."}])}
    server = serve(lambda request: (200, replies[prompt_of(request)]))
    batch = openai_teacher(server, tmp_path).complete_many(list(replies), parse_pairs)
    assert batch.rejected == {"malformed_json": 1, "wrong_schema": 1, "no_valid_pairs": 1}
    assert [r is not None for r in batch.results] == [True, False, False, True, False, True]
    assert batch.results[3] == ([("What is X?", "X is a part.")], 0)
    assert batch.results[5] == ([("What is Y?", "Y is a bolt.")], 1)  # the self-referring item is counted


def test_concurrency_is_bounded(serve, tmp_path):
    server = serve(lambda request: (200, "ok"), delay=0.15)
    done: list[int] = []
    batch = openai_teacher(server, tmp_path).complete_many([f"q{i}" for i in range(9)], str, concurrency=3,
                                                          progress=lambda n, total: done.append(n))
    assert batch.accepted == ["ok"] * 9
    assert server.max_in_flight == 3
    assert done == list(range(1, 10))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("name", ["openai:test-model", "ollama:gemma2:27b"])
def test_unreachable_teacher_fails_early_with_the_fix(tmp_path, name):
    url = f"http://127.0.0.1:{_free_port()}" + ("/v1" if name.startswith("openai") else "")
    teacher = Teacher(TeacherConfig(name=name, base_url=url, cache_path=tmp_path / "c.sqlite", timeout_s=2))
    with pytest.raises(AtelierError, match=rf"teacher {name} not reachable at {url}.*run without --teacher"):
        teacher.check()


def test_teacher_name_must_be_provider_and_model(tmp_path):
    with pytest.raises(AtelierError, match="provider:model"):
        Teacher(TeacherConfig(name="gemma2", cache_path=tmp_path / "c.sqlite"))


def test_ollama_backend_sends_num_ctx_and_retries(serve, tmp_path):
    script = iter([(500, {"error": "loading"}), (200, "from ollama"), (200, "second")])
    server = serve(lambda request: next(script), models=("gemma2:27b",))
    teacher = Teacher(TeacherConfig(name="ollama:gemma2:27b", base_url=server.url, num_ctx=4096, backoff_s=0.01,
                                    cache_path=tmp_path / "c.sqlite"))
    teacher.check()
    assert teacher.complete("hi") == "from ollama"
    assert len(server.requests) == 2
    assert server.requests[-1]["options"]["num_ctx"] == 4096
    assert server.requests[-1]["model"] == "gemma2:27b"
    assert teacher.complete("hi") == "from ollama"  # cached
    assert len(server.requests) == 2


def test_ollama_model_not_pulled_names_the_pull_command(serve, tmp_path):
    server = serve(lambda request: (200, "x"), models=("llama3:latest",))
    teacher = Teacher(TeacherConfig(name="ollama:gemma2:27b", base_url=server.url, cache_path=tmp_path / "c.sqlite"))
    with pytest.raises(AtelierError, match="ollama pull gemma2:27b"):
        teacher.check()


@pytest.mark.parametrize("provider", ["openai", "ollama"])
def test_a_batch_is_one_trace_with_a_span_per_teacher_call_and_its_token_usage(serve, tmp_path, provider):
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from atelier import tracing

    server = serve(lambda request: (200, "ok " + prompt_of(request)), models=("test-model",))
    teacher = (openai_teacher(server, tmp_path) if provider == "openai" else
               Teacher(TeacherConfig(name="ollama:test-model", base_url=server.url, cache_path=tmp_path / "c.sqlite")))
    exporter = InMemorySpanExporter()
    tracing.use([exporter])
    try:
        batch = teacher.complete_many(["one", "two", "three"], str, concurrency=2)
    finally:
        tracing.shutdown()
    assert batch.accepted == ["ok one", "ok two", "ok three"]
    spans = exporter.get_finished_spans()
    root = next(s for s in spans if s.name == "invoke_agent teacher")
    calls = [s for s in spans if s.name == f"chat {provider}:test-model"]
    assert len(spans) == 4 and len(calls) == 3 and root.attributes["atelier.teacher.prompts"] == 3
    assert {c.parent.span_id for c in calls} == {root.context.span_id}  # the worker threads' calls join the batch
    assert {c.context.trace_id for c in calls} == {root.context.trace_id}
    usage = sorted((c.attributes["gen_ai.usage.input_tokens"], c.attributes["gen_ai.usage.output_tokens"])
                   for c in calls)
    assert usage == sorted((len(p), len("ok " + p)) for p in ("one", "two", "three"))
    assert all(c.attributes["gen_ai.agent.name"] == "teacher" and c.attributes["gen_ai.provider.name"] == provider
               for c in calls)


def test_prompts_render_with_strict_undefined():
    text = render_prompt("qa", title="Pump manual", passage="The seal leaks.", keywords=("seal",), n_pairs=3)
    assert "Write 3 question-and-answer pairs" in text and "The seal leaks." in text and "seal" in text
    with pytest.raises(Exception, match="n_pairs"):
        render_prompt("qa", title="Pump manual", passage="p", keywords=())


def test_parser_rejections_carry_their_reason():
    with pytest.raises(Rejected) as caught:
        parse_pairs("no json here")
    assert caught.value.reason == "malformed_json"


def test_a_real_teacher_on_llamacpp_answers_in_the_schema(tmp_path, smollm2):
    """SmolLM2 on the embedded llama.cpp: with the pairs schema every reply parses as JSON."""
    from training.prompts import parse_pairs

    teacher = Teacher(TeacherConfig(name="llamacpp:smollm2-135m", num_ctx=4096, max_tokens=480, temperature=0.2,
                                    cache_path=tmp_path / "c.sqlite"))
    teacher.check()
    prompt = ("Write one question and its answer about this passage, as JSON {\"pairs\": [{\"question\", \"answer\"}]}."
              "\nPassage: The HX-65 impeller nut is tightened to 80 N·m with a new tab washer.")
    batch = teacher.complete_many([prompt], parse_pairs, concurrency=1)
    assert "malformed_json" not in batch.rejected and "wrong_schema" not in batch.rejected
    assert sum(batch.rejected.values()) + len(batch.accepted) == 1
    assert teacher.stats["requests"] == 1
    teacher.close()
