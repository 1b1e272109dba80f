"""The orchestrator assembled from real parts, in router-only mode: the real router fitted on the
real built-in tools, the sample manuals' search index and a registered (tiny) specialist."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agents.orchestrator import Orchestrator, OrchestratorConfig
from specialists.registry import Registry
from tests.tinymodels import build_adapter, build_base, build_tokenizer

DOCS = Path(__file__).resolve().parents[2] / "examples" / "docs"
EXEMPLARS = ["Ask the valve specialist about actuator sizing", "Which valve actuator fits a DN100 butterfly valve?",
             "What is the stroke time of the VA-200 actuator?", "How do I size a pneumatic valve actuator?",
             "valve actuator torque margin", "Explain actuator fail-safe spring return"]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    env = {**os.environ, "ATELIER_HOME": str(home)}
    subprocess.run([sys.executable, "-m", "atelier.cli", "index", str(DOCS), "-q"], env=env, check=True,
                   capture_output=True, timeout=300)
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


def test_cli_ask_json_and_chat(home):
    env = {**os.environ, "ATELIER_HOME": str(home)}
    out = subprocess.run([sys.executable, "-m", "atelier.cli", "ask", "what is 6 * 7", "--json"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    assert answer["answer"] == "42" and answer["route"] == "tool:calculator"
    chat = subprocess.run([sys.executable, "-m", "atelier.cli", "chat", "--thread", "cli"], env=env, text=True,
                          input="what is 6 * 7\n/reset\nwhat is 1 + 1\n/exit\n", capture_output=True, timeout=300)
    assert chat.returncode == 0, chat.stderr
    assert "tool:calculator" in chat.stdout and "42" in chat.stdout and "conversation forgotten" in chat.stdout
