"""The HTTP API against real clients: the official openai SDK and LangChain's ChatOpenAI talk to
uvicorn on a free loopback port, in front of the real router-only orchestrator (sample manuals
indexed, one tiny registered specialist)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn

from agents.api import ServeConfig, create_app
from agents.orchestrator import Orchestrator, OrchestratorConfig
from atelier.errors import AtelierError
from specialists.registry import Registry
from tests.tinymodels import build_adapter, build_base, build_tokenizer

DOCS = Path(__file__).resolve().parents[2] / "examples" / "docs"
EXEMPLARS = ["Ask the valve specialist about actuator sizing", "Which valve actuator fits a DN100 butterfly valve?",
             "What is the stroke time of the VA-200 actuator?", "How do I size a pneumatic valve actuator?",
             "valve actuator torque margin", "Explain actuator fail-safe spring return"]
KEY = "test-key-123"


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    from retrieval.cli import index

    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ATELIER_HOME", str(home))
        index(DOCS, backend=None, index_name=None, model=None, config_file=None, prune=True, delete=[], quiet=True)
    models = tmp_path_factory.mktemp("models")
    base = build_base(models / "base", build_tokenizer(), 0)
    adapter = build_adapter(base, models / "adapter", 1)
    Registry(home).register("valves", base_model=str(base), adapter_dir=adapter, force=True, keywords=["valve", "actuator"],
                            route_exemplars=EXEMPLARS, eval_report={"stages": {"base": {"perplexity": 9.0},
                            "sft": {"perplexity": 7.5, "mcq_accuracy": 0.5}}, "final_stage": "sft", "beats_base": True})
    return home


@pytest.fixture(autouse=True)
def _module_home(home, monkeypatch):
    """The orchestrator reads ATELIER_HOME per request (router refits, registry): keep it on the module's home."""
    monkeypatch.setenv("ATELIER_HOME", str(home))


@pytest.fixture(scope="module")
def orchestrator(home):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ATELIER_HOME", str(home))
        orchestrator = Orchestrator(OrchestratorConfig())
        yield orchestrator
    orchestrator.close()


