"""The orchestrator assembled from real parts, in router-only mode: the real router fitted on the
real built-in tools, the sample manuals' search index and a registered (tiny) specialist."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agents.config import OrchestratorConfig
from agents.orchestrator import Orchestrator
from specialists.registry import Registry
from tests.conftest import home_with_index
from tests.tinymodels import build_adapter, build_base, build_tokenizer

DOCS = Path(__file__).resolve().parents[2] / "examples" / "docs"
EXEMPLARS = ["Ask the valve specialist about actuator sizing", "Which valve actuator fits a DN100 butterfly valve?",
             "What is the stroke time of the VA-200 actuator?", "How do I size a pneumatic valve actuator?",
             "valve actuator torque margin", "Explain actuator fail-safe spring return"]


@pytest.fixture(scope="module")
def home(tmp_path_factory, sample_index):
    home = home_with_index(sample_index, tmp_path_factory.mktemp("orchestrator") / "home")
    models = tmp_path_factory.mktemp("models")
    base = build_base(models / "base", build_tokenizer(), 0)
    adapter = build_adapter(base, models / "adapter", 1)
    Registry(home).register("valves", base_model=str(base), adapter_dir=adapter, eval_report={}, force=True,
                            route_exemplars=EXEMPLARS, keywords=["valve", "actuator"])
    return home


@pytest.fixture
def orchestrator(home, monkeypatch):
    monkeypatch.setenv("ATELIER_HOME", str(home))
    orchestrator = Orchestrator(OrchestratorConfig())
    yield orchestrator
    orchestrator.close()


def test_each_route_answers_in_router_only_mode(orchestrator):
    assert orchestrator.router_only
    tool = orchestrator.ask("what is 17 * 23?", thread_id="a")
    assert tool.route == "tool:calculator" and tool.text == "391"
    search = orchestrator.ask("what is the tightening torque of the HX-65 impeller nut?", thread_id="b")
    assert search.route == "search" and "80 N·m" in search.text and search.sources[0]["n"] == 1
    assert any("impeller" in s["text"].lower() for s in search.sources)
    specialist = orchestrator.ask("Which valve actuator fits a DN80 butterfly valve?", thread_id="c")
    assert specialist.route == "specialist:valves" and specialist.text.strip()


def test_stream_reports_the_route_first_then_tokens(orchestrator):
    events = list(orchestrator.stream("how many psi is 3 bar", thread_id="s"))
    assert events[0] == {"type": "route", "route": "tool:convert_units", "confidence": events[0]["confidence"]}
    assert "".join(e["text"] for e in events if e["type"] == "token") == events[-1]["answer"].text
    assert "43.51" in events[-1]["answer"].text


def test_memory_is_kept_per_thread_and_reset(orchestrator, home):
    orchestrator.ask("what is 2 + 2?", thread_id="mem")
    orchestrator.ask("what is 3 + 3?", thread_id="mem")
    state = orchestrator.graph.get_state({"configurable": {"thread_id": "mem"}}).values
    assert [m.text for m in state["messages"]] == ["what is 2 + 2?", "4", "what is 3 + 3?", "6"]
    orchestrator.reset("mem")
    assert not orchestrator.graph.get_state({"configurable": {"thread_id": "mem"}}).values
    assert (home / "memory.sqlite").exists()


def test_cli_ask_json_and_chat(home, monkeypatch):
    """In-process (the commands, not a process per call: two subprocesses cost 30 s here)."""
    from typer.testing import CliRunner

    from atelier.cli import app

    monkeypatch.setenv("ATELIER_HOME", str(home))
    out = CliRunner().invoke(app, ["ask", "what is 6 * 7", "--json"])
    assert out.exit_code == 0, out.output
    answer = json.loads(out.stdout)
    assert answer["answer"] == "42" and answer["route"] == "tool:calculator"
    chat = CliRunner().invoke(app, ["chat", "--thread", "cli"], input="what is 6 * 7\n/reset\nwhat is 1 + 1\n/exit\n")
    assert chat.exit_code == 0, chat.output
    assert "tool:calculator" in chat.stdout and "42" in chat.stdout and "conversation forgotten" in chat.stdout


@pytest.fixture
def with_model(home, monkeypatch, smollm2):
    """The same orchestrator with SmolLM2 on llama.cpp writing the answers (short, bounded)."""
    from tests.conftest import SMOLLM2

    monkeypatch.setenv("ATELIER_HOME", str(home))
    config = OrchestratorConfig(model={"name": SMOLLM2, "max_tokens": 24, "time_limit_s": 30}, search_k=2)
    orchestrator = Orchestrator(config)
    yield orchestrator
    orchestrator.close()


def test_a_real_weak_model_never_loses_the_routes_result(with_model):
    assert not with_model.router_only and with_model.model_name == "llamacpp:smollm2-135m"
    tool = with_model.ask("what is 17 * 23?", thread_id="m1")
    assert tool.route == "tool:calculator" and tool.model == "llamacpp:smollm2-135m"
    assert "Result of calculator: 391" in tool.text and tool.route_output.endswith("391")
    search = with_model.ask("what is the tightening torque of the HX-65 impeller nut?", thread_id="m2")
    assert search.route == "search" and search.route_output in search.text
    first_line = search.route_output.splitlines()[0]
    assert "80 N·m" in first_line and "[" in first_line  # the extractive answer, cited
    for answer in (tool, search):
        assert answer.finish in ("stop", "length", "loop", "time")


def test_routing_by_constrained_output_never_crashes(with_model):
    from agents.graph import available_routes, choose_route

    services = with_model.services
    assert services.model_tools is False
    for question in ("what is 17 * 23?", "what is the HX-65 impeller nut torque?", "hello there"):
        assert choose_route(services, question, fallback="direct") in available_routes(services)


def test_a_broken_record_and_a_corrupt_memory_degrade_instead_of_failing(home, tmp_path, monkeypatch, caplog):
    """Probe of the hardening issue: a garbled record.json or memory.sqlite gave tracebacks on `ask`."""
    import shutil

    damaged = tmp_path / "home"
    shutil.copytree(home, damaged, ignore=shutil.ignore_patterns("memory.sqlite*"))
    (damaged / "specialists" / "valves" / "v1" / "record.json").write_text('{"name": "valves", "vers')
    (damaged / "memory.sqlite").write_bytes(b"\x00garbage" * 512)
    monkeypatch.setenv("ATELIER_HOME", str(damaged))
    with caplog.at_level("WARNING"):
        orchestrator = Orchestrator(OrchestratorConfig())
        try:
            assert orchestrator.ask("what is 17 * 23?").text == "391"
            search = orchestrator.ask("what is the tightening torque of the HX-65 impeller nut?")
            assert search.route == "search" and "80 N·m" in search.text
            assert orchestrator.ask("Which valve actuator fits a DN80 butterfly valve?").route != "specialist:valves"
        finally:
            orchestrator.close()
    logged = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert "memory.sqlite cannot be read" in logged and "record.json cannot be read" in logged


def test_one_shot_ask_starts_a_new_thread_unless_told(orchestrator, home):
    from typer.testing import CliRunner

    from atelier.cli import app

    runner = CliRunner()
    first = json.loads(runner.invoke(app, ["ask", "what is 6 * 7", "--json"]).stdout)
    second = json.loads(runner.invoke(app, ["ask", "what is 6 * 7", "--json"]).stdout)
    assert first["thread_id"] != second["thread_id"] and first["thread_id"].startswith("cli-")
    runner.invoke(app, ["ask", "what is 2 + 2", "--thread", "kept"])
    runner.invoke(app, ["ask", "what is 3 + 3", "--thread", "kept"])
    remembered = orchestrator.graph.get_state({"configurable": {"thread_id": "kept"}}).values["messages"]
    assert [m.text for m in remembered] == ["what is 2 + 2", "4", "what is 3 + 3", "6"]
    assert not orchestrator.graph.get_state({"configurable": {"thread_id": first["thread_id"]}}).values.get("messages", [])[2:]
