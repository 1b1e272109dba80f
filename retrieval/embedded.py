"""The embedded search backend: one SQLite file with BM25 (FTS5) and dense vectors.

Why SQLite (see docs/retrieval.md for the measurements): transactions make indexing
durable and incremental — each batch of documents commits atomically, so a killed indexer
leaves a consistent index and a re-run completes it, skipping what is already there —
and FTS5's BM25 matched bm25s's nDCG@10 on SciFact. Vectors are float32 blobs in the same
rows; searching them is an exact dot product in numpy over a matrix cached in memory and
reloaded only when the index's generation counter moves.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from atelier.errors import AtelierError
from retrieval.fusion import FusionConfig, FusionMethod, fuse
from retrieval.text import fts5_match
from retrieval.types import DocumentEntry, Hit, Mode

SCHEMA_VERSION = "1"
TOKENIZER = "porter unicode61 remove_diacritics 2"

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS documents (
    doc_id TEXT PRIMARY KEY, content_hash TEXT NOT NULL, title TEXT NOT NULL, source TEXT NOT NULL,
    root TEXT NOT NULL, n_chunks INTEGER NOT NULL, indexed_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS documents_root ON documents(root);
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY, doc_id TEXT NOT NULL, idx INTEGER NOT NULL, title TEXT NOT NULL,
    source TEXT NOT NULL, text TEXT NOT NULL, start INTEGER NOT NULL, "end" INTEGER NOT NULL,
    vector BLOB NOT NULL, UNIQUE (doc_id, idx));
CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts USING fts5(body, tokenize='{TOKENIZER}');
"""