@contextmanager
def running(app) -> Iterator[str]:
    """uvicorn serving `app` in a background thread on a free loopback port; yields the base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def url(orchestrator, home):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ATELIER_HOME", str(home))
        app = create_app(ServeConfig(api_keys=[KEY]), orchestrator=orchestrator)
    with running(app) as base:
        yield base


@pytest.fixture
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)


def test_completion_through_the_official_sdk(client):
    completion = client.chat.completions.create(model="atelier", messages=[{"role": "user", "content": "what is 17 * 23?"}])
    assert completion.object == "chat.completion" and completion.id.startswith("chatcmpl-")
    assert completion.choices[0].message.content == "391" and completion.choices[0].finish_reason == "stop"
    assert completion.usage.prompt_tokens == 5 and completion.usage.completion_tokens == 1
    raw = client.chat.completions.with_raw_response.create(
        model="atelier", messages=[{"role": "user", "content": "what is the tightening torque of the HX-65 impeller nut?"}])
    assert raw.headers["x-atelier-route"] == "search"
    body = json.loads(raw.text)
    assert body["atelier"]["route"] == "search" and body["atelier"]["sources"][0]["n"] == 1
    assert "[1]" in body["choices"][0]["message"]["content"] and "80 N·m" in body["choices"][0]["message"]["content"]
    assert body["atelier"]["thread_id"] == raw.headers["x-atelier-thread"]


def test_streamed_completion_assembles_the_answer(client, url):
    stream = client.chat.completions.create(model="atelier", stream=True, stream_options={"include_usage": True},
                                            messages=[{"role": "user", "content": "how many psi is 3 bar"}])
    chunks = list(stream)
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "43.51" in text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(text.split())
    # the raw SSE: atelier info on the first and last content chunks, route header, [DONE] at the end
    with httpx.stream("POST", f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "atelier", "stream": True, "messages": [{"role": "user", "content": "what is 6 * 7"}]},
                      timeout=60) as response:
        assert response.headers["x-atelier-route"] == "tool:calculator"
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    data = [json.loads(e) for e in events[:-1]]
    assert data[0]["atelier"]["route"] == data[-1]["atelier"]["route"] == "tool:calculator"
    assert all("atelier" not in d for d in data[1:-1])
    assert "".join(d["choices"][0]["delta"].get("content", "") for d in data) == "42"


def test_models_specialists_and_health(client, url):
    ids = [m.id for m in client.models.list()]
    assert ids == ["atelier", "specialist/valves"]
    specialists = httpx.get(f"{url}/v1/specialists", headers={"Authorization": f"Bearer {KEY}"}).json()["data"]
    assert specialists[0]["name"] == "valves" and specialists[0]["metrics"] == {"perplexity": 7.5, "mcq_accuracy": 0.5}
    health = httpx.get(f"{url}/health").json()
    assert health == {"status": "ok", "router_only": True, "model": None, "specialists": 1, "index": True}


def test_specialist_directly_honours_generation_parameters(client):
    messages = [{"role": "system", "content": "You size valves."}, {"role": "user", "content": "DN80 actuator?"}]
    full = client.chat.completions.create(model="specialist/valves", messages=messages, max_tokens=12)
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 12
    assert full.usage.prompt_tokens > 10  # the runtime's tokenizer count of the whole rendered chat
    again = client.chat.completions.create(model="specialist/valves", messages=messages, max_tokens=12)
    assert again.choices[0].message.content == full.choices[0].message.content  # greedy by default
    stream = client.chat.completions.create(model="specialist/valves", messages=messages, max_tokens=12, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == full.choices[0].message.content
    stop = full.choices[0].message.content.strip()[:2]
    cut = client.chat.completions.create(model="specialist/valves", messages=messages, max_tokens=12, stop=[stop])
    assert stop not in cut.choices[0].message.content and cut.choices[0].finish_reason == "stop"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="specialist/nope", messages=messages)


def test_langchain_chat_openai_invoke_and_stream(url):
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(model="atelier", base_url=f"{url}/v1", api_key=KEY, max_retries=0)
    assert chat.invoke("what is 12 * 12?").content == "144"
    assert "".join(chunk.content for chunk in chat.stream("what is 9 + 10?")) == "19"


def test_memory_follows_the_thread_header(client, orchestrator):
    for question in ("what is 2 + 2?", "what is 3 + 3?"):
        client.chat.completions.create(model="atelier", messages=[{"role": "user", "content": question}],
                                       extra_headers={"X-Atelier-Thread": "api-mem"})
    state = orchestrator.graph.get_state({"configurable": {"thread_id": "api-mem"}}).values
    assert [m.text for m in state["messages"]] == ["what is 2 + 2?", "4", "what is 3 + 3?", "6"]
    other = client.chat.completions.create(model="atelier", user="api-user",
                                           messages=[{"role": "user", "content": "what is 1 + 1?"}])
    assert other.model_extra["atelier"]["thread_id"] == "api-user"
    fresh = client.chat.completions.create(model="atelier", messages=[{"role": "user", "content": "what is 1 + 1?"}])
    assert len(fresh.model_extra["atelier"]["thread_id"]) == 32  # a new uuid per request without any thread id


def test_feedback_is_stored_with_its_exchange_and_listed(client, url, home):
    completion = client.chat.completions.create(model="atelier", extra_headers={"X-Atelier-Thread": "fb"},
                                                messages=[{"role": "user", "content": "what is 5 * 5?"}])
    auth = {"Authorization": f"Bearer {KEY}"}
    posted = httpx.post(f"{url}/v1/feedback", headers=auth, json={
        "thread_id": "fb", "completion_id": completion.id, "rating": "up", "comment": "right"})
    assert posted.status_code == 201
    missing = httpx.post(f"{url}/v1/feedback", headers=auth, json={"completion_id": "chatcmpl-x", "rating": "down"})
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "completion_id"
    listed = httpx.get(f"{url}/v1/feedback?limit=5", headers=auth).json()["data"]
    assert listed[0] | {"created_at": None, "id": None} == {
        "id": None, "completion_id": completion.id, "thread_id": "fb", "rating": "up", "comment": "right",
        "question": "what is 5 * 5?", "answer": "25", "route": "tool:calculator", "model": "atelier", "created_at": None}
    assert (home / "feedback.sqlite").exists()


def test_auth_and_request_limits(url):
    bad = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError, match="above this server's cap"):
        client.chat.completions.create(model="atelier", max_tokens=10**6, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="at most 200"):
        client.chat.completions.create(model="atelier", messages=[{"role": "user", "content": "hi"}] * 201)
    with pytest.raises(openai.BadRequestError, match="characters"):
        client.chat.completions.create(model="atelier", messages=[{"role": "user", "content": "x " * 20_000}])
    big = httpx.post(f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                     json={"model": "atelier", "messages": [{"role": "user", "content": "x" * 2_000_000}]})
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    extra = httpx.post(f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                       json={"model": "atelier", "messages": [{"role": "user", "content": "what is 1 + 2?"}],
                             "frequency_penalty": 0.5, "logit_bias": {}, "n": 1, "whatever": {"x": 1}})
    assert extra.status_code == 200 and extra.json()["choices"][0]["message"]["content"] == "3"


def _gated(orchestrator, monkeypatch, after_events: int) -> tuple[threading.Event, threading.Event]:
    """Make the orchestrator's stream pause after `after_events` events until `release` is set."""
    entered, release = threading.Event(), threading.Event()
    real = orchestrator.stream

    def stream(question, thread_id="default"):
        for i, event in enumerate(real(question, thread_id)):
            if i == after_events:
                entered.set()
                release.wait(30)
            yield event

    monkeypatch.setattr(orchestrator, "stream", stream)
    return entered, release


