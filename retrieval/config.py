"""One typed config for indexing and search, and the functions that build what it describes."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path

import numpy as np
from pydantic import Field

from atelier.config import StrictModel
from atelier.errors import AtelierError
from atelier.home import atelier_home
from retrieval.chunking import ChunkConfig
from retrieval.documents import DocumentsConfig
from retrieval.elastic import ElasticsearchConfig
from retrieval.embeddings import EmbeddingConfig, Encoder, get_encoder
from retrieval.fusion import FusionConfig
from retrieval.types import Hit, Mode, SearchBackend


class BackendName(str, Enum):
    embedded = "embedded"
    elasticsearch = "elasticsearch"


class RetrievalConfig(StrictModel):
    """Indexing and search: the backend and index, how documents load and are chunked, embedded and fused."""

    backend: BackendName = Field(BackendName.embedded, description="Where the index lives: embedded (SQLite under ATELIER_HOME) or elasticsearch.")
    index: str = Field("default", pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$", description="Index name (lower case), so one home can hold several indexes.")
    batch_chunks: int = Field(1024, ge=1, description="Chunks embedded and committed per transaction while indexing (a killed run loses at most one batch; a longer document spans several).")
    documents: DocumentsConfig = Field(default_factory=DocumentsConfig, description="Which files of the folder are loaded: symlinks, the size cap.")
    chunking: ChunkConfig = Field(default_factory=ChunkConfig, description="How documents are cut into chunks.")
    embedding: EmbeddingConfig = Field(default_factory=EmbeddingConfig, description="The sentence-embedding model for the dense leg.")
    fusion: FusionConfig = Field(default_factory=FusionConfig, description="How hybrid search fuses BM25 and dense results.")
    elasticsearch: ElasticsearchConfig = Field(default_factory=ElasticsearchConfig, description="Cluster settings, used with backend: elasticsearch.")


def embedded_path(index: str) -> Path:
    return atelier_home() / "indexes" / index / "index.sqlite"


def index_lock_path(config: RetrievalConfig) -> Path:
    """The lock file that one writer of the configured index holds (under ATELIER_HOME)."""
    if config.backend is BackendName.elasticsearch:
        name = config.elasticsearch.index if config.index == "default" else config.index
        return atelier_home() / "indexes" / f"elasticsearch-{name}.lock"
    return embedded_path(config.index).with_name("index.lock")


@contextmanager
def index_lock(config: RetrievalConfig) -> Iterator[None]:
    """Hold the configured index's writer lock; refuse at once if another process holds it.

    Two `atelier index` runs on one index would both embed everything and misreport what they
    did. The lock is an OS file lock, so a killed holder releases it; with Elasticsearch it
    only guards writers on this machine.
    """
    from filelock import FileLock, Timeout

    path = index_lock_path(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path, blocking=False)
    try:
        lock.acquire()
    except Timeout:
        raise AtelierError(f"index {config.index!r} is being written by another `atelier index` (it holds {path}); "
                           "wait for that run to finish, or pass another --index name") from None
    try:
        yield
    finally:
        lock.release()


def open_backend(config: RetrievalConfig, *, dim: int | None, create: bool = True) -> SearchBackend:
    """The configured backend, opened (and created when `create`) for a `dim`-d embedding model.

    `dim=None` opens an existing embedded index without loading the encoder (BM25-only use).
    """
    if config.backend is BackendName.elasticsearch:
        from retrieval.elastic import ElasticsearchIndex

        es_config = config.elasticsearch.model_copy(update={"index": config.elasticsearch.index if
                                                              config.index == "default" else config.index})
        return ElasticsearchIndex(es_config, dim=dim, model_name=config.embedding.model, fusion=config.fusion,
                                  create=create)
    from retrieval.embedded import EmbeddedIndex

    if not create:
        require_embedded_index(config)
    return EmbeddedIndex(embedded_path(config.index), dim=dim, model_name=config.embedding.model, fusion=config.fusion)


def require_embedded_index(config: RetrievalConfig) -> None:
    """Refuse a missing embedded index at once (before seconds of loading the encoder for it)."""
    if config.backend is BackendName.embedded and not embedded_path(config.index).exists():
        raise AtelierError(f"no index named {config.index!r} under {atelier_home()}; "
                           "build one first with `atelier index DIR`")


def index_with_progress(docs, store: SearchBackend, encoder: Encoder, config: RetrievalConfig, *,
                        root: str | None = None, prune: bool = False, show: bool = True,
                        description: str = "embedding chunks"):
    """Bring `store` in line with `docs` under a progress bar sized by the exact work to do."""
    from atelier.progress import progress_bar
    from retrieval.indexer import index_documents, plan

    work = plan(docs, store, config.chunking, config.embedding.model, root, prune)
    with progress_bar(description, total=work.chunks_estimate, enabled=show and bool(work.to_index)) as advance:
        return index_documents(docs, store, encoder.encode, chunking=config.chunking, model=config.embedding.model,
                               root=root, prune=prune, batch_chunks=config.batch_chunks, progress=advance,
                               planned=work)


class Searcher:
    """A backend plus the encoder that embeds queries for its dense leg."""

    def __init__(self, backend: SearchBackend, encoder: Encoder | None, embedding: EmbeddingConfig | None = None):
        self.backend, self.encoder = backend, encoder
        self._embedding = embedding or EmbeddingConfig()

    @classmethod
    def open(cls, config: RetrievalConfig, *, lexical_only: bool = False) -> Searcher:
        """Open the configured index; `lexical_only` skips loading the encoder where the backend allows."""
        if lexical_only:
            return cls(open_backend(config, dim=None, create=False), None, config.embedding)
        require_embedded_index(config)
        encoder = get_encoder(config.embedding)
        return cls(open_backend(config, dim=encoder.dim, create=False), encoder, config.embedding)

    def search(self, query: str, k: int = 10, mode: Mode = Mode.hybrid) -> list[Hit]:
        mode = Mode(mode)
        if not query.strip():
            raise AtelierError("the query is empty; pass some words to search for")
        vector: np.ndarray | None = None
        if mode is not Mode.bm25:
            if self.encoder is None:
                self.encoder = get_encoder(self._embedding)
            vector = self.encoder.encode_query(query)
        return self.backend.search(query, k=k, mode=mode, query_vector=vector)

    def close(self) -> None:
        self.backend.close()
