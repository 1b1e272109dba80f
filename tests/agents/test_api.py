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

from agents.api import create_app
from agents.config import OrchestratorConfig, ServeConfig
from agents.orchestrator import Orchestrator
from atelier.errors import AtelierError
from specialists.registry import Registry
from tests.conftest import orchestrator_on
from tests.tinymodels import build_adapter, build_base, build_tokenizer

DOCS = Path(__file__).resolve().parents[2] / "examples" / "docs"
EXEMPLARS = ["Ask the valve specialist about actuator sizing", "Which valve actuator fits a DN100 butterfly valve?",
             "What is the stroke time of the VA-200 actuator?", "How do I size a pneumatic valve actuator?",
             "valve actuator torque margin", "Explain actuator fail-safe spring return"]
KEY = "test-key-0123456789"
OTHER_KEY = "other-key-0123456789"  # a second client: sees none of KEY's threads or feedback


@pytest.fixture(scope="module")
def home(tmp_path_factory, sample_index):
    from tests.conftest import home_with_index

    home = home_with_index(sample_index, tmp_path_factory.mktemp("api") / "home")
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
    with orchestrator_on(home) as orchestrator:
        yield orchestrator


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
        app = create_app(ServeConfig(api_keys=[KEY, OTHER_KEY]), orchestrator=orchestrator)
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
        "correction": None, "question": "what is 5 * 5?", "answer": "25", "route": "tool:calculator",
        "specialist_version": None, "model": "atelier", "created_at": None}
    assert (home / "feedback.sqlite").exists()


def test_a_thumbs_down_carries_a_correction_and_the_answering_specialist_version(client, url, home):
    completion = client.chat.completions.create(model="specialist/valves", max_tokens=4,
                                                messages=[{"role": "user", "content": "stroke time of the VA-200?"}])
    auth = {"Authorization": f"Bearer {KEY}"}
    wrong = httpx.post(f"{url}/v1/feedback", headers=auth, json={
        "completion_id": completion.id, "rating": "up", "correction": "12 s"})
    assert wrong.status_code == 400 and "rating 'down'" in wrong.json()["error"]["message"]
    blank = httpx.post(f"{url}/v1/feedback", headers=auth, json={
        "completion_id": completion.id, "rating": "down", "correction": "   "})
    assert blank.status_code == 400
    posted = httpx.post(f"{url}/v1/feedback", headers=auth, json={
        "completion_id": completion.id, "rating": "down", "correction": "The VA-200 strokes in 12 s."})
    assert posted.status_code == 201
    [row] = [r for r in httpx.get(f"{url}/v1/feedback", headers=auth).json()["data"]
             if r["completion_id"] == completion.id]
    assert (row["rating"], row["correction"], row["route"]) == ("down", "The VA-200 strokes in 12 s.",
                                                                "specialist:valves")
    assert row["specialist_version"] == Registry(home).current_version("valves")
    other = httpx.get(f"{url}/v1/feedback", headers={"Authorization": f"Bearer {OTHER_KEY}"}).json()["data"]
    assert all(r["completion_id"] != completion.id for r in other)
    from atelier.feedback import FeedbackStore

    store = FeedbackStore(home / "feedback.sqlite")
    try:
        [stored] = [r for r in store.for_route("specialist:valves") if r["completion_id"] == completion.id]
    finally:
        store.close()
    assert stored["owner"] != "" and stored["correction"] == "The VA-200 strokes in 12 s."


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
    app = create_app(ServeConfig(max_concurrency=1, max_queue=0, retry_after_s=3), orchestrator=orchestrator)
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
    monkeypatch.setenv("ATELIER_API_KEYS", "first-key-0123456789, second-key-0123456789")
    from agents.api import check_exposure

    keys = check_exposure(ServeConfig(host="0.0.0.0"))  # a key from the environment is enough
    assert [k.owner[:4] for k in keys] == ["key-", "key-"] and len({k.owner for k in keys}) == 2


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


# ----------------------------------------------------------------------------- hardening (issue 13): each probe


