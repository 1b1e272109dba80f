"""IR metrics through pytrec_eval (the trec_eval implementation BEIR itself uses)."""

from __future__ import annotations

import statistics

Run = dict[str, dict[str, float]]  # query id -> doc id -> score


def _top(run: Run, depth: int) -> Run:
    return {q: dict(sorted(docs.items(), key=lambda kv: -kv[1])[:depth]) for q, docs in run.items()}


def retrieval_metrics(qrels: dict[str, dict[str, int]], run: Run) -> dict[str, float]:
    """nDCG@10, Recall@100 and MRR@10 averaged over the judged queries (a query with no hits scores 0)."""
    import pytrec_eval

    full = {q: run.get(q, {}) for q in qrels}
    deep = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.100"}).evaluate(full)
    shallow = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(_top(full, 10))
    mean = lambda values: float(statistics.fmean(values)) if values else 0.0
    return {
        "ndcg@10": mean([deep[q]["ndcg_cut_10"] for q in qrels]),
        "recall@100": mean([deep[q]["recall_100"] for q in qrels]),
        "mrr@10": mean([shallow[q]["recip_rank"] for q in qrels]),
    }


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation, as numpy does."""
    ordered = sorted(values)
    if not ordered:
        return 0.0
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)
