"""Routing drift: live routing confidence (from the trace store) against the out-of-fold confidence recorded when
the router was fitted, per route; and the questions that fell back, clustered.

For each route (the router's best candidate for a request, so a request that fell back still counts against
the route it nearly took), the report gives the number of recent requests, the share below the confident level
(they fell back) now and in cross-validation, the median confidence now and then, and the Kolmogorov-Smirnov
distance between the two distributions. A route is flagged when most of its recent traffic falls below the
confident level. Questions that fell back are recorded only with ATELIER_TRACE_CONTENT=on (privacy by default);
they are embedded with the router's encoder and clustered (agglomerative, cosine distance): each cluster is a
candidate for a new specialist, or more exemplars for the route it nearly took.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from atelier import tracing
from atelier.errors import AtelierError
from atelier.trace_store import TraceStore


def read_profile(router_folder: Path) -> dict[str, Any]:
    """The fitted router's thresholds and out-of-fold confidence profile (router.json; no encoder needed)."""
    path = Path(router_folder) / "router.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AtelierError(
            f"no fitted router at {path} ({type(exc).__name__}); the router is fitted on the first "
            "request (`atelier ask ...`)"
        ) from None
    if not meta.get("oof_confidence"):
        raise AtelierError(
            f"the router in {router_folder} was fitted before drift profiles were recorded; delete "
            "that folder and the next request refits it with one"
        )
    return {
        "confident_threshold": float(meta["confident_threshold"]),
        "oof": meta["oof_confidence"],
        "config": meta.get("config", {}),
        "fitted_ns": path.stat().st_mtime_ns,
    }


def decisions(store: TraceStore, since_ns: int | None) -> list[dict[str, Any]]:
    """Route decisions of the traced requests: best candidate, confidence, fell back, question (when recorded)."""
    out = []
    for span in store.named(tracing.ROUTE_SPAN, since_ns):
        a = span["attributes"]
        if tracing.CONFIDENCE not in a:
            continue
        candidates = a.get(tracing.ALTERNATIVES) or []
        out.append(
            {
                "route": candidates[0] if candidates else a.get(tracing.ROUTE_TOP, "none"),
                "confidence": float(a[tracing.CONFIDENCE]),
                "fallback": bool(a.get(tracing.FALLBACK)),
                "question": a.get(tracing.QUESTION),
            }
        )
    return out


def ks_distance(values: np.ndarray, quantiles: list[float]) -> float | None:
    """Kolmogorov-Smirnov distance between the sample `values` and a distribution given by evenly spaced quantiles."""
    if not len(values) or len(quantiles) < 2:
        return None
    values = np.sort(values)
    fitted = np.interp(values, quantiles, np.linspace(0, 1, len(quantiles)))
    n = len(values)
    above, below = np.arange(1, n + 1) / n - fitted, fitted - np.arange(n) / n
    return round(float(max(above.max(), below.max())), 4)


