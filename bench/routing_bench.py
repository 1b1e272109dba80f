"""Routing benchmark on banking77 (train as exemplars, test as queries), everything side by side in one run.

    OMP_NUM_THREADS=1 .venv/bin/python bench/routing_bench.py [--data DIR] [--far-oos FILE]

Reports, measured in the same process so machine noise cancels:
  * accuracy of a plain 10-nearest-neighbour vote (the reference) and of the semantic router,
    with the router's calibration (expected calibration error, 10 bins) and fit time;
  * out of scope, on splits that withhold random intents from the exemplars (their test
    queries must fall back): in-scope accuracy without and with the threshold the router
    chose from the exemplars alone, the drop, and out-of-scope recall; plus the recall the
    same confidence would reach on a few fallback budgets, and on far out-of-scope queries
    (SciFact claims) against the full 77-intent router;
  * latency: one bare query embedding vs. routing the same query (embedding + decision), p50/p95.
Embeddings are cached in bench/.cache/routing keyed by the file's SHA-256 and the model.
Results go to bench/results/routing-banking77.json.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported: stable timings on a shared box
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agents.router import RouterConfig, SemanticRouter  # noqa: E402
from eval.metrics import percentile  # noqa: E402
from retrieval.embeddings import get_encoder  # noqa: E402

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


def held_out_split(train_x, train_y, test_x, test_y, intents, seed, n_out, budgets) -> dict:
    """Withhold `n_out` random intents from the exemplars; their test queries are out of scope."""
    withheld = set(np.random.default_rng(seed).choice(sorted(intents), n_out, replace=False).tolist())
    keep, in_scope = ~np.isin(train_y, list(withheld)), ~np.isin(test_y, list(withheld))
    result = {"seed": seed, "withheld": sorted(withheld), "budgets": {}}
    for budget in budgets:
        router, seconds = fit(train_x[keep], train_y[keep], RouterConfig(fallback_budget=budget))
        probs = router.probabilities(test_x)
        predicted, confidence = np.array(router.routes)[probs.argmax(1)], probs.max(1)
        fallback, right = confidence < router.out_of_scope_threshold, predicted == test_y
        no_threshold = float(right[in_scope].mean())
        with_threshold = float((right & ~fallback)[in_scope].mean())
        result["budgets"][str(budget)] = {
            "threshold": round(router.out_of_scope_threshold, 4), "accuracy_without_threshold": round(no_threshold, 4),
            "accuracy": round(with_threshold, 4), "accuracy_drop": round(no_threshold - with_threshold, 4),
            "oos_recall": round(float(fallback[~in_scope].mean()), 4),
            "cv_unseen_route_recall": router.stats["cv_unseen_route_recall"], "fit_s": round(seconds, 2)}
    return result


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
    stat = lambda v: {"p50": round(percentile(v, 50), 3), "p95": round(percentile(v, 95), 3)}  # noqa: E731
    return {"queries": len(texts), "embedding": stat(bare), "route": stat(routed), "decision_only": stat(decision)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA / "banking77", help="Folder with train.jsonl and test.jsonl.")
    parser.add_argument("--far-oos", type=Path, default=DATA / "scifact-train" / "queries.jsonl",
                        help="JSONL of far out-of-scope queries (text field); skipped when missing.")
    parser.add_argument("--withheld", type=int, default=15, help="Intents withheld per out-of-scope split.")
    parser.add_argument("--seeds", type=int, default=3, help="Out-of-scope splits (random intents, seeds 0..N-1).")
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
    results: dict = {
        "dataset": "banking77", "exemplars": len(train_texts), "queries": len(test_texts), "routes": len(intents),
        "accuracy": {"knn10_vote": round(float((np.array(intents)[baseline] == test_y).mean()), 4),
                     "router": round(float((predicted == test_y).mean()), 4),
                     "router_head_only": None,
                     "router_fallback_counted_wrong": round(float(
                         ((predicted == test_y) & (confidence >= router.out_of_scope_threshold)).mean()), 4)},
        "calibration_ece": {"route_given_in_scope": ece(routed.max(1), predicted == test_y),
                            "confidence": ece(confidence, predicted == test_y)},
        "fallback_rate_in_scope": round(float((confidence < router.out_of_scope_threshold).mean()), 4),
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
        far = router.probabilities(embeddings(far_raw, far_texts, encoder)).max(1)
        results["far_oos"] = {"file": str(args.far_oos.relative_to(ROOT.parent)) if args.far_oos.is_relative_to(
            ROOT.parent) else str(args.far_oos), "queries": len(far_texts),
            "oos_recall": round(float((far < router.out_of_scope_threshold).mean()), 4)}
    budgets = [0.01, 0.03, 0.05, 0.10, 0.20]
    results["held_out_intents"] = [
        held_out_split(train_x, train_y, test_x, test_y, intents, seed, args.withheld, budgets if seed == 0 else [0.03])
        for seed in range(args.seeds)]
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
    print(f"\nheld-out intents ({len(results['held_out_intents'][0]['withheld'])} withheld)"
          f"\n{'seed':>4} {'budget':>6} {'thresh':>7} {'acc no-thr':>10} {'acc':>7} {'drop':>7} {'OOS rec':>8} {'cv est':>7}")
    for split in results["held_out_intents"]:
        for budget, r in split["budgets"].items():
            print(f"{split['seed']:4} {budget:>6} {r['threshold']:7.3f} {r['accuracy_without_threshold']:10.4f} "
                  f"{r['accuracy']:7.4f} {r['accuracy_drop']:7.4f} {r['oos_recall']:8.3f} {r['cv_unseen_route_recall']:7.3f}")
    if "far_oos" in results:
        print(f"far out of scope ({results['far_oos']['queries']} SciFact claims vs the 77-intent router): "
              f"recall {results['far_oos']['oos_recall']:.4f}")
    lat = results["latency_ms"]
    print(f"\nlatency ms ({lat['queries']} queries)  p50     p95")
    for name in ("embedding", "route", "decision_only"):
        print(f"{name:26} {lat[name]['p50']:7.2f} {lat[name]['p95']:7.2f}")
    print(f"route p50 - bare embedding p50 = {lat['route']['p50'] - lat['embedding']['p50']:.2f} ms (target <= 3)")


if __name__ == "__main__":
    main()
