"""Bringing a backend in line with a set of documents: add new, update changed, skip unchanged,
prune removed — in batches that each commit on their own, so a killed run loses at most one
batch and a re-run picks up where it stopped.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from retrieval.chunking import ChunkConfig, chunk_document
from retrieval.documents import Document
from retrieval.types import DocumentEntry, SearchBackend

Progress = Callable[[int], None]  # called with the number of chunks just indexed


@dataclass
class IndexReport:
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: int = 0
    deleted: list[str] = field(default_factory=list)
    chunks: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) from loading

    def summary(self) -> str:
        parts = [f"{len(self.added)} added", f"{len(self.updated)} updated", f"{self.unchanged} unchanged",
                 f"{len(self.deleted)} removed", f"{self.chunks} chunks embedded"]
        if self.skipped:
            parts.append(f"{len(self.skipped)} skipped")
        return ", ".join(parts)


def entry_hash(doc: Document, chunking: ChunkConfig, model: str) -> str:
    """Changes when the document, the chunking or the embedding model changes."""
    key = f"{doc.content_hash}|{chunking.model_dump_json()}|{model}"
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass
class Plan:
    to_index: list[tuple[Document, str]]  # (document, entry hash), new or changed
    new_ids: set[str]
    unchanged: int
    to_delete: list[str]
    chunks_estimate: int


def plan(docs: Sequence[Document], backend: SearchBackend, chunking: ChunkConfig, model: str,
         root: str | None, prune: bool) -> Plan:
    stored = backend.document_hashes()
    todo, unchanged = [], 0
    for doc in docs:
        digest = entry_hash(doc, chunking, model)
        if stored.get(doc.doc_id) == digest:
            unchanged += 1
        else:
            todo.append((doc, digest))
    present = {d.doc_id for d in docs}
    to_delete = sorted(set(backend.document_hashes(root)) - present) if (prune and root is not None) else []
    estimate = sum(len(chunk_document(d, chunking)) for d, _ in todo)  # exact; chunking is cheap next to embedding
    return Plan(todo, {d.doc_id for d, _ in todo} - set(stored), unchanged, to_delete, estimate)


def index_documents(docs: Sequence[Document], backend: SearchBackend, encode: Callable[[list[str]], object],
                    *, chunking: ChunkConfig, model: str, root: str | None = None, prune: bool = True,
                    batch_chunks: int = 1024, progress: Progress | None = None,
                    planned: Plan | None = None) -> IndexReport:
    """Index `docs` into `backend`; `encode` maps texts to normalised vectors (n, dim)."""
    work = planned or plan(docs, backend, chunking, model, root, prune)
    report = IndexReport(unchanged=work.unchanged)
    if work.to_delete:
        backend.delete(work.to_delete)
        report.deleted = work.to_delete
    batch: list[tuple[Document, str, list]] = []
    pending = 0
    for doc, digest in work.to_index:
        chunks = chunk_document(doc, chunking)
        batch.append((doc, digest, chunks))
        pending += len(chunks)
        if pending >= batch_chunks:
            _flush(batch, backend, encode, root, report, work.new_ids, progress)
            batch, pending = [], 0
    if batch:
        _flush(batch, backend, encode, root, report, work.new_ids, progress)
    return report


def _flush(batch, backend, encode, root, report, new_ids, progress) -> None:
    texts = [chunk.search_text() for _, _, chunks in batch for chunk in chunks]
    vectors = encode(texts)
    entries, offset = [], 0
    for doc, digest, chunks in batch:
        entries.append(DocumentEntry(doc_id=doc.doc_id, content_hash=digest, title=doc.title, source=doc.source,
                                     chunks=chunks, vectors=vectors[offset:offset + len(chunks)], root=root or ""))
        offset += len(chunks)
    backend.upsert(entries)
    for doc, _, _ in batch:
        (report.added if doc.doc_id in new_ids else report.updated).append(doc.doc_id)
    report.chunks += len(texts)
    if progress:
        progress(len(texts))
