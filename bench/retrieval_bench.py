"""Retrieval benchmark on a BEIR dataset (default: SciFact train split), everything side by side in one run.

    OMP_NUM_THREADS=1 .venv/bin/python bench/retrieval_bench.py [--data DIR] [--split train]

Reports, with the reference measured in the same process so machine noise cancels:
  * nDCG@10 / Recall@100 / MRR@10 of Atelier's bm25, dense and hybrid modes beside bm25s
    (the reference BM25: Lucene variant, k1=1.2, b=0.75, English stopwords + Snowball stemmer);
  * fusion variants on the same two legs: RRF(k=60) and convex combinations over a grid of alpha;
  * search latency p50/p95 at k=10 per mode, beside one bare query embedding;
  * indexing throughput of the full pipeline beside the encoder's raw throughput on the same texts.
The full index is built once under bench/.cache (reused by later runs); throughput is measured on
a fresh index of a sample. Results go to bench/results/retrieval-<dataset>.json.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported: stable timings on a shared box
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from eval.beir import load_beir
from eval.metrics import percentile, retrieval_metrics
from eval.retrieval import doc_run
from retrieval.chunking import chunk_document
from retrieval.config import RetrievalConfig, Searcher
from retrieval.embedded import EmbeddedIndex
from retrieval.embeddings import get_encoder
from retrieval.fusion import convex, rrf
from retrieval.indexer import index_documents
from retrieval.types import Mode


def bm25s_reference(data) -> tuple[dict, list[float]]:
    import bm25s
    import Stemmer

    stemmer = Stemmer.Stemmer("english")
    ids = [d.doc_id for d in data.corpus]
    tokens = bm25s.tokenize([f"{d.title} {d.text}" for d in data.corpus], stopwords="en", stemmer=stemmer,
                            show_progress=False)
    retriever = bm25s.BM25(k1=1.2, b=0.75, method="lucene")
    retriever.index(tokens, show_progress=False)
    run, latencies = {}, []
    for qid, text in data.queries.items():
        started = time.perf_counter()
        docs, scores = retriever.retrieve(bm25s.tokenize([text], stopwords="en", stemmer=stemmer, show_progress=False),
                                          k=100, show_progress=False)
        latencies.append((time.perf_counter() - started) * 1000)
        run[qid] = {ids[i]: float(s) for i, s in zip(docs[0], scores[0])}
    return run, latencies


def build_index(data, config: RetrievalConfig, cache: Path, encoder) -> EmbeddedIndex:
    store = EmbeddedIndex(cache / "index.sqlite", dim=encoder.dim, model_name=config.embedding.model,
                          fusion=config.fusion)
    started = time.perf_counter()
    report = index_documents(data.corpus, store, encoder.encode, chunking=config.chunking, model=config.embedding.model,
                             batch_chunks=config.batch_chunks)
    if report.chunks:
        print(f"  indexed {report.chunks} chunks in {time.perf_counter() - started:.0f} s (cached for later runs)")
    return store


def legs_per_query(store: EmbeddedIndex, encoder, data, depth: int = 300) -> dict:
    """Each query's raw BM25 and dense chunk rankings, to fuse offline in several ways."""
    legs = {}
    for qid, text in data.queries.items():
        lexical = store._bm25(text, depth)
        semantic = store._dense(encoder.encode_query(text), depth, include=[r for r, _ in lexical])
        legs[qid] = (lexical, semantic)
    return legs


def fused_run(legs: dict, chunk_doc: dict, fuse_fn) -> dict:
    run = {}
    for qid, (lexical, semantic) in legs.items():
        ranked = fuse_fn([(str(r), s) for r, s in lexical], [(str(r), s) for r, s in semantic])
        hits = [chunk_doc[int(key)] for key, _ in ranked]
        scores: dict[str, float] = {}
        for rank, doc_id in enumerate(hits):
            scores.setdefault(doc_id, float(len(hits) - rank))
            if len(scores) == 100:
                break
        run[qid] = scores
    return run


def latency(searcher: Searcher, encoder, queries: list[str], rounds: int = 1) -> dict:
    """p50/p95 ms per mode at k=10, interleaved with bare query embeddings so noise hits all alike."""
    times: dict[str, list[float]] = {"embed": [], "bm25": [], "dense": [], "hybrid": []}
    for _ in range(rounds):
        for text in queries:
            started = time.perf_counter()
            encoder.encode_query(text)
            times["embed"].append((time.perf_counter() - started) * 1000)
            for mode in (Mode.bm25, Mode.dense, Mode.hybrid):
                started = time.perf_counter()
                searcher.search(text, k=10, mode=mode)
                times[mode.value].append((time.perf_counter() - started) * 1000)
    return {name: {"p50": percentile(v, 50), "p95": percentile(v, 95)} for name, v in times.items()}


