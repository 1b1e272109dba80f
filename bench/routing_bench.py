"""Routing benchmark on banking77 (train as exemplars, test as queries), everything side by side in one run.

    OMP_NUM_THREADS=1 .venv/bin/python bench/routing_bench.py [--data DIR] [--far-oos FILE]

Reports, measured in the same process so machine noise cancels:
  * accuracy of a plain 10-nearest-neighbour vote (the reference) and of the semantic router,
    with the router's calibration (expected calibration error, 10 bins) and fit time;
  * out of scope, on splits that withhold intents from the exemplars (their test queries must
    fall back): in-scope accuracy without and with the threshold the router chose from the
    exemplars alone, the drop (also against the full 77-intent router on the same queries),
    and out-of-scope recall; plus the recall the same P(in scope) would reach on a few fallback
    budgets, and that of the best threshold picked on the test queries themselves (an upper
    bound, not a result). Two kinds of split, both reported:
      - random intents (seeds 0..N-1), which leaves near-twins of withheld intents in scope
        (why_verify_identity out, verify_my_identity in), so part of "out of scope" is not;
      - whole topic clusters (same seeds): intent centroids of the train exemplars clustered by
        average linkage on cosine distance, the tree cut at the lowest height that keeps every
        near-twin pair (centroid cosine >= the median nearest-neighbour cosine) in one cluster,
        then random whole clusters withheld until 12-18 intents are out. Decided from the train
        exemplars only, never the test queries;
    and on far out-of-scope queries (SciFact claims) against the full 77-intent router;
  * latency: one bare query embedding vs. routing the same query (embedding + decision), p50/p95.
Embeddings are cached in bench/.cache/routing keyed by the file's SHA-256 and the model.
Results go to bench/results/routing-banking77.json.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported: stable timings on a shared box
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agents.router import RouterConfig, SemanticRouter
from eval.metrics import percentile
from retrieval.embeddings import get_encoder

DATA = ROOT.parent / "shared" / "data"
CACHE = ROOT / "bench" / ".cache" / "routing"


def load_jsonl(path: Path, field: str = "text") -> tuple[list[str], list[str | None], bytes]:
    raw = path.read_bytes()
    rows = [json.loads(line) for line in raw.decode("utf-8").splitlines() if line.strip()]
    return [r[field] for r in rows], [r.get("label") for r in rows], raw


def embeddings(raw: bytes, texts: list[str], encoder) -> np.ndarray:
    """The texts' embeddings, from the cache when this file was embedded with this model before."""
    path = CACHE / f"{Path(encoder.name).name}-{hashlib.sha256(raw).hexdigest()[:16]}.npy"
    if path.is_file():
        vectors = np.load(path)
        if len(vectors) == len(texts):
            return vectors
    started = time.perf_counter()
    vectors = encoder.encode(texts, batch_size=128)
    print(f"  embedded {len(texts)} texts in {time.perf_counter() - started:.0f} s (cached for later runs)")
    CACHE.mkdir(parents=True, exist_ok=True)
    np.save(path, vectors)
    return vectors


def knn_vote(train: np.ndarray, labels: np.ndarray, queries: np.ndarray, k: int = 10) -> np.ndarray:
    """Plain k-NN: each of the k most similar exemplars casts one vote; ties go to the higher summed similarity."""
    similarities = queries @ train.T
    top = np.argpartition(-similarities, k - 1, axis=1)[:, :k]
    n_labels = labels.max() + 1
    cells = (np.arange(len(queries))[:, None] * n_labels + labels[top]).ravel()
    votes = np.bincount(cells, minlength=len(queries) * n_labels).reshape(len(queries), n_labels)
    sims = np.bincount(cells, weights=np.take_along_axis(similarities, top, 1).ravel(),
                       minlength=len(queries) * n_labels).reshape(len(queries), n_labels)
    return np.argmax(votes + sims / (k + 1), axis=1)  # summed similarity < k+1: breaks ties only


def ece(confidence: np.ndarray, correct: np.ndarray, bins: int = 10) -> float:
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for low, high in zip(edges[:-1], edges[1:]):
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            total += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return round(float(total), 4)


