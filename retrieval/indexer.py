"""Bringing a backend in line with a set of documents: add new, update changed, skip unchanged,
prune removed — in batches of chunks that each commit on their own, so a killed run loses at
most one batch and a re-run picks up where it stopped.

A document longer than a batch is spread over several batches where the backend can commit
part of a document (the embedded index can); a re-run then resumes it at its first missing
chunk. Other backends get whole documents, embedded a batch at a time so progress still moves.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from retrieval.chunking import ChunkConfig, chunk_document
from retrieval.documents import Document, Skipped, skip_summary
from retrieval.types import Chunk, DocumentEntry, SearchBackend

Progress = Callable[[int], None]  # called with the number of chunks just embedded


@dataclass
class IndexReport:
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: int = 0
    deleted: list[str] = field(default_factory=list)
    chunks: int = 0
    batches: int = 0  # commits (embedded) or upserts (other backends) made
    skipped: list[Skipped] = field(default_factory=list)  # from loading

    def summary(self) -> str:
        parts = [f"{len(self.added)} added", f"{len(self.updated)} updated", f"{self.unchanged} unchanged",
                 f"{len(self.deleted)} removed", f"{self.chunks} chunks embedded"]
        if self.skipped:
            parts.append(f"{len(self.skipped)} skipped")
        return ", ".join(parts)

    def skip_summary(self) -> str:
        """Skipped files by reason with the first few names; empty when none were skipped."""
        return skip_summary(self.skipped) if self.skipped else ""


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
    resume_at: dict[str, int] = field(default_factory=dict)  # doc_id -> first chunk an interrupted run left to do


def _splits_documents(backend: SearchBackend) -> bool:
    return bool(getattr(backend, "commits_partial_documents", False))


def plan(docs: Sequence[Document], backend: SearchBackend, chunking: ChunkConfig, model: str,
         root: str | None, prune: bool) -> Plan:
    stored = backend.document_hashes()
    unfinished = backend.unfinished_documents() if _splits_documents(backend) else {}
    todo, unchanged, resume_at, estimate = [], 0, {}, 0
    for doc in docs:
        digest = entry_hash(doc, chunking, model)
        if stored.get(doc.doc_id) == digest:
            unchanged += 1
            continue
        todo.append((doc, digest))
        n_chunks = len(chunk_document(doc, chunking))  # exact; chunking is cheap next to embedding
        done_digest, done = unfinished.get(doc.doc_id, ("", 0))
        if done_digest == digest and 0 < done < n_chunks:
            resume_at[doc.doc_id] = done
        estimate += n_chunks - resume_at.get(doc.doc_id, 0)
    present = {d.doc_id for d in docs}
    to_delete = sorted(set(backend.document_hashes(root)) - present) if (prune and root is not None) else []
    new_ids = {d.doc_id for d, _ in todo} - (set(stored) - set(unfinished))  # a half-indexed document counts as new
    return Plan(todo, new_ids, unchanged, to_delete, estimate, resume_at)


@dataclass
class _Piece:
    """Consecutive chunks of one document, going into one batch; `last` when they end the document."""

    doc: Document
    digest: str
    chunks: list[Chunk]
    last: bool


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
    split = _splits_documents(backend)
    batch: list[_Piece] = []
    pending = 0
    for doc, digest in work.to_index:
        chunks = chunk_document(doc, chunking)[work.resume_at.get(doc.doc_id, 0):]
        while True:  # once even for a document without chunks, so that it is recorded
            cut = batch_chunks - pending if split else len(chunks)
            batch.append(_Piece(doc, digest, chunks[:cut], last=cut >= len(chunks)))
            pending += len(chunks[:cut])
            chunks = chunks[cut:]
            if pending >= batch_chunks:
                _flush(batch, backend, encode, root, report, work.new_ids, progress, batch_chunks)
                batch, pending = [], 0
            if not chunks:
                break
    if batch:
        _flush(batch, backend, encode, root, report, work.new_ids, progress, batch_chunks)
    return report


def _flush(batch: list[_Piece], backend, encode, root, report, new_ids, progress, batch_chunks: int) -> None:
    texts = [chunk.search_text() for piece in batch for chunk in piece.chunks]
    parts = []
    for start in range(0, max(len(texts), 1), batch_chunks):  # a whole long document still embeds a batch at a time
        parts.append(np.asarray(encode(texts[start:start + batch_chunks])))
        if progress and texts:
            progress(len(parts[-1]))
    vectors = np.concatenate(parts) if len(parts) > 1 else parts[0]
    entries, offset = [], 0
    for piece in batch:
        entries.append(DocumentEntry(doc_id=piece.doc.doc_id, content_hash=piece.digest, title=piece.doc.title,
                                     source=piece.doc.source, chunks=piece.chunks,
                                     vectors=vectors[offset:offset + len(piece.chunks)], root=root or ""))
        offset += len(piece.chunks)
    unfinished = {piece.doc.doc_id for piece in batch if not piece.last}
    if unfinished:
        backend.upsert(entries, unfinished=unfinished)
    else:
        backend.upsert(entries)
    report.batches += 1
    for piece in batch:
        if piece.last:
            (report.added if piece.doc.doc_id in new_ids else report.updated).append(piece.doc.doc_id)
    report.chunks += len(texts)
