"""The shapes every search backend shares: a chunk to index, a hit to return, the contract."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Protocol, runtime_checkable

import numpy as np


class Mode(str, Enum):
    """Which legs of the search run: lexical (BM25), dense (vectors) or both fused."""

    hybrid = "hybrid"
    bm25 = "bm25"
    dense = "dense"


@dataclass(frozen=True, slots=True)
class Chunk:
    """A citable piece of a document: its text and where it sits in the document."""

    doc_id: str
    index: int  # position of the chunk within its document, from 0
    text: str
    start: int  # character offsets into the document's text: text == doc.text[start:end]
    end: int
    title: str = ""
    source: str = ""  # file path (or URL) the document came from

    @property
    def chunk_id(self) -> str:
        return f"{self.doc_id}#{self.index}"

    def search_text(self) -> str:
        """What BM25 and the encoder see: the chunk under its document title."""
        return f"{self.title}\n{self.text}" if self.title else self.text


@dataclass(frozen=True, slots=True)
class DocumentEntry:
    """A document ready for a backend: its id, content hash and embedded chunks."""

    doc_id: str
    content_hash: str
    title: str
    source: str
    chunks: Sequence[Chunk]
    vectors: np.ndarray  # (len(chunks), dim) float32, L2-normalised
    root: str = ""  # the folder it was indexed from, so a re-index can prune removed files


@dataclass(frozen=True, slots=True)
class Hit:
    """One ranked search result, with enough to cite it."""

    doc_id: str
    chunk_id: str
    title: str
    source: str
    text: str
    start: int
    end: int
    score: float
    rank: int
    scores: dict[str, float] = field(default_factory=dict)  # per-leg scores: {"bm25": .., "dense": ..}

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(slots=True)
class IndexSummary:
    """What an index is about, for the router's search route: its documents' titles and chunk texts."""

    titles: list[str] = field(default_factory=list)  # by doc_id
    texts: list[str] = field(default_factory=list)  # by doc_id, then position in the document


@runtime_checkable
class SearchBackend(Protocol):
    """What the indexer, the CLI and the orchestrator (its search route and its router) need from a search index."""

    def document_hashes(self, root: str | None = None) -> dict[str, str]:
        """doc_id -> content hash of every indexed document (only those from `root` if given)."""
        ...

    def upsert(self, entries: Iterable[DocumentEntry]) -> None:
        """Add or replace documents (all their chunks) by doc_id; durable on return."""
        ...

    def delete(self, doc_ids: Iterable[str]) -> int:
        """Remove documents by id; returns how many were present."""
        ...

    def search(self, query: str, k: int = 10, mode: Mode = Mode.hybrid,
               query_vector: np.ndarray | None = None) -> list[Hit]:
        """Ranked hits for `query`; dense legs use `query_vector` (normalised) when given."""
        ...

    def stats(self) -> dict:
        """Counts and settings for display: documents, chunks, backend, model, ..."""
        ...

    def fingerprint(self) -> str:
        """A cheap token of what the index holds: it differs between indexes and changes with every write.

        The router checks it on every request, so it must cost one small read, never a scan.
        """
        ...

    def summary(self, max_titles: int, max_chars: int) -> IndexSummary:
        """Titles of the first `max_titles` documents and the texts of the first chunks, up to `max_chars`
        characters in all (the chunk that crosses the bound included), both by doc_id."""
        ...

    def close(self) -> None: ...
