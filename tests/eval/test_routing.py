"""`atelier eval routing` on small JSONL files, through the real router and encoder."""

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from agents.router import RouterConfig
from atelier.errors import AtelierError
from eval.cli import eval_app
from eval.routing import evaluate_routing

ROUTES = {
    "weather": ["what's the weather tomorrow", "will it rain this afternoon", "forecast for the weekend",
                "is it going to snow tonight", "how hot will it be today"],
    "billing": ["why was I charged twice", "I need a refund for my invoice", "my payment failed",
                "cancel my subscription", "where can I download my receipt"],
    "recipes": ["how long do I boil an egg", "a recipe for pancakes", "how to make tomato sauce",
                "vegetarian lasagne recipe", "how to bake bread at home"],
}
QUERIES = [("is it going to be sunny on Saturday", "weather"), ("I was billed two times this month", "billing"),
           ("how do I make a chocolate cake", "recipes"), ("will there be a storm tomorrow", "weather"),
           ("who won the football world cup in 1998", None), ("explain quantum entanglement", None)]
KEYS = {"accuracy", "accuracy_with_fallback", "accuracy_drop", "oos_recall", "latency_ms_p50", "latency_ms_p95", "embedding_ms_p50", "n_queries", "n_oos",
        "n_routes", "n_exemplars", "out_of_scope_threshold", "confident_threshold", "fit_s"}


def _jsonl(path, rows):
    path.write_text("".join(json.dumps({"text": t, "label": label}) + "\n" for t, label in rows))
    return path


@pytest.fixture
def files(tmp_path):
    routes = _jsonl(tmp_path / "routes.jsonl", [(t, label) for label, texts in ROUTES.items() for t in texts])
    return routes, _jsonl(tmp_path / "queries.jsonl", QUERIES)


def test_evaluate_routing_scores_accuracy_oos_and_latency(files, encoder):
    result = evaluate_routing(*files)
    assert set(result) == KEYS
    assert result["accuracy"] == 1.0 and result["oos_recall"] == 1.0
    assert (result["n_queries"], result["n_oos"], result["n_routes"], result["n_exemplars"]) == (6, 2, 3, 15)
    assert result["embedding_ms_p50"] > 0 and 0 < result["latency_ms_p50"] <= result["latency_ms_p95"]
    assert result["accuracy_with_fallback"] == 1.0 and result["accuracy_drop"] == 0.0


def test_a_threshold_that_never_falls_back_catches_no_out_of_scope_query(files, encoder):
    result = evaluate_routing(*files, RouterConfig(out_of_scope_threshold=0.0))
    assert result["oos_recall"] == 0.0 and result["accuracy"] == result["accuracy_with_fallback"] == 1.0
    assert result["accuracy_drop"] == 0.0 and result["out_of_scope_threshold"] == 0.0


def test_cli_json_shape(files, encoder):
    routes, queries = files
    out = CliRunner().invoke(eval_app, ["routing", "--routes", str(routes), "--queries", str(queries), "--json"])
    assert out.exit_code == 0, out.output
    result = json.loads(out.stdout)
    assert set(result) == KEYS and result["n_queries"] == 6 and result["accuracy"] == 1.0


def test_user_mistakes_are_one_line_errors(tmp_path, files):
    routes, queries = files
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "hi", "label": "a"}\n{"text": oops}\n')
    with pytest.raises(AtelierError, match=r"bad.jsonl:2 is not valid JSON"):
        evaluate_routing(routes, bad)
    unlabelled = _jsonl(tmp_path / "unlabelled.jsonl", [("hello", None), ("hi", None)])
    with pytest.raises(AtelierError, match="without a label"):
        evaluate_routing(unlabelled, queries)
    unknown = _jsonl(tmp_path / "unknown.jsonl", [("play jazz", "music")])
    with pytest.raises(AtelierError, match="labels with no exemplars.*music"):
        evaluate_routing(routes, unknown)
    out = subprocess.run([sys.executable, "-m", "atelier.cli", "eval", "routing", "--routes", str(routes),
                          "--queries", str(tmp_path / "missing.jsonl")], check=False, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 1
    assert out.stderr.strip().count("\n") == 0 and "--queries file" in out.stderr and "not found" in out.stderr
