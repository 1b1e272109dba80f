"""Spans of each route kind, checked with the OpenTelemetry SDK's InMemorySpanExporter: names, GenAI attributes,
the route decision, parentage, and that content stays out unless capture is on. A scripted router and chat model
drive the graph (wiring); the real router and API are traced in test_metrics.py."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from langchain_core.messages import AIMessage, HumanMessage
from langgraph.checkpoint.memory import InMemorySaver
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from agents.graph import Services, build_graph
from agents.tools import builtin_tools
from atelier import tracing
from tests.agents.test_graph import ScriptedModel, searcher  # noqa: F401 - the searcher fixture


@dataclass
class Decision:
    route: str | None
    confidence: float
    confident: bool
    in_scope: float = 0.9
    threshold: float = 0.5
    candidates: list = field(default_factory=list)


class Router:
    def __init__(self, decision: Decision):
        self.decision = decision

    def route(self, text: str) -> Decision:
        return self.decision


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Generation:
    text: str
    usage: Usage
    finish_reason: str = "stop"


class Stream:
    def __init__(self, parts):
        self.parts, self.generation = parts, None

    def __iter__(self):
        yield from self.parts
        self.generation = Generation("".join(self.parts), Usage(7, len(self.parts)))


class Runtime:
    def stream(self, name, messages, params=None):
        return Stream(["Bleed ", "the ", "pump."])

    def generate(self, name, messages, params=None):
        return Generation("Bleed the pump.", Usage(7, 3))


@pytest.fixture
def exporter():
    exporter = InMemorySpanExporter()
    tracing.use([exporter])
    yield exporter
    tracing.shutdown()


def run(services: Services, question: str) -> tuple[dict, tracing.RequestRecord]:
    graph = build_graph(services, checkpointer=InMemorySaver())
    with tracing.request("invoke_agent atelier", {tracing.CONVERSATION: "t1"}) as (_, record):
        final = graph.invoke({"messages": [HumanMessage(question)]}, {"configurable": {"thread_id": "t1"}})
    return final, record


def by_name(exporter) -> dict:
    spans = exporter.get_finished_spans()
    return {s.name: s for s in spans}


def test_the_tool_route_has_a_route_span_and_an_execute_tool_span(exporter):
    decision = Decision(
        "tool:calculator",
        0.93,
        True,
        candidates=[("tool:calculator", 0.93), ("search", 0.04), ("direct", 0.02), ("tool:convert_units", 0.01)],
    )
    final, record = run(
        Services(router=Router(decision), tools={t.name: t for t in builtin_tools()}), "what is 17 * 23?"
    )
    assert final["messages"][-1].text == "391"
    spans = by_name(exporter)
    route = spans[tracing.ROUTE_SPAN].attributes
    assert route[tracing.ROUTE] == "tool:calculator" and route[tracing.ROUTE_TOP] == "tool:calculator"
    assert route[tracing.CONFIDENCE] == 0.93 and route[tracing.THRESHOLD] == 0.5 and route[tracing.FALLBACK] is False
    assert list(route[tracing.ALTERNATIVES]) == ["tool:calculator", "search", "direct"]  # the top 3
    assert list(route[tracing.ALTERNATIVE_CONFIDENCES]) == [0.93, 0.04, 0.02]
    tool = spans["execute_tool calculator"].attributes
    assert tool[tracing.OPERATION] == "execute_tool" and tool[tracing.TOOL] == "calculator"
    assert "gen_ai.tool.call.result" not in tool  # privacy by default: no content
    root = spans["invoke_agent atelier"]
    assert all(s.context.trace_id == root.context.trace_id for s in spans.values())
    assert spans[tracing.ROUTE_SPAN].parent.span_id == root.context.span_id
    assert "atelier.respond" in spans
    assert record.timings_ms["tool"] > 0 and record.timings_ms["route"] > 0 and record.timings_ms["search"] == 0


def test_the_search_route_records_mode_hits_and_top_scores(exporter, searcher):  # noqa: F811
    final, record = run(
        Services(router=Router(Decision("search", 0.8, True)), searcher=searcher), "what is the seal leakage limit?"
    )
    search = by_name(exporter)["retrieval search"].attributes
    assert search[tracing.OPERATION] == "retrieval" and search[tracing.SEARCH_MODE] == "hybrid"
    assert search[tracing.SEARCH_HITS] == len(final["sources"]) == 2
    assert list(search[tracing.SEARCH_TOP_SCORES]) == [s["score"] for s in final["sources"]][:3]
    assert record.timings_ms["search"] > 0


def test_the_specialist_route_is_a_chat_span_with_its_token_usage(exporter):
    final, record = run(
        Services(router=Router(Decision("specialist:pumps", 0.7, True)), runtime=Runtime(), specialists=["pumps"]),
        "how do I bleed the pump?",
    )
    assert final["messages"][-1].text == "Bleed the pump."
    chat = by_name(exporter)["chat specialist:pumps"]
    assert chat.kind.name == "CLIENT"
    attrs = chat.attributes
    assert attrs[tracing.OPERATION] == "chat" and attrs[tracing.PROVIDER] == "atelier"
    assert attrs[tracing.REQUEST_MODEL] == attrs[tracing.RESPONSE_MODEL] == "specialist:pumps"
    assert attrs[tracing.AGENT] == "pumps"
    assert (attrs[tracing.INPUT_TOKENS], attrs[tracing.OUTPUT_TOKENS]) == (7, 3)
    assert tracing.INPUT_MESSAGES not in attrs
    assert [(c.model, c.input_tokens, c.output_tokens) for c in record.model_calls] == [("specialist:pumps", 7, 3)]
    assert record.timings_ms["model"] > 0


def test_the_direct_route_falls_back_and_says_so(exporter):
    run(Services(router=Router(Decision(None, 0.12, False))), "tell me a joke")
    route = by_name(exporter)[tracing.ROUTE_SPAN].attributes
    assert route[tracing.ROUTE] == "direct" and route[tracing.ROUTE_TOP] == "none"
    assert route[tracing.FALLBACK] is True and route[tracing.CONFIDENCE] == 0.12


def test_the_agent_route_traces_each_model_call_and_tool_call(exporter):
    model = ScriptedModel(
        responses=[
            AIMessage(
                "",
                tool_calls=[{"name": "calculator", "args": {"expression": "6*7"}, "id": "c1"}],
                usage_metadata={"input_tokens": 50, "output_tokens": 9, "total_tokens": 59},
            ),
            AIMessage("It is 42.", usage_metadata={"input_tokens": 70, "output_tokens": 4, "total_tokens": 74}),
        ]
    )
    services = Services(
        router=Router(Decision("tool:calculator", 0.3, False)),
        model=model,
        model_name="llamacpp:smollm2-135m",
        tools={t.name: t for t in builtin_tools()},
    )
    final, record = run(services, "six times seven?")
    assert final["messages"][-1].text == "It is 42."
    spans = exporter.get_finished_spans()
    route = next(s for s in spans if s.name == tracing.ROUTE_SPAN).attributes
    assert route[tracing.ROUTE] == "agent" and route[tracing.FALLBACK] is True
    chats = [s for s in spans if s.name == "chat llamacpp:smollm2-135m"]
    assert [(s.attributes[tracing.INPUT_TOKENS], s.attributes[tracing.OUTPUT_TOKENS]) for s in chats] == [
        (50, 9),
        (70, 4),
    ]
    assert all(s.attributes[tracing.PROVIDER] == "llamacpp" for s in chats)
    tool = next(s for s in spans if s.name == "execute_tool calculator").attributes
    assert tool["gen_ai.tool.call.id"] == "c1"
    assert record.fallback and len(record.model_calls) == 2


def test_content_is_recorded_only_when_configured_and_never_a_secret():
    exporter = InMemorySpanExporter()
    tracing.use([exporter], capture_content=True)
    try:
        question = "what is 2 + 2? my key is sk-abcdefghijklmnop1234 and Bearer abcdefgh12345678"
        run(
            Services(router=Router(Decision("tool:calculator", 0.9, True)), tools={t.name: t for t in builtin_tools()}),
            question,
        )
    finally:
        tracing.shutdown()
    route = by_name(exporter)[tracing.ROUTE_SPAN].attributes
    recorded = route[tracing.QUESTION]
    assert recorded.startswith("what is 2 + 2?") and "abcdefghijklmnop1234" not in recorded
    assert "abcdefgh12345678" not in recorded and recorded.count("[redacted]") == 2
    assert by_name(exporter)["execute_tool calculator"].attributes["gen_ai.tool.call.result"] == "4"


def test_tracing_off_records_timings_and_no_spans():
    tracing.shutdown()
    assert not tracing.enabled()
    _, record = run(
        Services(router=Router(Decision("tool:calculator", 0.9, True)), tools={t.name: t for t in builtin_tools()}),
        "what is 2 + 2?",
    )
    assert record.timings_ms["tool"] > 0 and record.timings_ms["route"] > 0


def test_a_streamed_answer_counts_the_tokens_its_server_reports():
    from langchain_core.messages import AIMessageChunk

    from agents.llm import bounded_stream

    chunks = [
        AIMessageChunk(content="Hello"),
        AIMessageChunk(content=" there"),
        AIMessageChunk(content="", usage_metadata={"input_tokens": 31, "output_tokens": 2, "total_tokens": 33}),
    ]
    written = bounded_stream(iter(chunks), time_limit_s=5)
    assert (written.text, written.input_tokens, written.output_tokens) == ("Hello there", 31, 2)
    assert bounded_stream(iter([AIMessageChunk(content="x")]), time_limit_s=5).input_tokens == 0