def route_rows(recent: list[dict[str, Any]], profile: dict[str, Any], min_requests: int) -> list[dict[str, Any]]:
    rows = []
    routes = sorted({d["route"] for d in recent} | {r for r in profile["oof"] if r != "all"})
    for route in routes:
        mine = [d for d in recent if d["route"] == route]
        values = np.array([d["confidence"] for d in mine])
        fitted = profile["oof"].get(route) or {}
        quantiles = fitted.get("quantiles") or []
        share = round(float(np.mean([d["fallback"] for d in mine])), 4) if mine else None
        rows.append(
            {
                "route": route,
                "requests": len(mine),
                "fallback_share": share,
                "fitted_fallback_share": fitted.get("fallback_share"),
                "fitted_exemplars": fitted.get("n", 0),
                "median_confidence": round(float(np.median(values)), 4) if mine else None,
                "fitted_median_confidence": quantiles[len(quantiles) // 2] if quantiles else None,
                "ks": ks_distance(values, quantiles),
                "flagged": len(mine) >= min_requests and share is not None and share > 0.5,
            }
        )
    return rows


MANY = 3  # distinct questions from which a cluster suggests a new specialist rather than more exemplars


def cluster_questions(
    questions: list[str], encoder: Any, distance: float, top: int, nearest: dict[str, Counter]
) -> list[dict[str, Any]]:
    """Fallback questions grouped by meaning, biggest group first: size, examples, key words, a suggestion."""
    counts = Counter(" ".join(q.split()) for q in questions if q and q.strip())
    unique = list(counts)
    if not unique:
        return []
    vectors = np.asarray(encoder.encode(unique), dtype=np.float32)
    if len(unique) == 1:
        labels = np.zeros(1, dtype=int)
    else:
        from sklearn.cluster import AgglomerativeClustering

        labels = AgglomerativeClustering(
            n_clusters=None, metric="cosine", linkage="average", distance_threshold=distance
        ).fit_predict(vectors)
    clusters = []
    for label in np.unique(labels):
        members = [unique[i] for i in np.flatnonzero(labels == label)]
        centroid = vectors[labels == label].mean(axis=0)
        central = members[int(np.argmax(vectors[labels == label] @ centroid))]
        near = sum((nearest.get(m, Counter()) for m in members), Counter())
        route = near.most_common(1)[0][0] if near else None
        clusters.append(
            {
                "size": sum(counts[m] for m in members),
                "distinct": len(members),
                "representative": central,
                "keywords": _keywords(members),
                "examples": sorted(members, key=lambda m: -counts[m])[:5],
                "questions": members,
                "nearest_route": route,
                "suggestion": (
                    f"more exemplars for {route}"
                    if route and len(members) < MANY
                    else "a new specialist (or route) for these questions"
                ),
            }
        )
    clusters.sort(key=lambda c: (-c["size"], c["representative"]))
    return clusters[:top]


def _keywords(texts: list[str], k: int = 3) -> list[str]:
    from sklearn.feature_extraction.text import CountVectorizer

    try:
        vectorizer = CountVectorizer(stop_words="english", ngram_range=(1, 1))
        counts = np.asarray(vectorizer.fit_transform(texts).sum(axis=0)).ravel()
    except ValueError:  # only stop words
        return []
    terms = vectorizer.get_feature_names_out()
    return [str(terms[i]) for i in np.argsort(-counts, kind="stable")[:k]]


def drift_report(
    store_path: Path,
    router_folder: Path,
    since_ns: int | None = None,
    encoder: Any = None,
    min_requests: int = 5,
    cluster_distance: float = 0.6,
    clusters: int = 5,
) -> dict[str, Any]:
    """Compare recent traced routing with the fitted router's out-of-fold profile. `since_ns` defaults to when the
    router was fitted; `encoder` (default: the router's embedding model) is loaded only to cluster questions."""
    profile = read_profile(router_folder)
    since_ns = profile["fitted_ns"] if since_ns is None else since_ns
    store = TraceStore(store_path)
    try:
        recent = decisions(store, since_ns)
    finally:
        store.close()
    fell_back = [d for d in recent if d["fallback"]]
    questions = [d["question"] for d in fell_back if d["question"]]
    nearest: dict[str, Counter] = {}
    for d in fell_back:
        if d["question"]:
            nearest.setdefault(" ".join(d["question"].split()), Counter())[d["route"]] += 1
    if questions and encoder is None:
        from retrieval.embeddings import EmbeddingConfig, get_encoder

        encoder = get_encoder(EmbeddingConfig.model_validate(profile["config"].get("embedding", {})))
    overall = profile["oof"].get("all", {})
    return {
        "since_ns": since_ns,
        "requests": len(recent),
        "confident_threshold": profile["confident_threshold"],
        "fallback_share": round(len(fell_back) / len(recent), 4) if recent else None,
        "fitted_fallback_share": overall.get("fallback_share"),
        "ks": ks_distance(np.array([d["confidence"] for d in recent]), overall.get("quantiles") or []),
        "routes": route_rows(recent, profile, min_requests),
        "fallback_clusters": cluster_questions(questions, encoder, cluster_distance, clusters, nearest),
        "questions_recorded": bool(questions) or not fell_back,
    }