def fit(vectors, labels, config=None) -> tuple[SemanticRouter, float]:
    started = time.perf_counter()
    router = SemanticRouter(config or RouterConfig()).fit_vectors(vectors, list(labels))
    return router, time.perf_counter() - started


def random_withheld(intents: list[str], seed: int, n_out: int) -> list[str]:
    return sorted(np.random.default_rng(seed).choice(sorted(intents), n_out, replace=False).tolist())


def topic_clusters(train_x, train_y, intents, twin_similarity: float | None = None) -> dict:
    """Topic clusters of intents from the train exemplars only.

    Each intent's centroid (mean exemplar embedding, renormalised); average-linkage clustering on
    cosine distance; the tree is cut at the lowest height at which every near-twin pair (centroid
    cosine >= `twin_similarity`, by default the median over intents of the cosine to their nearest
    other intent) shares a cluster, so withholding whole clusters never leaves a twin in scope.
    """
    from scipy.cluster.hierarchy import cophenet, fcluster, linkage
    from scipy.spatial.distance import squareform

    centroids = np.stack([train_x[train_y == intent].mean(axis=0) for intent in intents]).astype(np.float64)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    similarity = centroids @ centroids.T
    np.fill_diagonal(similarity, -np.inf)
    if twin_similarity is None:
        twin_similarity = float(np.median(similarity.max(axis=1)))
    tree = linkage(centroids, method="average", metric="cosine")
    cophenetic = squareform(cophenet(tree))
    twins = similarity >= twin_similarity
    cut = float(cophenetic[twins].max()) if twins.any() else 0.0
    labels = fcluster(tree, cut, criterion="distance")
    clusters = sorted((sorted(intents[i] for i in np.flatnonzero(labels == c)) for c in np.unique(labels)),
                      key=lambda members: (-len(members), members))
    return {"twin_similarity": round(twin_similarity, 4), "cut_distance": round(cut, 4), "clusters": clusters,
            "_similarity": similarity, "_index": {intent: i for i, intent in enumerate(intents)}}


def cluster_withheld(clusters: list[list[str]], seed: int, low: int, high: int) -> list[list[str]]:
    """Random whole clusters, skipping any that would pass `high` intents, until at least `low` are out."""
    chosen, total = [], 0
    for i in np.random.default_rng(seed).permutation(len(clusters)):
        if total >= low:
            break
        if total + len(clusters[i]) <= high:
            chosen.append(clusters[i])
            total += len(clusters[i])
    return sorted(chosen, key=lambda members: (-len(members), members))


def held_out_split(train_x, train_y, test_x, test_y, withheld, full_predicted, seed, budgets) -> dict:
    """Withhold the `withheld` intents from the exemplars; their test queries are out of scope."""
    keep, in_scope = ~np.isin(train_y, list(withheld)), ~np.isin(test_y, list(withheld))
    full = float((full_predicted == test_y)[in_scope].mean())
    result = {"seed": seed, "withheld": sorted(withheld), "in_scope_queries": int(in_scope.sum()),
              "oos_queries": int((~in_scope).sum()), "full_router_accuracy": round(full, 4), "budgets": {}}
    for budget in budgets:
        router, seconds = fit(train_x[keep], train_y[keep], RouterConfig(fallback_budget=budget))
        routed, in_scope_probability = router.route_probabilities(test_x)
        predicted, fallback = np.array(router.routes)[routed.argmax(1)], router.fallback(in_scope_probability)
        right = predicted == test_y
        no_threshold = float(right[in_scope].mean())
        with_threshold = float((right & ~fallback)[in_scope].mean())
        result["budgets"][str(budget)] = {
            "threshold": round(router.out_of_scope_threshold, 4), "accuracy_without_threshold": round(no_threshold, 4),
            "accuracy": round(with_threshold, 4), "accuracy_drop": round(no_threshold - with_threshold, 4),
            "accuracy_drop_vs_full_router": round(full - with_threshold, 4),
            "oos_recall": round(float(fallback[~in_scope].mean()), 4),
            "cv_unseen_route_recall": router.stats["cv_unseen_route_recall"],
            "cv_accuracy_drop": router.stats["cv_accuracy_drop"], "fit_s": round(seconds, 2),
            "oos_recall_best_threshold": round(best_threshold_recall(
                in_scope_probability[in_scope], right[in_scope], in_scope_probability[~in_scope], budget), 4)}
    return result