def test_overload_answers_429_with_retry_after(orchestrator, monkeypatch):
    entered, release = _gated(orchestrator, monkeypatch, after_events=0)
    app = create_app(ServeConfig(max_concurrency=1, retry_after_s=3), orchestrator=orchestrator)
    with running(app) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=60)
        slow: list = []
        thread = threading.Thread(target=lambda: slow.append(client.chat.completions.create(
            model="atelier", messages=[{"role": "user", "content": "what is 8 * 8?"}])))
        thread.start()
        assert entered.wait(30)
        with pytest.raises(openai.RateLimitError) as caught:
            client.chat.completions.create(model="atelier", messages=[{"role": "user", "content": "what is 1 + 1?"}])
        assert caught.value.response.headers["retry-after"] == "3"
        assert caught.value.body["type"] == "rate_limit_exceeded"
        release.set()
        thread.join(30)
        assert slow[0].choices[0].message.content == "64"
        after = client.chat.completions.create(model="atelier", messages=[{"role": "user", "content": "what is 1 + 1?"}])
        assert after.choices[0].message.content == "2"  # the slot came back


def test_timeouts_are_504_or_an_sse_error_event(orchestrator, monkeypatch):
    _, release = _gated(orchestrator, monkeypatch, after_events=1)  # after the route event
    app = create_app(ServeConfig(request_timeout_s=0.5, max_concurrency=4), orchestrator=orchestrator)
    try:
        with running(app) as base:
            late = httpx.post(f"{base}/v1/chat/completions", timeout=30,
                              json={"model": "atelier", "messages": [{"role": "user", "content": "what is 2 * 9?"}]})
            assert late.status_code == 504 and late.json()["error"]["type"] == "timeout"
            with httpx.stream("POST", f"{base}/v1/chat/completions", timeout=30, json={
                    "model": "atelier", "stream": True, "messages": [{"role": "user", "content": "what is 3 * 9?"}]}) as r:
                assert r.status_code == 200 and r.headers["x-atelier-route"] == "tool:calculator"
                events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "timeout"
            assert json.loads(events[0])["choices"][0]["delta"]["role"] == "assistant"
    finally:
        release.set()


def test_a_public_bind_without_a_key_is_refused(monkeypatch):
    from agents.serve import serve

    monkeypatch.delenv("ATELIER_API_KEYS", raising=False)
    with pytest.raises(AtelierError, match="refusing to listen on 0.0.0.0 without an API key") as caught:
        serve(host="0.0.0.0", port=8123, config_file=None, model=None)
    assert "\n" not in str(caught.value)
    monkeypatch.setenv("ATELIER_API_KEYS", "k1, k2")
    from agents.api import api_keys, check_exposure

    config = ServeConfig(host="0.0.0.0")
    check_exposure(config)  # a key from the environment is enough
    assert api_keys(config) == ["k1", "k2"]


def test_the_web_page_is_served_when_its_folder_exists(orchestrator, monkeypatch, tmp_path):
    from fastapi.testclient import TestClient

    import agents.api

    (tmp_path / "index.html").write_text("<h1>Atelier</h1>")
    (tmp_path / "app.js").write_text("console.log(1)")
    monkeypatch.setattr(agents.api, "WEB_DIR", tmp_path)
    web = TestClient(create_app(ServeConfig(), orchestrator=orchestrator))
    assert web.get("/").text == "<h1>Atelier</h1>" and web.get("/static/app.js").text == "console.log(1)"
    monkeypatch.setattr(agents.api, "WEB_DIR", tmp_path / "missing")
    bare = TestClient(create_app(ServeConfig(), orchestrator=orchestrator))
    assert bare.get("/").status_code == 404 and bare.get("/static/app.js").status_code == 404


def test_a_real_model_streams_through_the_api_and_keeps_the_result(home, smollm2):
    """SmolLM2 on llama.cpp behind the API: the official SDK streams its words, then the tool's result."""
    from tests.conftest import SMOLLM2

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ATELIER_HOME", str(home))
        orchestrator = Orchestrator(OrchestratorConfig(model={"name": SMOLLM2, "max_tokens": 16}))
        app = create_app(ServeConfig(api_keys=[KEY]), orchestrator=orchestrator)
    try:
        with running(app) as base:
            assert httpx.get(f"{base}/health").json()["model"] == SMOLLM2
            client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=120)
            chunks = list(client.chat.completions.create(
                model="atelier", stream=True, messages=[{"role": "user", "content": "what is 17 * 23?"}]))
    finally:
        orchestrator.close()
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.endswith("Result of calculator: 391")
    info = chunks[-1].model_extra["atelier"]
    assert info["model"] == SMOLLM2 and info["route"] == "tool:calculator" and info["route_output"].endswith("391")