def _auth(key: str = KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


def _ask(url: str, question: str, key: str = KEY, **fields) -> httpx.Response:
    """POST a chat to the orchestrator; the JSON is ASCII (escapes), as a lone surrogate can only be sent that way."""
    headers = {**_auth(key), "content-type": "application/json", **fields.pop("headers", {})}
    return httpx.post(f"{url}/v1/chat/completions", headers=headers, timeout=60, content=json.dumps(
        {"model": "atelier", "messages": [{"role": "user", "content": question}], **fields}))


def _raw_http(url: str, request: bytes) -> tuple[bytes, float]:
    """Send `request` as is on a socket (what httpx refuses to send); the whole reply and the seconds it took."""
    import socket

    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(request)
        started, reply = time.monotonic(), b""
        while chunk := conn.recv(4096):
            reply += chunk
    return reply, time.monotonic() - started


def test_probe4_ordinary_input_never_gets_a_500_or_a_dropped_connection(url):
    from urllib.parse import unquote

    for fields in ({"user": "用户 😀"}, {"metadata": {"thread_id": "スレッド-ü"}}):  # was 500 UnicodeEncodeError
        response = _ask(url, "what is 4 + 4?", **fields)
        assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"] == "8"
        thread = response.json()["atelier"]["thread_id"]
        assert response.headers["x-atelier-thread"].isascii() and unquote(response.headers["x-atelier-thread"]) == thread
    for thread in ("a\r\nSet-Cookie: x=1", "nul\x00byte", "tab\there"):  # was a dropped connection
        response = _ask(url, "what is 4 + 4?", user=thread)
        assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_thread_id"
    surrogate = _ask(url, "half a pair: \ud800")  # valid JSON ("\ud800"), not valid Unicode: was 500
    assert surrogate.status_code == 400 and "surrogate" in surrogate.json()["error"]["message"]
    assert surrogate.json()["error"]["param"] == "messages.0.content"
    for fields in ({"seed": 10**30}, {"max_tokens": 10**30}, {"temperature": float("nan")}):  # was 500
        response = httpx.post(f"{url}/v1/chat/completions", headers={**_auth(), "content-type": "application/json"},
                              content=json.dumps({"model": "specialist/valves", "messages": [
                                  {"role": "user", "content": "hi"}], **fields}), timeout=60)
        assert response.status_code == 400 and response.json()["error"]["param"] == next(iter(fields)), response.text


def test_probe4_unexpected_exceptions_answer_a_generic_error_with_a_request_id(url, orchestrator, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("secret detail /etc/atelier/internal")

    monkeypatch.setattr(orchestrator, "stream", broken)
    monkeypatch.setattr(orchestrator.registry, "list", broken)
    with caplog.at_level("ERROR"):
        in_worker = _ask(url, "what is 1 + 1?")
        in_route = httpx.get(f"{url}/v1/models", headers=_auth(), timeout=30)
        with httpx.stream("POST", f"{url}/v1/chat/completions", headers=_auth(), timeout=30, json={
                "model": "atelier", "stream": True, "messages": [{"role": "user", "content": "hi"}]}) as streamed:
            streamed_text = streamed.read().decode()
    for response in (in_worker, in_route):
        assert response.status_code == 500, response.text
        error = response.json()["error"]
        assert "secret" not in response.text and error["type"] == "server_error" and error["code"] == "internal_error"
        assert response.headers["x-request-id"] in error["message"]
        assert response.headers["x-request-id"] in caplog.text  # the details are in the log, under that id
    assert "secret" not in streamed_text and streamed.headers["x-request-id"] in streamed_text
    assert "secret detail" in caplog.text


def test_probe5_blank_short_and_hashed_keys(url, tmp_path, monkeypatch):
    from agents.api import check_exposure
    from agents.auth import digest
    from atelier.config import load_config

    monkeypatch.delenv("ATELIER_API_KEYS", raising=False)
    (tmp_path / "blank.yaml").write_text('host: 0.0.0.0\napi_keys: [""]\n')
    with pytest.raises(AtelierError, match=r"api_keys\[0\] is blank"):  # was: passed the exposure check
        load_config(ServeConfig, tmp_path / "blank.yaml")
    with pytest.raises(AtelierError, match="at least 16"):
        load_config(ServeConfig, None, {"api_keys": ["short"]})
    monkeypatch.setenv("ATELIER_API_KEYS", " , tiny")
    with pytest.raises(AtelierError, match="ATELIER_API_KEYS key 0 has 4 characters; a key needs at least 16"):
        check_exposure(ServeConfig(host="0.0.0.0"))
    monkeypatch.delenv("ATELIER_API_KEYS")
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(f"alice: sha256:{digest('alice-key-0123456789').hex()}\nbob: bob-key-in-clear-0123\n")
    with pytest.raises(AtelierError, match="bob must be sha256:HEX"):
        check_exposure(ServeConfig(host="0.0.0.0", api_keys_file=keys_file))
    keys_file.write_text(f"alice: sha256:{digest('alice-key-0123456789').hex()}\n")
    [alice] = check_exposure(ServeConfig(host="0.0.0.0", api_keys_file=keys_file))
    assert alice.owner == "alice"
    empty, _ = _raw_http(url, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \r\n"
                               b"Connection: close\r\n\r\n")
    assert empty.startswith(b"HTTP/1.1 401")  # the empty key was let in
    for header in ("Bearer", "Basic " + KEY, f"Bearer {KEY[:-1]}"):
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": header}).status_code == 401


def test_probe6_threads_and_feedback_belong_to_the_key_that_made_them(url, orchestrator):
    mine = _ask(url, "what is 6 * 6?", headers={"X-Atelier-Thread": "owned-thread"})
    assert mine.status_code == 200
    for fields in ({"headers": {"X-Atelier-Thread": "owned-thread"}}, {"user": "owned-thread"},
                   {"metadata": {"thread_id": "owned-thread"}}):  # was: any key could read and continue it
        stolen = _ask(url, "what did I ask?", key=OTHER_KEY, **fields)
        assert stolen.status_code == 404 and stolen.json()["error"]["code"] == "thread_not_found"
    assert _ask(url, "what is 7 * 7?", headers={"X-Atelier-Thread": "owned-thread"}).status_code == 200
    state = orchestrator.graph.get_state({"configurable": {"thread_id": "owned-thread"}}).values
    assert [m.text for m in state["messages"]] == ["what is 6 * 6?", "36", "what is 7 * 7?", "49"]
    orchestrator.ask("what is 1 + 2?", thread_id="a-cli-thread")  # history without an owner: no key may take it
    assert _ask(url, "and then?", headers={"X-Atelier-Thread": "a-cli-thread"}).status_code == 404
    rated = {"completion_id": mine.json()["id"], "rating": "down"}
    assert httpx.post(f"{url}/v1/feedback", headers=_auth(OTHER_KEY), json=rated).status_code == 404
    assert httpx.post(f"{url}/v1/feedback", headers=_auth(), json=rated).status_code == 201
    theirs = httpx.get(f"{url}/v1/feedback", headers=_auth(OTHER_KEY)).json()["data"]
    assert theirs == []  # was: every user's rated exchanges
    assert mine.json()["id"] in [f["completion_id"] for f in httpx.get(f"{url}/v1/feedback", headers=_auth()).json()["data"]]


def test_probe6_a_burst_waits_in_the_queue_and_keys_have_their_own_limits(orchestrator, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    app = create_app(ServeConfig(api_keys=[KEY, OTHER_KEY], max_concurrency=2, max_queue=20,
                                 key_requests_per_minute=1000), orchestrator=orchestrator)
    with running(app) as base, ThreadPoolExecutor(20) as pool:  # was: 95 of 100 got 429
        burst = list(pool.map(lambda i: _ask(base, f"what is {i} + 1?", headers={"X-Atelier-Thread": f"b{i}"}),
                              range(20)))
    assert [r.status_code for r in burst] == [200] * 20
    assert [r.json()["choices"][0]["message"]["content"] for r in burst] == [str(i + 1) for i in range(20)]

    entered, release = _gated(orchestrator, monkeypatch, after_events=0)
    app = create_app(ServeConfig(api_keys=[KEY, OTHER_KEY], max_concurrency=1, max_queue=1, retry_after_s=2,
                                 key_requests_per_minute=2, key_tokens_per_minute=0), orchestrator=orchestrator)
    with running(app) as base, ThreadPoolExecutor(2) as pool:
        running_one = pool.submit(_ask, base, "what is 2 * 2?")
        assert entered.wait(30)
        queued = pool.submit(_ask, base, "what is 3 * 3?", key=OTHER_KEY)
        deadline = time.monotonic() + 10
        while app.state.admission.waiting < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        full = _ask(base, "what is 4 * 4?", key=OTHER_KEY)
        assert full.status_code == 429 and full.headers["retry-after"] == "2"
        assert full.json()["error"]["code"] == "server_busy"
        release.set()
        assert running_one.result().status_code == queued.result().status_code == 200
        assert _ask(base, "what is 5 * 5?").status_code == 200
        spent = _ask(base, "what is 6 * 6?")  # KEY's third request in the minute
        assert spent.status_code == 429 and spent.json()["error"]["code"] == "requests_per_minute"
        assert int(spent.headers["retry-after"]) >= 1
        assert _ask(base, "what is 7 * 7?", key=OTHER_KEY).status_code == 200  # its own budget (a 429 is free)
    app = create_app(ServeConfig(api_keys=[KEY], key_tokens_per_minute=6), orchestrator=orchestrator)
    with running(app) as base:
        assert _ask(base, "what is 8 * 8 really?").status_code == 200  # 5 + 1 words: the minute's tokens
        tokens = _ask(base, "what is 9 * 9?")
        assert tokens.status_code == 429 and tokens.json()["error"]["code"] == "tokens_per_minute"
        assert int(tokens.headers["retry-after"]) >= 1


def test_probe11_no_server_paths_in_responses_and_no_open_docs(url, home):
    specialists = httpx.get(f"{url}/v1/specialists", headers=_auth()).json()["data"]
    assert not specialists[0]["base_model"].startswith("/")  # was the absolute base path
    found = _ask(url, "what is the tightening torque of the HX-65 impeller nut?")
    sources = found.json()["atelier"]["sources"]
    assert sources and all(not s["source"].startswith("/") for s in sources), sources
    assert str(DOCS) not in found.text and str(home) not in found.text
    for path in ("/docs", "/redoc"):  # were open and pulled their scripts from a CDN
        assert httpx.get(f"{url}{path}").status_code == 404
    assert httpx.get(f"{url}/openapi.json").status_code == 401
    assert httpx.get(f"{url}/openapi.json", headers=_auth()).json()["info"]["title"] == "Atelier"


def test_probe13_a_stalled_request_body_gets_408(orchestrator):
    app = create_app(ServeConfig(body_timeout_s=0.5), orchestrator=orchestrator)
    with running(app) as base:  # 10 of the 100 bytes announced, then nothing: was held open indefinitely
        reply, seconds = _raw_http(base, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                                   b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\":")
    assert reply.startswith(b"HTTP/1.1 408") and b"request_timeout" in reply and seconds < 5


def test_a_corrupt_feedback_file_is_skipped_with_one_warning(orchestrator, tmp_path, monkeypatch, caplog):
    from fastapi.testclient import TestClient

    (tmp_path / "feedback.sqlite").write_bytes(b"this is not a database" * 100)
    monkeypatch.setenv("ATELIER_HOME", str(tmp_path))
    with caplog.at_level("WARNING", logger="atelier.feedback"):
        app = create_app(ServeConfig(), orchestrator=orchestrator)  # was a traceback: serve did not start
    [warning] = [r.getMessage() for r in caplog.records if r.name == "atelier.feedback"]
    assert str(tmp_path / "feedback.sqlite") in warning and "mv " in warning and "restart" in warning
    web = TestClient(app)
    answer = web.post("/v1/chat/completions", json={"model": "atelier", "messages": [
        {"role": "user", "content": "what is 3 + 4?"}]})
    assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"] == "7"
    assert web.post("/v1/feedback", json={"completion_id": answer.json()["id"], "rating": "up"}).status_code == 201
    assert (tmp_path / "feedback.sqlite").read_bytes().startswith(b"this is not a database")  # left as it was


def test_the_max_tokens_cap_is_the_runtime_configs(orchestrator):
    """One cap: the API refuses what the specialist runtime's config refuses."""
    from fastapi.testclient import TestClient

    app = TestClient(create_app(ServeConfig(orchestrator={"runtime": {"max_tokens_cap": 8}}), orchestrator=orchestrator))
    body = {"model": "atelier", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 9}
    reply = app.post("/v1/chat/completions", json=body)
    assert reply.status_code == 400 and "cap of 8" in reply.json()["error"]["message"]