def best_threshold_recall(in_scope: np.ndarray, right: np.ndarray, out_of_scope: np.ndarray, drop: float) -> float:
    """Out-of-scope recall of the best threshold on P(in scope) that costs at most `drop` in-scope accuracy,
    chosen on the test queries themselves: an upper bound for this P(in scope), not a result."""
    order = np.argsort(in_scope)
    lost = np.cumsum(right[order]) / len(in_scope)  # accuracy lost by falling back on the i+1 least in-scope
    allowed = int(np.searchsorted(lost, drop + 1e-12, side="right"))  # fall back on this many, at most
    threshold = in_scope[order][allowed] if allowed < len(in_scope) else np.inf
    return float((out_of_scope < threshold).mean())


def closest_in_scope(topics: dict, withheld: list[str], intents: list[str]) -> dict:
    """The most similar (withheld, in-scope) pair of intent centroids: how near a twin stayed in scope."""
    index, similarity = topics["_index"], topics["_similarity"]
    out = [index[i] for i in withheld]
    out_set = set(withheld)
    kept = [index[i] for i in intents if i not in out_set]
    block = similarity[np.ix_(out, kept)]
    a, b = np.unravel_index(int(block.argmax()), block.shape)
    return {"withheld": intents[out[a]], "in_scope": intents[kept[b]], "cosine": round(float(block[a, b]), 4)}


def mean_of(splits: list[dict], budget: str = "0.03") -> dict:
    keys = ("threshold", "accuracy_without_threshold", "accuracy", "accuracy_drop", "accuracy_drop_vs_full_router",
            "oos_recall", "cv_unseen_route_recall", "oos_recall_best_threshold")
    mean = {key: round(float(np.mean([s["budgets"][budget][key] for s in splits])), 4) for key in keys}
    mean["full_router_accuracy"] = round(float(np.mean([s["full_router_accuracy"] for s in splits])), 4)
    mean["withheld"] = round(float(np.mean([len(s["withheld"]) for s in splits])), 2)
    return {"budget": float(budget), **mean}


