"""The API's contract: schemathesis fuzzes every operation of its own OpenAPI schema (valid and
invalid requests) and no request may get a 5xx; every error has OpenAI's shape; FastAPI's 422
validation errors arrive as 400; every response header is plain ASCII (what uvicorn's h11 would
send; the test client does not check). Hypothesis puts non-ASCII, lone surrogates and control
characters into every string field and the thread header."""

from __future__ import annotations

import json

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode

from agents.api import create_app
from agents.config import ServeConfig
from tests.conftest import orchestrator_on

FUZZ = settings(max_examples=30, deadline=None, database=None, derandomize=True,
                suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("home")


@pytest.fixture(autouse=True)
def _module_home(home, monkeypatch):
    monkeypatch.setenv("ATELIER_HOME", str(home))


@pytest.fixture(scope="module")
def app(home):
    with orchestrator_on(home) as orchestrator:
        yield create_app(ServeConfig(max_concurrency=64), orchestrator=orchestrator)


@pytest.fixture(scope="module")
def client(app):
    return TestClient(app)


def assert_openai_error(response) -> None:
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error


def assert_safe_headers(response) -> None:
    """Every header value is printable ASCII: a CR, LF or non-latin-1 character would drop the connection."""
    headers = response.headers  # httpx's Headers, or schemathesis's {name: [values]}
    pairs = [(k, v) for k, vs in headers.items() for v in vs] if isinstance(headers, dict) else headers.multi_items()
    for name, value in pairs:
        assert all(0x20 <= ord(c) < 0x7F or c == "\t" for c in value), (name, value)
    assert any(name.lower() == "x-request-id" for name, _ in pairs)


def test_validation_errors_are_400_in_openai_shape(client):
    cases = [({"model": "atelier"}, "messages"), ({"model": "atelier", "messages": []}, "messages"),
             ({"model": "atelier", "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
             ({"model": "atelier", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
             ({"model": "atelier", "messages": [{"role": "user", "content": "hi"}], "temperature": 9}, "temperature")]
    for body, param in cases:
        response = client.post("/v1/chat/completions", json=body)
        assert response.status_code == 400, (body, response.text)
        assert_openai_error(response)
        assert response.json()["error"]["param"] == param
    broken = client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert broken.status_code == 400
    assert_openai_error(broken)
    for response, status in ((client.get("/v1/nowhere"), 404), (client.delete("/v1/models"), 405),
                             (client.get("/v1/feedback?limit=0"), 400),
                             (client.post("/v1/chat/completions", json={"model": "gpt-4", "messages": [
                                 {"role": "user", "content": "hi"}]}), 404)):
        assert response.status_code == status, response.text
        assert_openai_error(response)
    assistant_last = client.post("/v1/chat/completions", json={"model": "atelier", "messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    assert assistant_last.status_code == 400 and assistant_last.json()["error"]["param"] == "messages"


def test_no_request_gets_a_server_error(app):
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    schema.config.generation.update(allow_x00=True, codec="utf-8")  # NUL and all of Unicode in strings
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
        "POST /v1/chat/completions", "GET /v1/models", "GET /v1/specialists", "POST /v1/feedback",
        "GET /v1/feedback", "GET /health"}
    chat = next(op for op in operations if op.path == "/v1/chat/completions")
    assert "X-Atelier-Thread" in [p.name for p in chat.headers]  # documented, so fuzzed too
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @FUZZ
            @given(case=operation.as_strategy(generation_mode=mode))
            def check(case) -> None:
                response = case.call()
                case.validate_response(response, checks=[not_a_server_error])
                assert_safe_headers(response)
                if response.status_code >= 400:
                    assert_openai_error(response)

            try:
                check()
            except Unsatisfiable:  # an operation without inputs has no invalid request to make
                assert mode is GenerationMode.NEGATIVE, operation.path


ROLES = st.sampled_from(["system", "user", "assistant", "tool", "developer"])
CONTENT = st.one_of(st.text(max_size=200), st.lists(st.fixed_dictionaries({"type": st.just("text"),
                                                                            "text": st.text(max_size=50)}), max_size=3))


@FUZZ
@given(messages=st.lists(st.fixed_dictionaries({"role": ROLES, "content": CONTENT}), min_size=1, max_size=4),
       stream=st.booleans())
def test_the_orchestrator_answers_any_conversation_without_a_server_error(client, messages, stream):
    response = client.post("/v1/chat/completions", json={"model": "atelier", "messages": messages, "stream": stream})
    assert response.status_code in (200, 400), response.text
    if response.status_code == 400:
        assert_openai_error(response)
    elif stream:
        assert response.text.endswith("data: [DONE]\n\n") and '"error"' not in response.text
    else:
        assert response.json()["choices"][0]["finish_reason"] == "stop"


# Characters that broke the API (issue 13, finding 4): non-latin-1 text in a header, CR/LF/NUL, lone surrogates.
NASTY = st.text(st.one_of(st.characters(categories=("Cc", "Cs", "Cf", "Co", "So", "Lo", "Zs", "Zl")),
                          st.sampled_from(["\x00", "\r", "\n", "\ud800", "\udfff", "😀", "中", "\u202e", "é"])),
                min_size=1, max_size=30)
STRING_FIELDS = ["model", "content", "part", "user", "thread_id", "metadata_key", "stop", "header", "feedback"]


@FUZZ
@given(field=st.sampled_from(STRING_FIELDS), value=NASTY, stream=st.booleans())
def test_any_string_in_any_field_gets_an_answer_or_a_400_never_a_server_error(client, field, value, stream):
    body = {"model": "atelier", "stream": stream, "messages": [{"role": "user", "content": "what is 2 + 3?"}]}
    headers = {"content-type": "application/json"}
    if field == "model":
        body["model"] = value
    elif field in ("content", "part"):
        body["messages"][0]["content"] = value if field == "content" else [{"type": "text", "text": value}]
    elif field == "user":
        body["user"] = value
    elif field in ("thread_id", "metadata_key"):
        body["metadata"] = {"thread_id": value} if field == "thread_id" else {value: 1}
    elif field == "stop":
        body.update(model="specialist/none", stop=[value])
    elif field == "header":
        headers["X-Atelier-Thread"] = value.encode("utf-8", "surrogatepass")
    path = "/v1/feedback" if field == "feedback" else "/v1/chat/completions"
    if field == "feedback":
        body = {"completion_id": value, "thread_id": value, "comment": value, "rating": "up"}
    response = client.post(path, content=json.dumps(body), headers=headers)  # ASCII JSON: surrogates as escapes
    assert response.status_code in (200, 400, 404), response.text
    assert_safe_headers(response)
    if response.status_code >= 400:
        assert_openai_error(response)
    elif stream:
        assert response.text.endswith("data: [DONE]\n\n") and '"error"' not in response.text
    else:
        choice = response.json()["choices"][0]
        assert choice["finish_reason"] == "stop" and (field in ("content", "part") or choice["message"]["content"] == "5")
