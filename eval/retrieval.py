"""Retrieval quality and latency of each search mode on a BEIR dataset.

The corpus is indexed with the product's own pipeline (chunking, embedding, the chosen
backend) into a named index, so a second run re-embeds nothing. Hits are chunks; a
document's score is its best chunk's, as a user would see it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from eval.beir import BeirData
from eval.metrics import percentile, retrieval_metrics
from retrieval.config import Searcher
from retrieval.types import Hit, Mode


def doc_run(hits: Sequence[Hit], depth: int) -> dict[str, float]:
    """Best score per document, first `depth` documents, in rank order."""
    scores: dict[str, float] = {}
    for hit in hits:
        if hit.doc_id not in scores:
            # ranks, not raw scores: fused and per-leg scores are on different scales
            scores[hit.doc_id] = float(len(hits) - hit.rank + 1)
            if len(scores) == depth:
                break
    return scores


def evaluate_mode(searcher: Searcher, data: BeirData, mode: Mode, depth: int = 100,
                  progress: Callable[[int], None] | None = None) -> dict[str, float]:
    """Metrics plus per-query latency (query embedding included) for one mode."""
    run, latencies = {}, []
    chunk_depth = depth * 3  # documents can have several chunks; ask deep enough for `depth` documents
    for query_id, text in data.queries.items():
        started = time.perf_counter()
        hits = searcher.search(text, k=chunk_depth, mode=mode)
        latencies.append((time.perf_counter() - started) * 1000)
        run[query_id] = doc_run(hits, depth)
        if progress:
            progress(1)
    result = retrieval_metrics(data.qrels, run)
    result["latency_ms_p50"] = percentile(latencies, 50)
    result["latency_ms_p95"] = percentile(latencies, 95)
    result["queries"] = len(data.queries)
    return result
