"""Routing drift on Banking77: the router is fitted on 10 intents, traffic through the graph (traced into the
real SQLite store, questions recorded) includes 2 withheld intents, and `atelier eval drift` names those as the
fallback clusters. The real MiniLM encoder; tests/data/README.md has the data's attribution."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest
from langchain_core.messages import HumanMessage
from langgraph.checkpoint.memory import InMemorySaver
from typer.testing import CliRunner

from agents.graph import Services, build_graph
from agents.router import SemanticRouter
from atelier import tracing
from atelier.home import atelier_home

DATA = Path(__file__).resolve().parents[1] / "data" / "banking77-drift.jsonl"
WITHHELD = {"apple_pay_or_google_pay", "verify_my_identity"}


class Embedded:
    """The fitted router on the traffic's embeddings, computed in one batch (one at a time costs seconds more)."""

    def __init__(self, router: SemanticRouter, vectors: dict):
        self.router, self.vectors = router, vectors

    def route(self, text: str):
        return self.router.route_vector(self.vectors[text])


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("drift") / "home"


@pytest.fixture(autouse=True)
def _home(home, monkeypatch):
    monkeypatch.setenv("ATELIER_HOME", str(home))


@pytest.fixture(scope="module")
def traffic(encoder, home):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ATELIER_HOME", str(home))
        return fit_and_send(encoder)


def fit_and_send(encoder):
    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines()]
    exemplars = defaultdict(list)
    for row in rows:
        if row["split"] == "fit":
            exemplars[row["label"]].append(row["text"])
    assert not WITHHELD & set(exemplars)
    router = SemanticRouter(encoder=encoder).fit(dict(exemplars))
    router.save(atelier_home() / "router")
    sent = [r["text"] for r in rows if r["split"] == "traffic"]
    graph = build_graph(
        Services(router=Embedded(router, dict(zip(sent, encoder.encode(sent))))), checkpointer=InMemorySaver()
    )
    tracing.setup(tracing.TracingConfig(enabled=True, store=True, capture_content=True, otlp_endpoint=None))
    label_of = {}
    try:
        for i, row in enumerate(r for r in rows if r["split"] == "traffic"):
            label_of[" ".join(row["text"].split())] = row["label"]
            with tracing.request("invoke_agent atelier"):
                graph.invoke({"messages": [HumanMessage(row["text"])]}, {"configurable": {"thread_id": str(i)}})
        tracing.flush()
    finally:
        tracing.shutdown()
    return router, label_of


def test_the_fitted_router_keeps_its_out_of_fold_profile(traffic):
    router, _ = traffic
    loaded = SemanticRouter.load(atelier_home() / "router")
    profile = loaded.oof_confidence
    assert profile == router.oof_confidence and set(profile) == {"all", *router.routes}
    overall = profile["all"]
    assert (
        overall["n"] == 200 and len(overall["quantiles"]) == 21 and overall["quantiles"] == sorted(overall["quantiles"])
    )
    assert 0 <= overall["fallback_share"] < 0.2  # in cross-validation few exemplars fall back
    assert sum(profile[r]["n"] for r in router.routes) == 200


def test_drift_names_the_withheld_intents_as_the_fallback_clusters(traffic):
    from atelier.cli import app

    _, label_of = traffic
    result = CliRunner().invoke(app, ["eval", "drift", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["requests"] == 90 and report["fallback_share"] > 2 * report["fitted_fallback_share"]
    assert report["ks"] > 0.2  # live confidence is no longer distributed as at fit
    top = report["fallback_clusters"][:2]
    purity = []
    for cluster in top:
        labels = [label_of[q] for q in cluster["questions"]]
        majority = max(set(labels), key=labels.count)
        purity.append((majority, labels.count(majority) / len(labels)))
        assert cluster["suggestion"].startswith("a new specialist")
    assert {label for label, _ in purity} == WITHHELD and all(share >= 0.8 for _, share in purity)
    words = [" ".join(c["keywords"]) for c in top]
    assert any("pay" in w or "apple" in w or "google" in w for w in words)
    assert any("identity" in w or "verify" in w for w in words)
    fallback_total = round(report["fallback_share"] * report["requests"])
    assert sum(c["size"] for c in top) >= 0.7 * fallback_total  # the withheld intents are most of the fallbacks


def test_drift_flags_a_route_whose_traffic_falls_below_the_confident_level(traffic):
    from atelier.cli import app

    report = json.loads(CliRunner().invoke(app, ["eval", "drift", "--json", "--min-requests", "3"]).output)
    flagged = {r["route"] for r in report["routes"] if r["flagged"]}
    assert flagged, report["routes"]
    for row in report["routes"]:
        if row["route"] in flagged:
            assert row["fallback_share"] > 0.5 and row["requests"] >= 3
    steady = [r for r in report["routes"] if not r["flagged"] and r["requests"] >= 5]
    assert steady and all(r["fallback_share"] <= 0.5 for r in steady)
    table = CliRunner().invoke(app, ["eval", "drift", "--min-requests", "3"])
    assert table.exit_code == 0 and "most of its traffic falls below the confident level" in table.output


def test_drift_without_a_fitted_router_says_what_to_do(tmp_path, monkeypatch):
    from atelier.cli import app

    monkeypatch.setenv("ATELIER_HOME", str(tmp_path / "empty"))
    result = CliRunner().invoke(app, ["eval", "drift"])
    assert result.exit_code != 0 and "no fitted router" in str(result.exception)
    bad = CliRunner().invoke(app, ["eval", "drift", "--since", "last tuesday"])
    assert "not a date" in str(bad.exception)
