"""Routing quality and latency: fit the semantic router on labelled exemplars, route labelled queries.

Both files are JSONL of {"text", "label"}. The routes file gives each label's exemplars; in
the queries file a null label marks an out-of-scope query, which must fall back. Latency
is measured per query beside one bare embedding of the same text, alternating which goes
first, so the router's own cost shows as the difference in the same run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from agents.router import RouteDecision, RouterConfig, SemanticRouter
from atelier.errors import AtelierError
from atelier.jsonl import iter_jsonl
from eval.metrics import percentile

Labelled = list[tuple[str, str | None]]


def read_labelled(path: Path, role: str) -> Labelled:
    """(text, label) pairs of a JSONL file; `role` names the --flag in error messages."""
    path = Path(path)
    if not path.is_file():
        raise AtelierError(f"{role} file {path} not found; pass a JSONL file of {{\"text\": ..., \"label\": ...}} lines")
    pairs: Labelled = []
    for number, row in iter_jsonl(path, fix="write one JSON object per line"):
        if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not row["text"].strip():
            raise AtelierError(f"{path}:{number} needs a non-empty \"text\" string")
        label = row.get("label")
        if label is not None and not isinstance(label, str):
            raise AtelierError(f"{path}:{number}: \"label\" must be a string or null")
        pairs.append((row["text"], label))
    if not pairs:
        raise AtelierError(f"{role} file {path} holds no lines; add {{\"text\", \"label\"}} objects")
    return pairs


def exemplars_by_label(pairs: Labelled, path: Path) -> dict[str, list[str]]:
    routes: dict[str, list[str]] = {}
    for text, label in pairs:
        if label is None:
            raise AtelierError(f"{path} has an exemplar without a label ({text[:40]!r}); every route exemplar needs one")
        routes.setdefault(label, []).append(text)
    if len(routes) < 2:
        raise AtelierError(f"{path} has exemplars for {len(routes)} label(s); the router needs at least two")
    return routes


def evaluate_routing(routes_file: Path, queries_file: Path, config: RouterConfig | None = None,
                     progress: Callable[[int], None] | None = None) -> dict:
    """In-scope accuracy, out-of-scope recall and routing latency (p50/p95) beside a bare embedding's p50.

    Over the in-scope queries: `accuracy` scores the route the router ranks first (what a
    classifier without a fallback, such as a k-NN vote, is scored on); `accuracy_with_fallback`
    counts a query that fell back as wrong; `accuracy_drop` is the difference, what the
    out-of-scope threshold costs in-scope requests. `oos_recall` is the share of out-of-scope
    queries that fell back.
    """
    routes = exemplars_by_label(read_labelled(routes_file, "--routes"), routes_file)
    queries = read_labelled(queries_file, "--queries")
    unknown = sorted({label for _, label in queries if label is not None} - set(routes))
    if unknown:
        raise AtelierError(f"{queries_file} uses labels with no exemplars in {routes_file}: {', '.join(unknown[:5])}; "
                           "add exemplars for them or set their label to null (out of scope)")
    started = time.perf_counter()
    router = SemanticRouter(config).fit(routes)
    fit_s = time.perf_counter() - started
    for text, _ in queries[:5]:  # warm up: the first forward passes are slow
        router.route(text)
    route_ms, embed_ms, correct, top1, fallback = [], [], [], [], []
    for i, (text, label) in enumerate(queries):
        bare_ms, decision = _route_beside_bare_embedding(router, text, route_first=i % 2 == 1)
        embed_ms.append(bare_ms)
        route_ms.append(decision.latency_ms)
        if label is None:
            fallback.append(decision.route is None)
        else:
            top1.append(decision.candidates[0][0] == label)
            correct.append(decision.route == label)
        if progress:
            progress(1)
    accuracy = sum(top1) / len(top1) if top1 else None
    with_fallback = sum(correct) / len(correct) if correct else None
    return {
        "accuracy": round(accuracy, 4) if accuracy is not None else None,
        "oos_recall": round(sum(fallback) / len(fallback), 4) if fallback else None,
        "accuracy_with_fallback": round(with_fallback, 4) if with_fallback is not None else None,
        "accuracy_drop": round(accuracy - with_fallback, 4) if accuracy is not None else None,
        "latency_ms_p50": round(percentile(route_ms, 50), 3),
        "latency_ms_p95": round(percentile(route_ms, 95), 3),
        "embedding_ms_p50": round(percentile(embed_ms, 50), 3),
        "n_queries": len(queries),
        "n_oos": len(fallback),
        "n_routes": len(routes),
        "n_exemplars": router.stats["exemplars"],
        "out_of_scope_threshold": round(router.out_of_scope_threshold, 4),
        "confident_threshold": round(router.confident_threshold, 4),
        "fit_s": round(fit_s, 2),
    }


def _route_beside_bare_embedding(router: SemanticRouter, text: str, route_first: bool) -> tuple[float, RouteDecision]:
    """(bare embedding ms, routing decision) for one text; alternating the order spreads drift over both."""
    def bare() -> float:
        started = time.perf_counter()
        router.encoder.encode_query(text)
        return (time.perf_counter() - started) * 1000

    if route_first:
        decision = router.route(text)
        return bare(), decision
    bare_ms = bare()
    return bare_ms, router.route(text)
