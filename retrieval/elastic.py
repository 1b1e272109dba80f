"""Elasticsearch as the search backend: the same contract as the embedded index, on a cluster.

Two indices per Atelier index name:

* `{index}` holds one record per chunk, `_id` = chunk id, so re-indexing overwrites instead
  of duplicating. `body` (title + chunk text, what BM25 sees) uses the `english` analyzer:
  it stems, as the embedded backend's porter tokenizer does, so "indexing" matches
  "indexed" on both backends (it also drops English stopwords). `vector` is a cosine
  `dense_vector`; the mapping's `_meta` records the embedding model and dimension, and an
  index built with another model is refused rather than searched with incomparable vectors.
* `{index}-docs` holds one record per document with its content hash. It is written last,
  only for documents whose every chunk was stored, so a killed or partly failed run leaves
  those documents absent (or at their old hash) and the next run redoes them. Its mapping's
  `_meta.written` is a fresh random token after every write, which the router reads on each
  request as the index's `fingerprint()` (one small request). A token rather than a counter:
  two writers at once need no read-modify-write, and each leaves a value never seen before.

Hybrid search with rrf fusion uses the server's `rrf` retriever: one round trip. Clusters
whose licence lacks it answer 403, and those before 8.14 do not know retrievers; then one
warning is logged and the two legs are fused here with `retrieval.fusion.fuse`, as they
always are for convex fusion, which has no server-side equivalent across the 8.x versions
targeted; fusing here also runs the very code the embedded backend uses. One difference
remains: the dense leg is approximate (HNSW) and only its top `fusion.candidates` carry a
dense score, where the embedded backend scores every BM25 candidate exactly.

Every call to the cluster goes through `_cluster`, which turns connection, TLS,
authentication and API failures into an `AtelierError` that says what to check.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from atelier.errors import AtelierError
from atelier.redact import redact_url
from retrieval.elastic_config import _MAX_CANDIDATES, ElasticsearchConfig, connect
from retrieval.fusion import FusionConfig, FusionMethod, fuse
from retrieval.types import DocumentEntry, Hit, IndexSummary, Mode

__all__ = ["BulkReport", "ElasticsearchConfig", "ElasticsearchIndex", "connect"]

if TYPE_CHECKING:
    from elasticsearch import Elasticsearch

log = logging.getLogger(__name__)

_SOURCE = {"excludes": ["vector"]}
_PAGE = 1000  # documents per page when listing hashes, ids per delete request


@dataclass
class BulkReport:
    """What a bulk write did, item by item: a 200 bulk response can still hold failed items."""

    succeeded: int = 0
    failures: list[tuple[str, int, str]] = field(default_factory=list)  # (_id, HTTP status, reason)

    @property
    def failed(self) -> int:
        return len(self.failures)

    @property
    def failed_ids(self) -> set[str]:
        return {item_id for item_id, _, _ in self.failures}

    def merge(self, other: BulkReport) -> None:
        self.succeeded += other.succeeded
        self.failures.extend(other.failures)

    def summary(self, first: int = 3) -> str:
        shown = "; ".join(f"{item_id} ({status}: {reason})" for item_id, status, reason in self.failures[:first])
        more = f"; and {self.failed - first} more" if self.failed > first else ""
        return f"{self.failed} of {self.succeeded + self.failed} items failed: {shown}{more}"


def _item_reason(info: dict) -> str:
    error = info.get("error")
    if isinstance(error, dict):
        return f"{error.get('type', 'error')}: {error.get('reason', '')}"[:300]
    return str(error)[:300]


def _short_reason(exc: BaseException) -> str:
    """The telling part of a transport error ("[Errno 111] Connection refused"), searched through its causes."""
    pending, texts = [exc], []
    while pending and len(texts) < 20:
        error = pending.pop(0)
        texts.append(f"{error} {error!r}")
        pending.extend(getattr(error, "errors", ()) or ())
        pending.extend(e for e in (error.__cause__, error.__context__) if e is not None)
    found = re.search(r"\[Errno -?\d+\][^)'\"]*|\[SSL: \w+\][^()'\"]*|timed out", " ".join(texts))
    return found.group(0).strip() if found else str(exc)[-200:]


def _rrf_unavailable(exc: Exception) -> bool:
    """True when a search failed because this cluster cannot run the rrf retriever (licence or version)."""
    status = getattr(getattr(exc, "meta", None), "status", None)
    text = str(getattr(exc, "body", "") or exc).lower()
    licence = "license" in text or "licence" in text
    unknown = any(word in text for word in ("unknown", "unrecognized", "not supported", "no such"))
    return status in (400, 403) and (licence or (unknown and ("retriever" in text or "rrf" in text)))


class ElasticsearchIndex:
    """A `SearchBackend` on an Elasticsearch 8.x cluster; see the module docstring."""

    name = "elasticsearch"

    def __init__(self, config: ElasticsearchConfig, *, dim: int | None, model_name: str, fusion: FusionConfig,
                 client: Elasticsearch | None = None, create: bool = True):
        """Open (and when `create`, create) the index; `dim=None` takes the dim an existing index was built with."""
        self.config = config
        self.dim = dim
        self.model_name = model_name
        self.fusion = fusion
        self.chunks_index = config.index
        self.docs_index = f"{config.index}-docs"
        self.url = redact_url(config.url)
        self._server_rrf = config.server_rrf
        self.client = client if client is not None else connect(config)
        self._open(create)

    # -- talking to the cluster -------------------------------------------------------------

    @contextmanager
    def _cluster(self, action: str) -> Iterator[None]:
        """Turn client failures into one-line AtelierErrors that name what to check."""
        from elasticsearch import (
            ApiError,
            AuthenticationException,
            AuthorizationException,
            ConnectionTimeout,
            SSLError,
            TransportError,
            UnsupportedProductError,
        )
        from elasticsearch import ConnectionError as ESConnectionError

        where = f"Elasticsearch at {self.url}"
        try:
            yield
        except SSLError as exc:
            raise AtelierError(f"TLS to {where} failed ({_short_reason(exc)}) while trying to {action}; set "
                               "ELASTICSEARCH_CA_CERTS to the cluster's CA file, or check the https URL") from None
        except ESConnectionError as exc:
            raise AtelierError(f"cannot reach {where} ({_short_reason(exc)}) while trying to {action}; "
                               "check ELASTICSEARCH_URL and that the cluster is running") from None
        except ConnectionTimeout:
            raise AtelierError(f"{where} did not answer within {self.config.request_timeout:g} s while trying to "
                               f"{action}; check the cluster's health or raise request_timeout") from None
        except TransportError as exc:
            raise AtelierError(f"talking to {where} failed while trying to {action}: {_short_reason(exc)}") from None
        except AuthenticationException:
            raise AtelierError(f"{where} rejected the credentials (401) while trying to {action}; set "
                               "ELASTICSEARCH_API_KEY, or ELASTICSEARCH_USERNAME and ELASTICSEARCH_PASSWORD") from None
        except AuthorizationException as exc:
            raise AtelierError(f"{where} refused to {action} (403: {exc.message}); give the API key or user read, "
                               f"write and manage privileges on {self.chunks_index} and {self.docs_index}") from None
        except UnsupportedProductError:
            raise AtelierError(f"the server at {self.url} is not Elasticsearch; check ELASTICSEARCH_URL") from None
        except ApiError as exc:
            raise AtelierError(f"{where} failed to {action}: {exc}") from None

    def _open(self, create: bool) -> None:
        """Create both indices if missing; refuse an index built with another model or dimension."""
        with self._cluster(f"open index {self.chunks_index}"):
            if self.client.indices.exists(index=self.chunks_index):
                self._check_meta()
            elif create and self.dim is not None:
                self._create(self.chunks_index, self._chunk_mappings())
            else:
                raise AtelierError(f"no index {self.chunks_index} at {self.url}; build it first with "
                                   "`atelier index DIR --backend elasticsearch`")
            if not self.client.indices.exists(index=self.docs_index):
                self._create(self.docs_index, self._doc_mappings())

    def _create(self, index: str, mappings: dict) -> None:
        from elasticsearch import BadRequestError

        log.info("creating Elasticsearch index %s at %s", index, self.url)
        try:
            self.client.indices.create(index=index, mappings=mappings)
        except BadRequestError as exc:  # another process created it first
            if exc.message != "resource_already_exists_exception":
                raise

    def _check_meta(self) -> None:
        response = self.client.indices.get_mapping(index=self.chunks_index)
        meta = next(iter(response.body.values()), {}).get("mappings", {}).get("_meta", {})
        fix = f"pass another index name, or delete index {self.chunks_index} (and {self.docs_index}) to rebuild it"
        if "model" not in meta or "dim" not in meta:
            raise AtelierError(f"index {self.chunks_index} at {self.url} was not created by Atelier; {fix}")
        if self.dim is None:
            self.dim = int(meta["dim"])
        if meta["model"] != self.model_name or int(meta["dim"]) != self.dim:
            raise AtelierError(f"index {self.chunks_index} at {self.url} holds {meta['dim']}-d vectors from "
                               f"{meta['model']}, not {self.dim}-d from {self.model_name}; {fix}")

    def _chunk_mappings(self) -> dict:
        return {
            "_meta": {"model": self.model_name, "dim": self.dim, "created_by": "atelier"},
            "dynamic": "strict",
            "properties": {
                "doc_id": {"type": "keyword"},
                "chunk_id": {"type": "keyword"},
                "chunk_index": {"type": "integer"},
                "title": {"type": "text", "analyzer": "english"},
                "body": {"type": "text", "analyzer": "english"},
                "text": {"type": "text", "index": False},
                "source": {"type": "keyword"},
                "root": {"type": "keyword"},
                "start": {"type": "integer"},
                "end": {"type": "integer"},
                "vector": {"type": "dense_vector", "dims": self.dim, "index": True, "similarity": "cosine"},
            },
        }

    @staticmethod
    def _doc_mappings() -> dict:
        return {
            "dynamic": "strict",
            "properties": {
                "doc_id": {"type": "keyword"},
                "content_hash": {"type": "keyword"},
                "root": {"type": "keyword"},
                "n_chunks": {"type": "integer"},
                "title": {"type": "text"},
                "source": {"type": "keyword"},
            },
        }

    def _bulk(self, actions: Iterable[dict]) -> BulkReport:
        """Send actions with streaming_bulk (429 items retried) and account for every item."""
        from elasticsearch.helpers import streaming_bulk

        report = BulkReport()
        results = streaming_bulk(self.client, actions, chunk_size=self.config.bulk_chunk_size,
                                 raise_on_error=False, raise_on_exception=False,
                                 max_retries=self.config.max_retries, initial_backoff=self.config.retry_backoff)
        with self._cluster("write to the index"):
            for ok, item in results:
                _op, info = next(iter(item.items()))
                if ok:
                    report.succeeded += 1
                else:
                    report.failures.append((str(info.get("_id")), int(info.get("status", 0)), _item_reason(info)))
        return report

    def _refresh(self) -> None:
        with self._cluster("refresh the index"):
            self.client.indices.refresh(index=[self.chunks_index, self.docs_index])

    def _mark_written(self) -> None:
        """A fresh token in the docs index's `_meta` (see the module docstring): the fingerprint moves."""
        with self._cluster("record the write"):
            self.client.indices.put_mapping(index=self.docs_index, meta={"written": uuid.uuid4().hex})

    def _scan(self, index: str, query: dict, fields: list[str], sort: list[dict],
              limit: int | None = None) -> Iterator[dict]:
        """The `_source` (only `fields`) of the hits of `query`, in `sort` order (unique), paged with search_after."""
        after: list | None = None
        left = limit
        with self._cluster(f"read {index}"):
            while left is None or left > 0:
                size = _PAGE if left is None else min(_PAGE, left)
                page = self.client.search(index=index, query=query, size=size, sort=sort, source=fields,
                                          search_after=after)
                hits = page.body["hits"]["hits"]
                for hit in hits:
                    yield hit["_source"]
                if len(hits) < size:
                    return
                after = hits[-1]["sort"]
                left = None if left is None else left - len(hits)

    # -- the SearchBackend contract ---------------------------------------------------------

    def document_hashes(self, root: str | None = None) -> dict[str, str]:
        query = {"term": {"root": root}} if root is not None else {"match_all": {}}
        records = self._scan(self.docs_index, query, ["doc_id", "content_hash"], [{"doc_id": "asc"}])
        return {record["doc_id"]: record["content_hash"] for record in records}

    def upsert(self, entries: Iterable[DocumentEntry]) -> None:
        report = BulkReport()
        try:
            for batch in self._batches(entries):
                report.merge(self._upsert_batch(batch))
        finally:  # what did land must be visible, and must move the fingerprint
            self._refresh()
            if report.succeeded or report.failed:
                self._mark_written()
        if report.failed:
            raise AtelierError(f"Elasticsearch rejected chunks at {self.url}: {report.summary()}; "
                               "those documents were not recorded and will be retried on the next index run")

    def _batches(self, entries: Iterable[DocumentEntry]) -> Iterator[list[DocumentEntry]]:
        batch: list[DocumentEntry] = []
        size = 0
        for entry in entries:
            if entry.vectors.shape != (len(entry.chunks), self.dim):
                raise ValueError(f"document {entry.doc_id}: vectors of shape {entry.vectors.shape}, "
                                 f"expected ({len(entry.chunks)}, {self.dim})")
            batch.append(entry)
            size += max(1, len(entry.chunks))
            if size >= self.config.bulk_chunk_size:
                yield batch
                batch, size = [], 0
        if batch:
            yield batch

    def _upsert_batch(self, batch: list[DocumentEntry]) -> BulkReport:
        """Chunks first, then stale chunks removed, then document records for what fully landed."""
        report = self._bulk(self._chunk_actions(batch))
        failed_docs = {item_id.rpartition("#")[0] for item_id in report.failed_ids}
        written = [entry for entry in batch if entry.doc_id not in failed_docs]
        if written:
            self._delete_stale_chunks(written)
            report.merge(self._bulk(self._doc_actions(written)))
        return report

    def _chunk_actions(self, batch: list[DocumentEntry]) -> Iterator[dict]:
        for entry in batch:
            for chunk, vector in zip(entry.chunks, entry.vectors):
                yield {"_index": self.chunks_index, "_id": chunk.chunk_id, "_source": {
                    "doc_id": entry.doc_id, "chunk_id": chunk.chunk_id, "chunk_index": chunk.index,
                    "title": chunk.title or entry.title, "body": chunk.search_text(), "text": chunk.text,
                    "source": chunk.source or entry.source, "root": entry.root,
                    "start": chunk.start, "end": chunk.end,
                    "vector": np.asarray(vector, dtype=np.float32).tolist()}}

    def _doc_actions(self, written: list[DocumentEntry]) -> Iterator[dict]:
        for entry in written:
            yield {"_index": self.docs_index, "_id": entry.doc_id, "_source": {
                "doc_id": entry.doc_id, "content_hash": entry.content_hash, "root": entry.root,
                "n_chunks": len(entry.chunks), "title": entry.title, "source": entry.source}}

    def _delete_stale_chunks(self, written: list[DocumentEntry]) -> None:
        """Remove chunks beyond each document's new length (left over when a document shrank)."""
        stale = [{"bool": {"filter": [{"term": {"doc_id": entry.doc_id}},
                                      {"range": {"chunk_index": {"gte": len(entry.chunks)}}}]}}
                 for entry in written]
        with self._cluster("remove stale chunks"):
            self.client.delete_by_query(index=self.chunks_index, conflicts="proceed",
                                        query={"bool": {"should": stale, "minimum_should_match": 1}})

    def delete(self, doc_ids: Iterable[str]) -> int:
        ids = list(dict.fromkeys(doc_ids))
        present = 0
        with self._cluster("delete documents"):
            for start in range(0, len(ids), _PAGE):
                batch = ids[start:start + _PAGE]
                # Chunks before the record: a run killed in between still lists the document, so it is pruned again.
                self.client.delete_by_query(index=self.chunks_index, query={"terms": {"doc_id": batch}},
                                            conflicts="proceed", refresh=True)
                done = self.client.delete_by_query(index=self.docs_index, query={"terms": {"doc_id": batch}},
                                                   conflicts="proceed", refresh=True)
                present += int(done.body.get("deleted", 0))
        if ids:
            self._mark_written()
        return present

    def search(self, query: str, k: int = 10, mode: Mode = Mode.hybrid,
               query_vector: np.ndarray | None = None) -> list[Hit]:
        mode = Mode(mode)
        vector = self._vector(query_vector) if mode is not Mode.bm25 else None
        if mode is Mode.bm25:
            return self._ranked(self._leg("bm25", query, vector, k), k, "bm25")
        if mode is Mode.dense:
            return self._ranked(self._leg("dense", query, vector, k), k, "dense")
        if self.fusion.method is FusionMethod.rrf and self._server_rrf:
            hits = self._server_rrf_search(query, vector, k)
            if hits is not None:
                return hits
        return self._client_fused(query, vector, k)

    def _vector(self, query_vector: np.ndarray | None) -> list[float]:
        if query_vector is None:
            raise ValueError("dense and hybrid search need query_vector (the normalised query embedding)")
        vector = np.asarray(query_vector, dtype=np.float32).ravel()
        if vector.shape != (self.dim,):
            raise ValueError(f"query_vector has {vector.size} dimensions; "
                             f"index {self.chunks_index} holds {self.dim}")
        return vector.tolist()

    def _match(self, query: str) -> dict:
        return {"match": {"body": {"query": query}}}

    def _knn(self, vector: list[float], k: int) -> dict:
        k = min(k, _MAX_CANDIDATES)
        return {"field": "vector", "query_vector": vector, "k": k,
                "num_candidates": max(k, self.config.num_candidates)}

    def _leg(self, leg: str, query: str, vector: list[float] | None, size: int) -> list[dict]:
        """One leg's raw hits, best first; dense `_score`s are turned back into cosine similarity."""
        body: dict[str, Any] = {"query": self._match(query)} if leg == "bm25" else {"knn": self._knn(vector, size)}
        with self._cluster(f"run a {leg} search"):
            response = self.client.search(index=self.chunks_index, size=size, source=_SOURCE, **body)
        hits = response.body["hits"]["hits"]
        if leg == "dense":  # cosine similarity is indexed as (1 + cos) / 2
            for hit in hits:
                hit["_score"] = 2.0 * hit["_score"] - 1.0
        return hits

    def _server_rrf_search(self, query: str, vector: list[float], k: int) -> list[Hit] | None:
        """Hybrid search with the rrf retriever; None (and never again) when the cluster refuses it."""
        from elasticsearch import ApiError

        window = max(k, self.fusion.candidates)
        legs = [{"standard": {"query": self._match(query)}}, {"knn": self._knn(vector, window)}]
        retriever = {"rrf": {"retrievers": legs, "rank_window_size": window, "rank_constant": self.fusion.rrf_k}}
        with self._cluster("run a hybrid search"):
            try:
                response = self.client.search(index=self.chunks_index, size=k, source=_SOURCE, retriever=retriever)
            except ApiError as exc:
                if not _rrf_unavailable(exc):
                    raise
                log.warning("%s cannot run the rrf retriever (%s); fusing the bm25 and dense legs client-side "
                            "from now on", self.url, exc.message)
                self._server_rrf = False
                return None
        hits = response.body["hits"]["hits"]
        for rank, hit in enumerate(hits, start=1):  # 8.14-8.15 answer a null _score: stand in the rrf term of the rank
            if hit.get("_score") is None:
                hit["_score"] = 1.0 / (self.fusion.rrf_k + rank)
        return self._ranked(hits, k, None)

    def _client_fused(self, query: str, vector: list[float], k: int) -> list[Hit]:
        depth = max(k, self.fusion.candidates)
        legs = {leg: self._leg(leg, query, vector, depth) for leg in ("bm25", "dense")}
        sources = {hit["_id"]: hit["_source"] for hits in legs.values() for hit in hits}
        leg_scores = {leg: {hit["_id"]: float(hit["_score"]) for hit in hits} for leg, hits in legs.items()}
        rankings = {leg: [(hit["_id"], float(hit["_score"])) for hit in hits] for leg, hits in legs.items()}
        fused = fuse(rankings["bm25"], rankings["dense"], self.fusion)[:k]
        return [_hit(sources[key], score, rank, {leg: found[key] for leg, found in leg_scores.items() if key in found})
                for rank, (key, score) in enumerate(fused, start=1)]

    @staticmethod
    def _ranked(hits: Sequence[dict], k: int, leg: str | None) -> list[Hit]:
        return [_hit(hit["_source"], float(hit["_score"]), rank, {leg: float(hit["_score"])} if leg else {})
                for rank, hit in enumerate(hits[:k], start=1)]

    def stats(self) -> dict:
        with self._cluster("count documents"):
            documents = self.client.count(index=self.docs_index).body["count"]
            chunks = self.client.count(index=self.chunks_index).body["count"]
        return {"backend": self.name, "url": self.url, "index": self.chunks_index, "documents": documents,
                "chunks": chunks, "model": self.model_name, "dim": self.dim,
                "fusion": self.fusion.model_dump(mode="json")}

    def fingerprint(self) -> str:
        """This index and the token its last write left (empty before any write by this version)."""
        with self._cluster("read the index's fingerprint"):
            response = self.client.indices.get_mapping(index=self.docs_index)
        meta = next(iter(response.body.values()), {}).get("mappings", {}).get("_meta", {})
        return f"elasticsearch:{self.url}/{self.chunks_index}@{meta.get('written', '')}"

    def summary(self, max_titles: int, max_chars: int) -> IndexSummary:
        """Titles from the document records and chunk texts, both by doc_id; at most a few pages of requests."""
        records = self._scan(self.docs_index, {"match_all": {}}, ["title"], [{"doc_id": "asc"}], limit=max_titles)
        titles = [record.get("title", "") for record in records]
        texts: list[str] = []
        size = 0
        chunks = self._scan(self.chunks_index, {"match_all": {}}, ["text"], [{"doc_id": "asc"}, {"chunk_index": "asc"}])
        for chunk in chunks:
            texts.append(chunk.get("text", ""))
            size += len(texts[-1])
            if size >= max_chars:  # before the next page is asked for
                chunks.close()
                break
        return IndexSummary(titles, texts)

    def close(self) -> None:
        self.client.close()


def _hit(source: dict, score: float, rank: int, scores: dict[str, float]) -> Hit:
    return Hit(doc_id=source["doc_id"], chunk_id=source["chunk_id"], title=source.get("title", ""),
               source=source.get("source", ""), text=source.get("text", ""), start=int(source.get("start", 0)),
               end=int(source.get("end", 0)), score=score, rank=rank, scores=scores)