class EmbeddedIndex:
    """A hybrid index in one SQLite file (`path`), safe to share between threads."""

    def __init__(self, path: Path, *, dim: int | None, model_name: str, fusion: FusionConfig | None = None):
        """Open or create the index at `path`; `dim=None` opens an existing index with the dim it was built with."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.dim, self.model_name = dim, model_name
        self.fusion = fusion or FusionConfig()
        self._lock = threading.RLock()
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise AtelierError(f"{self.path} is not a usable index ({exc}); delete it and run `atelier index` again") from None
        self._check_meta()
        self._matrix: np.ndarray | None = None
        self._row_ids: np.ndarray | None = None
        self._matrix_generation = -1

    # -- metadata ---------------------------------------------------------------------
    def _meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def _check_meta(self) -> None:
        with self._lock:
            model, dim = self._meta("model"), self._meta("dim")
            if self.dim is None:
                if dim is None:
                    raise AtelierError(f"{self.path} holds no index yet; build one with `atelier index DIR`")
                self.dim = int(dim)
            if model is None:
                self._db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", [
                    ("schema", SCHEMA_VERSION), ("model", self.model_name), ("dim", str(self.dim)), ("generation", "0")])
            elif model != self.model_name or int(dim or 0) != self.dim:
                raise AtelierError(
                    f"the index at {self.path} was built with embedding model {model!r} ({dim}-d), not "
                    f"{self.model_name!r} ({self.dim}-d); pass --model {model} or use another --index name")

    def _generation(self) -> int:
        return int(self._meta("generation") or 0)

    # -- writes -----------------------------------------------------------------------
    def document_hashes(self, root: str | None = None) -> dict[str, str]:
        with self._lock:
            sql, args = "SELECT doc_id, content_hash FROM documents", ()
            if root is not None:
                sql, args = sql + " WHERE root = ?", (root,)
            return dict(self._db.execute(sql, args).fetchall())

    def upsert(self, entries: Iterable[DocumentEntry]) -> None:
        """Add or replace documents in one transaction: all of them land, or none."""
        entries = list(entries)
        with self._lock, self._transaction():
            self._delete_chunks([e.doc_id for e in entries])
            now = time.time()
            for entry in entries:
                if entry.vectors.shape != (len(entry.chunks), self.dim):
                    raise ValueError(f"{entry.doc_id}: vectors {entry.vectors.shape} != ({len(entry.chunks)}, {self.dim})")
                vectors = np.ascontiguousarray(entry.vectors, dtype=np.float32)
                for chunk, vector in zip(entry.chunks, vectors):
                    cursor = self._db.execute(
                        'INSERT INTO chunks (doc_id, idx, title, source, text, start, "end", vector) VALUES (?,?,?,?,?,?,?,?)',
                        (entry.doc_id, chunk.index, chunk.title, chunk.source, chunk.text, chunk.start, chunk.end,
                         vector.tobytes()))
                    self._db.execute("INSERT INTO chunks_fts (rowid, body) VALUES (?, ?)",
                                     (cursor.lastrowid, chunk.search_text()))
                self._db.execute("INSERT OR REPLACE INTO documents VALUES (?,?,?,?,?,?,?)",
                                 (entry.doc_id, entry.content_hash, entry.title, entry.source, entry.root,
                                  len(entry.chunks), now))

    def delete(self, doc_ids: Iterable[str]) -> int:
        doc_ids = list(doc_ids)
        with self._lock, self._transaction():
            self._delete_chunks(doc_ids)
            removed = 0
            for doc_id in doc_ids:
                removed += self._db.execute("DELETE FROM documents WHERE doc_id = ?", (doc_id,)).rowcount
            return removed

    def _delete_chunks(self, doc_ids: list[str]) -> None:
        for doc_id in doc_ids:
            ids = [row[0] for row in self._db.execute("SELECT id FROM chunks WHERE doc_id = ?", (doc_id,))]
            if ids:
                self._db.executemany("DELETE FROM chunks_fts WHERE rowid = ?", [(i,) for i in ids])
                self._db.execute("DELETE FROM chunks WHERE doc_id = ?", (doc_id,))

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT, bumping the generation so readers reload vectors."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'")
        self._db.execute("COMMIT")

    # -- search -----------------------------------------------------------------------
    def _vectors(self) -> tuple[np.ndarray, np.ndarray]:
        generation = self._generation()
        if self._matrix is None or generation != self._matrix_generation:
            rows = self._db.execute("SELECT id, vector FROM chunks ORDER BY id").fetchall()
            self._row_ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
            blob = b"".join(r[1] for r in rows)
            self._matrix = np.frombuffer(blob, dtype=np.float32).reshape(len(rows), self.dim) if rows else \
                np.zeros((0, self.dim), dtype=np.float32)
            self._matrix_generation = generation
        return self._row_ids, self._matrix

    def _bm25(self, query: str, limit: int) -> list[tuple[int, float]]:
        match = fts5_match(query)
        if match is None:
            return []
        rows = self._db.execute("SELECT rowid, -bm25(chunks_fts) FROM chunks_fts WHERE chunks_fts MATCH ? "
                                "ORDER BY rank LIMIT ?", (match, limit)).fetchall()
        return [(int(r), float(s)) for r, s in rows]

    def _dense(self, query_vector: np.ndarray, limit: int, include: Iterable[int] = ()) -> list[tuple[int, float]]:
        """Top `limit` rows by cosine, plus the scores of the `include` rows (for fusion)."""
        row_ids, matrix = self._vectors()
        if not len(row_ids):
            return []
        scores = matrix @ np.asarray(query_vector, dtype=np.float32)
        limit = min(limit, len(scores))
        top = np.argpartition(-scores, limit - 1)[:limit]
        top = top[np.argsort(-scores[top], kind="stable")]
        ranking = [(int(row_ids[i]), float(scores[i])) for i in top]
        extra = set(include) - {r for r, _ in ranking}
        if extra:
            positions = np.searchsorted(row_ids, sorted(extra))
            ranking += [(int(row_ids[p]), float(scores[p])) for p in positions]
        return ranking

    def search(self, query: str, k: int = 10, mode: Mode = Mode.hybrid,
               query_vector: np.ndarray | None = None) -> list[Hit]:
        mode = Mode(mode)
        if mode is not Mode.bm25 and query_vector is None:
            raise ValueError(f"{mode.value} search needs the query's embedding (query_vector)")
        depth = max(k, self.fusion.candidates)
        with self._lock:
            if mode is Mode.bm25:
                lexical = self._bm25(query, k)
                return self._hits([(r, s, {"bm25": s}) for r, s in lexical])
            if mode is Mode.dense:
                semantic = self._dense(query_vector, k)
                return self._hits([(r, s, {"dense": s}) for r, s in semantic])
            lexical = self._bm25(query, depth)
            # exact search scores every chunk anyway: give fusion the dense score of each BM25 candidate too
            include = [r for r, _ in lexical] if self.fusion.method is FusionMethod.convex else ()
            semantic = self._dense(query_vector, depth, include=include)
            fused = fuse([(str(r), s) for r, s in lexical], [(str(r), s) for r, s in semantic], self.fusion)[:k]
            legs = {"bm25": dict(lexical), "dense": dict(semantic)}
            return self._hits([(int(key), score, {leg: legs[leg][int(key)] for leg in legs if int(key) in legs[leg]})
                               for key, score in fused])

    def _hits(self, ranked: list[tuple[int, float, dict[str, float]]]) -> list[Hit]:
        if not ranked:
            return []
        ids = [r for r, _, _ in ranked]
        rows = self._db.execute(
            f'SELECT id, doc_id, idx, title, source, text, start, "end" FROM chunks WHERE id IN ({",".join("?" * len(ids))})',
            ids).fetchall()
        by_id = {row[0]: row for row in rows}
        hits = []
        for rank, (row_id, score, legs) in enumerate(ranked, start=1):
            _, doc_id, idx, title, source, text, start, end = by_id[row_id]
            hits.append(Hit(doc_id=doc_id, chunk_id=f"{doc_id}#{idx}", title=title, source=source, text=text,
                            start=start, end=end, score=float(score), rank=rank, scores=legs))
        return hits

    def stats(self) -> dict:
        with self._lock:
            documents = self._db.execute("SELECT COUNT(*) FROM documents").fetchone()[0]
            chunks = self._db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]
        return {"backend": "embedded", "path": str(self.path), "documents": documents, "chunks": chunks,
                "model": self.model_name, "dim": self.dim, "fusion": self.fusion.model_dump(mode="json")}

    def close(self) -> None:
        with self._lock:
            self._db.close()