def latency(router: SemanticRouter, texts: list[str]) -> dict:
    encoder = router.encoder
    for text in texts[:10]:
        router.route(text)
    bare, routed = [], []
    for i, text in enumerate(texts):
        for step in ((0, 1) if i % 2 else (1, 0)):  # alternate the order: drift hits both sides
            if step == 0:
                started = time.perf_counter()
                encoder.encode_query(text)
                bare.append((time.perf_counter() - started) * 1000)
            else:
                routed.append(router.route(text).latency_ms)
    decision = []
    vectors = encoder.encode(texts[:200])
    for vector in vectors:
        decision.append(router.route_vector(vector).latency_ms)
    stat = lambda v: {"p50": round(percentile(v, 50), 3), "p95": round(percentile(v, 95), 3)}
    return {"queries": len(texts), "embedding": stat(bare), "route": stat(routed), "decision_only": stat(decision)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA / "banking77", help="Folder with train.jsonl and test.jsonl.")
    parser.add_argument("--far-oos", type=Path, default=DATA / "scifact-train" / "queries.jsonl",
                        help="JSONL of far out-of-scope queries (text field); skipped when missing.")
    parser.add_argument("--withheld", type=int, default=15, help="Intents withheld per out-of-scope split.")
    parser.add_argument("--seeds", type=int, default=10, help="Out-of-scope splits of each kind (seeds 0..N-1).")
    parser.add_argument("--cluster-withheld", type=int, nargs=2, default=(12, 18), metavar=("LOW", "HIGH"),
                        help="Intents withheld per topic-cluster split: whole clusters until at least LOW, "
                             "at most HIGH.")
    parser.add_argument("--twin-similarity", type=float, default=None,
                        help="Centroid cosine at which two intents are near-twins that must share a topic cluster "
                             "(default: the median nearest-neighbour centroid cosine of the train exemplars).")
    parser.add_argument("--latency-queries", type=int, default=500, help="Test queries timed one by one.")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "routing-banking77.json")
    args = parser.parse_args()

    encoder = get_encoder()
    train_texts, train_labels, train_raw = load_jsonl(args.data / "train.jsonl")
    test_texts, test_labels, test_raw = load_jsonl(args.data / "test.jsonl")
    train_x, test_x = embeddings(train_raw, train_texts, encoder), embeddings(test_raw, test_texts, encoder)
    train_y, test_y = np.array(train_labels), np.array(test_labels)
    intents = sorted(set(train_labels))
    print(f"banking77: {len(train_texts)} exemplars, {len(test_texts)} queries, {len(intents)} intents")

    index = {label: i for i, label in enumerate(intents)}
    baseline = knn_vote(train_x, np.array([index[y] for y in train_y]), test_x)
    router, fit_s = fit(train_x, train_y)
    routed, in_scope = router.route_probabilities(test_x)
    predicted = np.array(router.routes)[routed.argmax(1)]
    confidence = routed.max(1) * in_scope
    fallback = router.fallback(in_scope)
    results: dict = {
        "dataset": "banking77", "exemplars": len(train_texts), "queries": len(test_texts), "routes": len(intents),
        "accuracy": {"knn10_vote": round(float((np.array(intents)[baseline] == test_y).mean()), 4),
                     "router": round(float((predicted == test_y).mean()), 4),
                     "router_head_only": None,
                     "router_fallback_counted_wrong": round(float(
                         ((predicted == test_y) & ~fallback).mean()), 4)},
        "calibration_ece": {"route_given_in_scope": ece(routed.max(1), predicted == test_y),
                            "confidence": ece(confidence, predicted == test_y)},
        "fallback_rate_in_scope": round(float(fallback.mean()), 4),
        "fit": {"seconds": round(fit_s, 2), **router.stats,
                "out_of_scope_threshold": round(router.out_of_scope_threshold, 4),
                "confident_threshold": round(router.confident_threshold, 4)},
        "config": router.config.model_dump(mode="json"),
    }
    head_only, _ = fit(train_x, train_y, RouterConfig(knn_weight=0.0))
    results["accuracy"]["router_head_only"] = round(float(
        (np.array(head_only.routes)[head_only.probabilities(test_x).argmax(1)] == test_y).mean()), 4)
    if args.far_oos.is_file():
        far_texts, _, far_raw = load_jsonl(args.far_oos)
        _, far = router.route_probabilities(embeddings(far_raw, far_texts, encoder))
        in_scope_right = predicted == test_y  # every banking77 query is in scope of the 77-intent router
        no_threshold = float(in_scope_right.mean())
        with_threshold = float((in_scope_right & ~fallback).mean())
        results["far_oos"] = {"file": str(args.far_oos.relative_to(ROOT.parent)) if args.far_oos.is_relative_to(
            ROOT.parent) else str(args.far_oos), "queries": len(far_texts),
            "threshold": round(router.out_of_scope_threshold, 4), "in_scope_queries": len(test_texts),
            "accuracy_without_threshold": round(no_threshold, 4), "accuracy": round(with_threshold, 4),
            "accuracy_drop": round(no_threshold - with_threshold, 4),
            "oos_recall": round(float(router.fallback(far).mean()), 4)}
    budgets = [0.01, 0.03, 0.05, 0.10, 0.20]
    results["held_out_intents"] = [
        held_out_split(train_x, train_y, test_x, test_y, random_withheld(intents, seed, args.withheld), predicted,
                       seed, budgets if seed == 0 else [0.03])
        for seed in range(args.seeds)]
    results["held_out_intents_mean"] = mean_of(results["held_out_intents"])
    topics = topic_clusters(train_x, train_y, intents, args.twin_similarity)
    low, high = args.cluster_withheld
    splits = []
    for seed in range(args.seeds):
        chosen = cluster_withheld(topics["clusters"], seed, low, high)
        withheld = sorted(i for members in chosen for i in members)
        split = held_out_split(train_x, train_y, test_x, test_y, withheld, predicted, seed,
                               budgets if seed == 0 else [0.03])
        split["withheld_clusters"] = chosen
        split["closest_in_scope"] = closest_in_scope(topics, withheld, intents)
        splits.append(split)
    results["held_out_clusters"] = {
        "method": "average-linkage clustering of train-exemplar intent centroids (cosine distance), cut at the "
                  "lowest height keeping every near-twin pair in one cluster; random whole clusters withheld",
        "twin_similarity": topics["twin_similarity"], "cut_distance": topics["cut_distance"],
        "withheld_range": [low, high], "n_clusters": len(topics["clusters"]), "clusters": topics["clusters"],
        "splits": splits, "mean": mean_of(splits)}
    results["latency_ms"] = latency(router, test_texts[: args.latency_queries])
    report(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwritten to {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")


def report(results: dict) -> None:
    acc, fit_ = results["accuracy"], results["fit"]
    print(f"\n{'system':28} {'accuracy':>8}")
    for name, value in acc.items():
        print(f"{name:28} {value:8.4f}  {value - acc['knn10_vote']:+.4f} vs 10-NN")
    print(f"router fit {fit_['seconds']:.1f} s on {fit_['exemplars']} exemplars (embeddings cached); "
          f"temperature {fit_['temperature']}, ECE {results['calibration_ece']}")
    print(f"thresholds: out of scope {fit_['out_of_scope_threshold']}, confident {fit_['confident_threshold']}; "
          f"in-scope fallback rate {results['fallback_rate_in_scope']}")
    print(f"\nheld-out random intents ({len(results['held_out_intents'][0]['withheld'])} withheld)")
    report_splits(results["held_out_intents"], results["held_out_intents_mean"])
    clusters = results["held_out_clusters"]
    print(f"\nheld-out topic clusters ({clusters['n_clusters']} clusters, cut at cosine distance "
          f"{clusters['cut_distance']}, near-twin cosine >= {clusters['twin_similarity']}; "
          f"{clusters['withheld_range'][0]}-{clusters['withheld_range'][1]} intents withheld)")
    report_splits(clusters["splits"], clusters["mean"])
    for split in clusters["splits"]:
        near = split["closest_in_scope"]
        print(f"  seed {split['seed']}: {len(split['withheld'])} withheld in {len(split['withheld_clusters'])} "
              f"clusters {split['withheld_clusters']}; closest in scope: {near['withheld']} ~ {near['in_scope']} "
              f"{near['cosine']}")
    if "far_oos" in results:
        far = results["far_oos"]
        print(f"\nfar out of scope ({far['queries']} SciFact claims vs the 77-intent router): threshold "
              f"{far['threshold']:.3f}, in-scope accuracy {far['accuracy_without_threshold']:.4f} -> "
              f"{far['accuracy']:.4f} (drop {far['accuracy_drop']:.4f}), OOS recall {far['oos_recall']:.4f}")
    lat = results["latency_ms"]
    print(f"\nlatency ms ({lat['queries']} queries)  p50     p95")
    for name in ("embedding", "route", "decision_only"):
        print(f"{name:26} {lat[name]['p50']:7.2f} {lat[name]['p95']:7.2f}")
    print(f"route p50 - bare embedding p50 = {lat['route']['p50'] - lat['embedding']['p50']:.2f} ms (target <= 3)")


def report_splits(splits: list[dict], mean: dict) -> None:
    print(f"{'seed':>4} {'budget':>6} {'thresh':>7} {'acc full':>8} {'acc no-thr':>10} {'acc':>7} {'drop':>7} "
          f"{'drop/full':>9} {'OOS rec':>8} {'cv est':>7} {'best thr':>8}")
    rows = [(split["seed"], budget, r, split["full_router_accuracy"]) for split in splits
            for budget, r in split["budgets"].items()]
    rows.append(("mean", str(mean["budget"]), mean, mean["full_router_accuracy"]))
    for seed, budget, r, full in rows:
        print(f"{seed:>4} {budget:>6} {r['threshold']:7.3f} {full:8.4f} {r['accuracy_without_threshold']:10.4f} "
              f"{r['accuracy']:7.4f} {r['accuracy_drop']:7.4f} {r['accuracy_drop_vs_full_router']:9.4f} "
              f"{r['oos_recall']:8.3f} {r['cv_unseen_route_recall']:7.3f} {r['oos_recall_best_threshold']:8.3f}")


if __name__ == "__main__":
    main()
