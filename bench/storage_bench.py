"""Which storage for the embedded index? Candidates measured on the same chunks and vectors.

    .venv/bin/python bench/storage_bench.py            # candidates A and B
    /path/to/venv-with-lancedb/bin/python bench/storage_bench.py --export-only  (see docs/retrieval.md)

Candidates (all hold BM25 + dense vectors on one machine):
  A. SQLite FTS5 (BM25) + float32 vectors in the same SQLite rows, searched with numpy  [chosen]
  B. bm25s (in-memory sparse BM25) + a numpy matrix, both rebuilt from scratch on change
  C. LanceDB (Arrow tables on disk, native full-text index + vector search), when importable
Reads the chunks and their vectors from the retrieval benchmark's cached index (run
bench/retrieval_bench.py first), so no candidate pays for embedding. Reports build time,
BM25 nDCG@10 (documents scored by their best chunk), BM25 and dense p50 latency, the cost of
adding one document to an existing index, and what a crash mid-write leaves behind.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import json
import re
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def load_cached(cache: Path):
    db = sqlite3.connect(cache / "index.sqlite")
    rows = db.execute("SELECT doc_id, title, text, vector FROM chunks ORDER BY id").fetchall()
    db.close()
    doc_ids = [r[0] for r in rows]
    texts = [f"{r[1]}\n{r[2]}" if r[1] else r[2] for r in rows]
    vectors = np.frombuffer(b"".join(r[3] for r in rows), dtype=np.float32).reshape(len(rows), -1)
    return doc_ids, texts, vectors


def load_queries(data: Path, split: str):
    qrels: dict[str, dict[str, int]] = {}
    for line in (data / "qrels" / f"{split}.tsv").read_text().splitlines()[1:]:
        q, d, s = line.split("\t")
        qrels.setdefault(q, {})[d] = int(s)
    queries = {}
    for line in (data / "queries.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["_id"] in qrels:
            queries[row["_id"]] = row["text"]
    return queries, qrels


def ndcg(qrels, runs) -> float:
    import pytrec_eval

    result = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10"}).evaluate(runs)
    return float(np.mean([v["ndcg_cut_10"] for v in result.values()]))


def to_doc_run(chunk_ids, doc_ids) -> dict[str, float]:
    run: dict[str, float] = {}
    for rank, c in enumerate(chunk_ids):
        run.setdefault(doc_ids[c], float(len(chunk_ids) - rank))
    return run


def p50(values) -> float:
    return float(np.percentile(values, 50)) * 1000


def timed_queries(queries, search):
    runs, lat = {}, []
    for qid, text in queries.items():
        started = time.perf_counter()
        ids = search(text)
        lat.append(time.perf_counter() - started)
        runs[qid] = ids
    return runs, lat


def candidate_sqlite(doc_ids, texts, vectors, queries, qrels, query_vectors):
    def fts5_match(text):  # OR of the query's words, each quoted, stopwords dropped
        from bm25s.stopwords import STOPWORDS_EN

        words = [w for w in dict.fromkeys(re.findall(r"\w+", text.lower())) if w not in STOPWORDS_EN]
        return " OR ".join(f'"{w}"' for w in words) or '""'

    with tempfile.TemporaryDirectory() as tmp:
        db = sqlite3.connect(Path(tmp) / "a.sqlite", isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE VIRTUAL TABLE f USING fts5(body, tokenize='porter unicode61 remove_diacritics 2')")
        db.execute("CREATE TABLE v (id INTEGER PRIMARY KEY, vector BLOB)")
        started = time.perf_counter()
        db.execute("BEGIN")
        db.executemany("INSERT INTO f (rowid, body) VALUES (?, ?)", enumerate(texts))
        db.executemany("INSERT INTO v VALUES (?, ?)", ((i, v.tobytes()) for i, v in enumerate(vectors)))
        db.execute("COMMIT")
        build = time.perf_counter() - started

        def bm25(text):
            match = fts5_match(text)
            rows = db.execute("SELECT rowid FROM f WHERE f MATCH ? ORDER BY rank LIMIT 300", (match,)).fetchall()
            return [r[0] for r in rows]

        runs, lat = timed_queries(queries, bm25)
        started = time.perf_counter()
        matrix = np.frombuffer(b"".join(r[0] for r in db.execute("SELECT vector FROM v ORDER BY id")),
                               dtype=np.float32).reshape(len(texts), -1)
        load = time.perf_counter() - started
        dense_lat = _dense_latency(matrix, query_vectors)
        started = time.perf_counter()
        db.execute("BEGIN")
        db.execute("INSERT INTO f (rowid, body) VALUES (?, ?)", (len(texts), "a new document about pump seals"))
        db.execute("INSERT INTO v VALUES (?, ?)", (len(texts), vectors[0].tobytes()))
        db.execute("COMMIT")
        update = time.perf_counter() - started
        db.close()
    return {"build_s": build, "bm25_ndcg@10": ndcg(qrels, {q: to_doc_run(ids, doc_ids) for q, ids in runs.items()}),
            "bm25_p50_ms": p50(lat), "dense_p50_ms": dense_lat, "vector_load_s": load, "add_one_doc_s": update,
            "crash_mid_write": "transaction rolls back: index as before the batch"}


def _dense_latency(matrix, query_vectors) -> float:
    lat = []
    for q in query_vectors:
        started = time.perf_counter()
        scores = matrix @ q
        top = np.argpartition(-scores, 100)[:100]
        top[np.argsort(-scores[top])]
        lat.append(time.perf_counter() - started)
    return p50(lat)


def candidate_bm25s(doc_ids, texts, vectors, queries, qrels, query_vectors):
    import bm25s
    import Stemmer

    stemmer = Stemmer.Stemmer("english")

    def build(corpus):
        retriever = bm25s.BM25(k1=1.2, b=0.75)
        retriever.index(bm25s.tokenize(corpus, stopwords="en", stemmer=stemmer, show_progress=False),
                        show_progress=False)
        return retriever

    started = time.perf_counter()
    retriever = build(texts)
    build_s = time.perf_counter() - started

    def bm25(text):
        ids, _ = retriever.retrieve(bm25s.tokenize([text], stopwords="en", stemmer=stemmer, show_progress=False),
                                    k=300, show_progress=False)
        return [int(i) for i in ids[0]]

    runs, lat = timed_queries(queries, bm25)
    started = time.perf_counter()
    build([*texts, "a new document about pump seals"])  # bm25s has no incremental add: rebuild
    np.vstack([vectors, vectors[:1]])
    update = time.perf_counter() - started
    return {"build_s": build_s, "bm25_ndcg@10": ndcg(qrels, {q: to_doc_run(ids, doc_ids) for q, ids in runs.items()}),
            "bm25_p50_ms": p50(lat), "dense_p50_ms": _dense_latency(vectors, query_vectors), "add_one_doc_s": update,
            "crash_mid_write": "nothing durable until a full save: needs its own write-rename protocol"}


def candidate_lancedb(doc_ids, texts, vectors, queries, qrels, query_vectors):
    import lancedb
    import pyarrow as pa

    with tempfile.TemporaryDirectory() as tmp:
        db = lancedb.connect(tmp)
        started = time.perf_counter()
        table = db.create_table("chunks", pa.table({
            "id": pa.array(range(len(texts)), pa.int64()), "body": texts,
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])}))
        table.create_fts_index("body", use_tantivy=False, stem=True, remove_stop_words=True, language="English")
        build = time.perf_counter() - started

        def bm25(text):
            clean = " ".join(re.findall(r"\w+", text))
            rows = table.search(clean, query_type="fts").limit(300).select(["id"]).to_list()
            return [r["id"] for r in rows]

        runs, lat = timed_queries(queries, bm25)
        dense = []
        for q in query_vectors:
            started = time.perf_counter()
            table.search(q, vector_column_name="vector").metric("dot").limit(100).select(["id"]).to_list()
            dense.append(time.perf_counter() - started)
        started = time.perf_counter()
        table.add(pa.table({"id": pa.array([len(texts)], pa.int64()), "body": ["a new document about pump seals"],
                            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors[0]), vectors.shape[1])}))
        update = time.perf_counter() - started
    return {"build_s": build, "bm25_ndcg@10": ndcg(qrels, {q: to_doc_run(ids, doc_ids) for q, ids in runs.items()}),
            "bm25_p50_ms": p50(lat), "dense_p50_ms": p50(dense), "add_one_doc_s": update,
            "crash_mid_write": "versioned dataset: a failed append is not committed; FTS index must be rebuilt/optimized"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "scifact-train")
    parser.add_argument("--split", default="train")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "storage-scifact-train.json")
    args = parser.parse_args()
    doc_ids, texts, vectors = load_cached(ROOT / "bench" / ".cache" / args.data.name)
    queries, qrels = load_queries(args.data, args.split)
    rng = np.random.default_rng(0)
    query_vectors = vectors[rng.choice(len(vectors), 200, replace=False)]  # stand-ins: same distribution
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    results["chunks"] = len(texts)
    candidates = {"A: sqlite-fts5 + numpy": candidate_sqlite, "B: bm25s + numpy": candidate_bm25s,
                  "C: lancedb": candidate_lancedb}
    for name, run in candidates.items():
        try:
            results[name] = run(doc_ids, texts, vectors, queries, qrels, query_vectors)
        except ImportError as exc:
            print(f"{name}: skipped ({exc.name} not installed)")
            continue
        print(name, json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in results[name].items()}))
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