def throughput(data, config: RetrievalConfig, encoder, sample_docs: int, repeats: int = 2) -> dict:
    """Chunks/s of the full indexing pipeline vs the encoder alone on the very same chunk texts."""
    docs = data.corpus[:sample_docs]
    texts = [c.search_text() for d in docs for c in chunk_document(d, config.chunking)]
    raw, pipeline = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        encoder.encode(texts)
        raw.append(len(texts) / (time.perf_counter() - started))
        with tempfile.TemporaryDirectory() as tmp:
            store = EmbeddedIndex(Path(tmp) / "i.sqlite", dim=encoder.dim, model_name=config.embedding.model)
            started = time.perf_counter()
            index_documents(docs, store, encoder.encode, chunking=config.chunking, model=config.embedding.model,
                            batch_chunks=config.batch_chunks)
            pipeline.append(len(texts) / (time.perf_counter() - started))
            store.close()
    best_raw, best_pipeline = max(raw), max(pipeline)
    return {"chunks": len(texts), "encoder_chunks_per_s": best_raw, "index_chunks_per_s": best_pipeline,
            "ratio": best_pipeline / best_raw}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "scifact-train")
    parser.add_argument("--split", default="train")
    parser.add_argument("--latency-queries", type=int, default=200)
    parser.add_argument("--throughput-docs", type=int, default=300)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    data = load_beir(args.data, args.split)
    config = RetrievalConfig()
    print(f"{args.data.name}/{args.split}: {len(data.corpus)} documents, {len(data.queries)} queries; "
          f"threads={os.environ['OMP_NUM_THREADS']}")
    encoder = get_encoder(config.embedding)
    cache = ROOT / "bench" / ".cache" / args.data.name
    store = build_index(data, config, cache, encoder)
    searcher = Searcher(store, encoder, config.embedding)

    results: dict = {"dataset": args.data.name, "split": args.split, "documents": len(data.corpus),
                     "queries": len(data.queries), "ndcg": {}}
    ref_run, ref_lat = bm25s_reference(data)
    results["ndcg"]["bm25s (reference)"] = retrieval_metrics(data.qrels, ref_run)
    for mode in Mode:
        run = {qid: doc_run(searcher.search(text, k=300, mode=mode), 100) for qid, text in data.queries.items()}
        results["ndcg"][f"atelier {mode.value}"] = retrieval_metrics(data.qrels, run)

    legs = legs_per_query(store, encoder, data)
    chunk_doc = {int(r): d for r, d in store._db.execute("SELECT id, doc_id FROM chunks")}
    results["ndcg"]["rrf k=60"] = retrieval_metrics(data.qrels, fused_run(
        legs, chunk_doc, lambda b, d: rrf({"bm25": b, "dense": d[:300]}, k=60)))
    for alpha in (0.3, 0.4, 0.5, 0.6, 0.7):
        results["ndcg"][f"convex alpha={alpha}"] = retrieval_metrics(data.qrels, fused_run(
            legs, chunk_doc, lambda b, d, a=alpha: convex(b, d, alpha=a)))

    queries = list(data.queries.values())[: args.latency_queries]
    results["latency_ms"] = latency(searcher, encoder, queries)
    results["latency_ms"]["bm25s"] = {"p50": percentile(ref_lat, 50), "p95": percentile(ref_lat, 95)}
    results["indexing"] = throughput(data, config, encoder, args.throughput_docs)
    results["default_fusion"] = config.fusion.model_dump(mode="json")
    report(results)
    out = args.out or ROOT / "bench" / "results" / f"retrieval-{args.data.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwritten to {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")


def report(results: dict) -> None:
    ref = results["ndcg"]["bm25s (reference)"]["ndcg@10"]
    print(f"\n{'system':24} {'nDCG@10':>8} {'R@100':>7} {'MRR@10':>7}  vs bm25s")
    for name, m in results["ndcg"].items():
        print(f"{name:24} {m['ndcg@10']:8.4f} {m['recall@100']:7.4f} {m['mrr@10']:7.4f}  {m['ndcg@10'] - ref:+.4f}")
    lat = results["latency_ms"]
    print("\nlatency ms (k=10)       p50     p95")
    for name, v in lat.items():
        print(f"{name:20} {v['p50']:7.2f} {v['p95']:7.2f}")
    print(f"hybrid p50 - bare embedding p50 = {lat['hybrid']['p50'] - lat['embed']['p50']:.2f} ms (target <= 10)")
    ix = results["indexing"]
    print(f"\nindexing {ix['chunks']} chunks: pipeline {ix['index_chunks_per_s']:.1f}/s, encoder alone "
          f"{ix['encoder_chunks_per_s']:.1f}/s, ratio {ix['ratio']:.2f} (target >= 0.80)")


if __name__ == "__main__":
    main()
