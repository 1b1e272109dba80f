"""Traces and metrics of the real API: uvicorn on a loopback port in front of the real router-only orchestrator
(the sample manuals indexed). A streamed request's trace carries the response's route and token counts; the local
SQLite store keeps it and `atelier traces` shows it; a real OTLP/HTTP receiver on 127.0.0.1 decodes the protobuf
export; /metrics is read with prometheus_client's own parser."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import ClassVar

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from agents.api import create_app
from agents.config import OrchestratorConfig, ServeConfig
from agents.orchestrator import Orchestrator
from atelier import tracing
from tests.agents.test_api import running
from tests.conftest import orchestrator_on

KEY = "test-key-0123456789"


@pytest.fixture(scope="module")
def home(tmp_path_factory, sample_index):
    from tests.conftest import home_with_index

    return home_with_index(sample_index, tmp_path_factory.mktemp("obs") / "home")


@pytest.fixture(autouse=True)
def _home(home, monkeypatch):
    monkeypatch.setenv("ATELIER_HOME", str(home))


@pytest.fixture(scope="module")
def orchestrator(home):
    with orchestrator_on(home) as orchestrator:
        yield orchestrator


def sse_chunks(url: str, question: str) -> list[dict]:
    body = {
        "model": "atelier",
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": question}],
    }
    with httpx.stream(
        "POST", f"{url}/v1/chat/completions", json=body, timeout=60, headers={"Authorization": f"Bearer {KEY}"}
    ) as response:
        assert response.status_code == 200
        lines = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_a_streamed_request_has_the_route_and_token_counts_of_its_response(orchestrator):
    exporter = InMemorySpanExporter()
    tracing.use([exporter])
    try:
        with running(create_app(ServeConfig(api_keys=[KEY]), orchestrator=orchestrator)) as url:
            chunks = sse_chunks(url, "what is the tightening torque of the HX-65 impeller nut?")
    finally:
        tracing.shutdown()
    last = next(c for c in reversed(chunks) if c.get("choices") and c["choices"][0]["finish_reason"])
    usage = chunks[-1]["usage"]
    spans = exporter.get_finished_spans()
    root = next(s for s in spans if s.name == "POST /v1/chat/completions")
    assert root.parent is None and root.kind.name == "SERVER" and root.attributes["atelier.stream"] is True
    assert root.attributes[tracing.ROUTE] == last["atelier"]["route"] == "search"
    assert root.attributes[tracing.CONFIDENCE] == round(last["atelier"]["confidence"], 4)
    assert root.attributes[tracing.INPUT_TOKENS] == usage["prompt_tokens"]
    assert root.attributes[tracing.OUTPUT_TOKENS] == usage["completion_tokens"] > 0
    assert root.attributes[tracing.CONVERSATION] == last["atelier"]["thread_id"]
    names = {s.name for s in spans if s.context.trace_id == root.context.trace_id}
    assert {"invoke_agent atelier", tracing.ROUTE_SPAN, "retrieval search", "atelier.respond"} <= names
    timings = last["atelier"]["timings"]
    assert set(timings) == {"route", "search", "model", "tool"} and timings["search"] > 0 and timings["route"] > 0


def test_the_local_store_keeps_traces_and_atelier_traces_shows_them(orchestrator, home):
    from atelier.cli import app

    tracing.setup(tracing.TracingConfig(enabled=True, store=True, keep_traces=2, otlp_endpoint=None))
    try:
        for question in ("what is 17 * 23?", "how many psi is 3 bar", "what is 2 + 2?"):
            orchestrator.ask(question, thread_id="cli-thread")
        orchestrator.ask("what is 3 * 3?", thread_id="other")
        tracing.flush()
    finally:
        tracing.shutdown()
    runner = CliRunner()
    listed = json.loads(runner.invoke(app, ["traces", "--json"]).output)
    assert [t["thread"] for t in listed] == ["other", "cli-thread"]  # the retention limit kept the newest two
    assert listed[1]["route"] == "tool:calculator" and listed[0]["route"] == "tool:calculator"
    only = runner.invoke(app, ["traces", "--thread", "cli-thread"])  # one match: its waterfall
    assert only.exit_code == 0 and "retrieval" not in only.output
    assert "invoke_agent atelier" in only.output and "execute_tool calculator" in only.output
    assert "route=tool:calculator" in only.output
    rows = json.loads(runner.invoke(app, ["traces", listed[0]["trace_id"][:8], "--json"]).output)
    assert [r["depth"] for r in rows][:2] == [0, 1] and rows[0]["name"] == "invoke_agent atelier"
    missing = runner.invoke(app, ["traces", "--route", "search"])
    assert missing.exit_code == 0 and "no traces match" in missing.output


class Receiver(BaseHTTPRequestHandler):
    requests: ClassVar[list] = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        message = ExportTraceServiceRequest()
        message.ParseFromString(body)
        Receiver.requests.append((self.path, self.headers["Content-Type"], message))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()
        self.wfile.write(b"")

    def log_message(self, *args):
        pass


def test_spans_reach_a_real_otlp_http_receiver(orchestrator):
    server = HTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        tracing.setup(
            tracing.TracingConfig(enabled=True, store=False, otlp_endpoint=f"http://127.0.0.1:{server.server_port}")
        )
        try:
            orchestrator.ask("what is 17 * 23?", thread_id="otlp")
            tracing.flush()
        finally:
            tracing.shutdown()
    finally:
        server.shutdown()
    path, content_type, message = Receiver.requests[0]
    assert path == "/v1/traces" and content_type == "application/x-protobuf"
    resource = message.resource_spans[0]
    assert {a.key: a.value.string_value for a in resource.resource.attributes}["service.name"] == "atelier"
    spans = {s.name: s for scope in resource.scope_spans for s in scope.spans}
    root = {a.key: a for a in spans["invoke_agent atelier"].attributes}
    assert root[tracing.CONVERSATION].value.string_value == "otlp"
    assert root[tracing.ROUTE].value.string_value == "tool:calculator"
    tool = {a.key: a.value.string_value for a in spans["execute_tool calculator"].attributes}
    assert tool[tracing.TOOL] == "calculator" and tool[tracing.OPERATION] == "execute_tool"


def samples(text: str) -> dict:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_metrics_count_routes_statuses_latency_and_429s(orchestrator):
    config = ServeConfig(api_keys=[KEY], key_requests_per_minute=3)
    headers = {"Authorization": f"Bearer {KEY}"}
    with running(create_app(config, orchestrator=orchestrator)) as url:
        assert httpx.get(f"{url}/metrics").status_code == 401  # protected like /v1
        for question in ("what is 17 * 23?", "how many psi is 3 bar", "what is 2 + 2?", "what is 1 + 1?"):
            httpx.post(
                f"{url}/v1/chat/completions",
                headers=headers,
                timeout=60,
                json={"model": "atelier", "messages": [{"role": "user", "content": question}]},
            )
        response = httpx.get(f"{url}/metrics", headers=headers)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    got = samples(response.text)
    assert got[("atelier_requests_total", (("route", "tool:calculator"), ("status", "200")))] == 2
    assert got[("atelier_requests_total", (("route", "tool:convert_units"), ("status", "200")))] == 1
    assert got[("atelier_requests_total", (("route", "none"), ("status", "429")))] == 1
    assert got[("atelier_rate_limited_total", (("code", "requests_per_minute"),))] == 1
    assert got[("atelier_request_duration_seconds_count", (("route", "tool:calculator"),))] == 2
    assert got[("atelier_request_duration_seconds_sum", (("route", "tool:calculator"),))] > 0
    assert got[("atelier_specialists_loaded", ())] == 0 and got[("atelier_bases_loaded", ())] == 0


@pytest.mark.slow
def test_a_real_model_call_is_a_chat_span_with_the_servers_token_counts(home, smollm2):
    from agents.llm import ModelConfig
    from tests.conftest import SMOLLM2

    exporter = InMemorySpanExporter()
    tracing.use([exporter])
    try:
        orchestrator = Orchestrator(OrchestratorConfig(model=ModelConfig(name=SMOLLM2, max_tokens=16)))
        answer = orchestrator.ask("hello, who are you?", thread_id="real")
        orchestrator.close()
    finally:
        tracing.shutdown()
    [chat] = [s for s in exporter.get_finished_spans() if s.name == f"chat {SMOLLM2}"]
    assert chat.attributes[tracing.PROVIDER] == "llamacpp" and chat.kind.name == "CLIENT"
    assert chat.attributes[tracing.INPUT_TOKENS] > 20 and 0 < chat.attributes[tracing.OUTPUT_TOKENS] <= 16
    assert answer.timings["model"] > 0 and answer.model == SMOLLM2
