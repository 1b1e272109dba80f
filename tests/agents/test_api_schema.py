"""The API's contract: schemathesis fuzzes every operation of its own OpenAPI schema (valid and
invalid requests) and no request may get a 5xx; every error has OpenAI's shape; FastAPI's 422
validation errors arrive as 400."""

from __future__ import annotations

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode

from agents.api import ServeConfig, create_app
from agents.orchestrator import Orchestrator, OrchestratorConfig

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
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ATELIER_HOME", str(home))
        orchestrator = Orchestrator(OrchestratorConfig())
        yield create_app(ServeConfig(max_concurrency=64), orchestrator=orchestrator)
    orchestrator.close()


@pytest.fixture(scope="module")
def client(app):
    return TestClient(app)


def assert_openai_error(response) -> None:
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error


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
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
        "POST /v1/chat/completions", "GET /v1/models", "GET /v1/specialists", "POST /v1/feedback",
        "GET /v1/feedback", "GET /health"}
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @FUZZ
            @given(case=operation.as_strategy(generation_mode=mode))
            def check(case) -> None:
                response = case.call()
                case.validate_response(response, checks=[not_a_server_error])
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
