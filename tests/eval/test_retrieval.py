"""`atelier eval retrieval` on a small BEIR folder, through the real pipeline."""

import json
import math

import pytest

from eval.metrics import percentile, retrieval_metrics

TOPICS = {
    "seal": "A mechanical seal prevents leakage of fluid along the rotating pump shaft.",
    "cavitation": "Cavitation happens when suction pressure falls below vapour pressure and bubbles collapse.",
    "alignment": "Shaft alignment between motor and pump is checked with dial indicators or lasers.",
    "grease": "Motor bearings are regreased every few thousand operating hours with lithium grease.",
    "vfd": "A variable frequency drive changes motor speed by changing the supply frequency.",
}


def test_metrics_match_hand_computation():
    qrels = {"q1": {"a": 1}, "q2": {"b": 1, "c": 1}}
    run = {"q1": {"x": 3.0, "a": 2.0}, "q2": {"b": 5.0}}
    m = retrieval_metrics(qrels, run)
    ndcg_q1 = (1 / math.log2(3)) / 1.0
    ndcg_q2 = 1.0 / (1 + 1 / math.log2(3))
    assert m["ndcg@10"] == pytest.approx((ndcg_q1 + ndcg_q2) / 2)
    assert m["recall@100"] == pytest.approx((1.0 + 0.5) / 2)
    assert m["mrr@10"] == pytest.approx((0.5 + 1.0) / 2)
    assert retrieval_metrics({"q": {"a": 1}}, {})["ndcg@10"] == 0.0  # no hits scores zero
    assert percentile([1, 2, 3, 4], 50) == pytest.approx(2.5)


def test_cli_eval_retrieval_json(tmp_path, atelier_home, encoder):
    """In-process (the command, not a process: loading torch and the encoder again cost ~12 s)."""
    from typer.testing import CliRunner

    from atelier.cli import app

    beir = tmp_path / "tiny"
    (beir / "qrels").mkdir(parents=True)
    with (beir / "corpus.jsonl").open("w") as f:
        for doc_id, text in TOPICS.items():
            f.write(json.dumps({"_id": doc_id, "title": "", "text": text}) + "\n")
    queries = {"q1": "fluid leaking along the shaft", "q2": "bubbles collapsing at low suction pressure",
               "q3": "how to change the speed of the motor", "q4": "which grease for motor bearings"}
    gold = {"q1": "seal", "q2": "cavitation", "q3": "vfd", "q4": "grease"}
    (beir / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": t}) + "\n" for q, t in queries.items()))
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" +
                                             "".join(f"{q}\t{d}\t1\n" for q, d in gold.items()))
    out = CliRunner().invoke(app, ["eval", "retrieval", "--beir", str(beir), "--split", "test", "--json"])
    assert out.exit_code == 0, (out.output, out.exception)
    result = json.loads(out.stdout)
    assert set(result) == {"hybrid", "bm25", "dense"}
    for mode in result.values():
        assert set(mode) >= {"ndcg@10", "recall@100", "mrr@10", "latency_ms_p50", "latency_ms_p95"}
        assert mode["recall@100"] == 1.0 and mode["latency_ms_p50"] > 0
    assert result["dense"]["ndcg@10"] > 0.9 and result["hybrid"]["ndcg@10"] > 0.9
    assert (atelier_home / "indexes" / "beir-tiny" / "index.sqlite").exists()
