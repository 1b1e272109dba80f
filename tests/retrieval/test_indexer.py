"""Incremental, durable indexing through the real CLI: skip unchanged, update, prune, survive a kill."""

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from atelier.errors import AtelierError
from retrieval.chunking import ChunkConfig
from retrieval.config import RetrievalConfig, index_lock
from retrieval.documents import Document
from retrieval.embedded import EmbeddedIndex
from retrieval.indexer import entry_hash, index_documents
from retrieval.types import Mode

ATELIER = [sys.executable, "-m", "atelier.cli"]


def _run(*args, check=True, **kw):
    result = subprocess.run([*ATELIER, *args], capture_output=True, text=True, timeout=240, **kw)
    if check and result.returncode != 0:
        raise AssertionError(f"atelier {args} failed: {result.stderr}")
    return result


def test_reindex_skips_unchanged_and_tracks_changes(tmp_path, encoder):
    calls = []

    def encode(texts):
        calls.append(len(texts))
        return encoder.encode(texts)

    docs = [Document(f"d{i}.txt", "", f"Document {i} talks about pump number {i}.", f"d{i}.txt") for i in range(5)]
    store = EmbeddedIndex(tmp_path / "i.sqlite", dim=encoder.dim, model_name="m")
    first = index_documents(docs, store, encode, chunking=ChunkConfig(), model="m", root="/r")
    assert len(first.added) == 5 and sum(calls) == 5
    again = index_documents(docs, store, encode, chunking=ChunkConfig(), model="m", root="/r")
    assert again.unchanged == 5 and not again.added and not again.updated and sum(calls) == 5
    docs[1] = Document("d1.txt", "", "Document 1 now talks about valves.", "d1.txt")
    changed = index_documents(docs[:4], store, encode, chunking=ChunkConfig(), model="m", root="/r")
    assert changed.updated == ["d1.txt"] and changed.deleted == ["d4.txt"] and sum(calls) == 6
    rechunked = index_documents(docs[:4], store, encode, chunking=ChunkConfig(max_chars=500), model="m", root="/r")
    assert len(rechunked.updated) == 4  # new chunk settings re-index everything
    assert store.stats()["documents"] == 4


def _corpus(folder: Path, n: int) -> None:
    folder.mkdir()
    for i in range(n):
        (folder / f"doc{i:03d}.txt").write_text(
            f"Pump {i} maintenance note. The impeller of unit {i} was inspected. " * 3)


def _counts(path: Path) -> tuple[int, int, int, int]:
    db = sqlite3.connect(path)
    docs = db.execute("SELECT COUNT(*) FROM documents").fetchone()[0]
    chunks = db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]
    distinct = db.execute("SELECT COUNT(DISTINCT doc_id || '#' || idx) FROM chunks").fetchone()[0]
    with_terms = db.execute("SELECT COUNT(*) FROM chunks WHERE terms != ''").fetchone()[0]
    db.close()
    return docs, chunks, distinct, with_terms


def test_killed_indexer_leaves_a_usable_index_and_rerun_completes(tmp_path, atelier_home, encoder):
    folder = tmp_path / "docs"
    _corpus(folder, 120)
    config = tmp_path / "cfg.yaml"
    config.write_text("batch_chunks: 4\n")
    db = atelier_home / "indexes" / "default" / "index.sqlite"
    env = {**os.environ, "ATELIER_HOME": str(atelier_home)}
    proc = subprocess.Popen([*ATELIER, "index", str(folder), "--config", str(config), "-q"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if db.exists() and _counts(db)[0] >= 8:
                break
        except sqlite3.OperationalError:  # the schema is still being created
            pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    docs, chunks, distinct, with_terms = _counts(db)
    assert 8 <= docs < 120, "the kill should land mid-run"
    assert chunks == distinct == with_terms == docs  # one chunk per doc, nothing half-written
    # the search and the re-run in-process: only the killed run needs a process of its own
    hits = json.loads(_invoke("search", "impeller inspected", "--mode", "bm25", "--json"))["hits"]
    assert hits  # the interrupted index answers searches

    out = _invoke("index", str(folder), "--config", str(config), "-q")
    assert f"{docs} unchanged" in out and f"{120 - docs} added" in out
    assert _counts(db) == (120, 120, 120, 120)


def _invoke(*args: str) -> str:
    """An `atelier` command in-process (torch and the encoder are loaded once per test session)."""
    from typer.testing import CliRunner

    from atelier.cli import app

    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, (args, result.output, result.exception)
    return result.stdout


def test_cli_index_prunes_and_deletes(tmp_path, atelier_home, encoder):
    """In-process (the CLI's commands, not its process: a subprocess per call cost 30 s here)."""
    run = _invoke
    folder = tmp_path / "docs"
    _corpus(folder, 3)
    run("index", str(folder), "-q")
    (folder / "doc002.txt").unlink()
    out = run("index", str(folder), "-q")
    assert "1 removed" in out and "2 unchanged" in out
    out = run("index", "--delete", "doc000.txt")
    assert "removed 1 of 1" in out
    hits = json.loads(run("search", "pump maintenance", "--json", "-k", "5"))["hits"]
    assert {h["doc_id"] for h in hits} == {"doc001.txt"}


LONG = Document("manual.md", "Manual", " ".join(f"Step {i}: tighten bolt number {i} to spec." for i in range(10)),
                "manual.md")
SMALL = ChunkConfig(max_chars=60, overlap_chars=0)  # one chunk per step: ten chunks
SMALL_DOC = Document("small.md", "Small", "Grease the bearings.", "small.md")


def test_a_long_document_spreads_over_batches_and_a_crash_loses_at_most_one(tmp_path, encoder):
    """Probe #9 (second half): one document's ~38,000 chunks went into a single encode and a single
    commit, with no progress; batches of 3 over a ten-chunk document stand in for that."""
    calls, progress = [], []

    def encode(texts):
        calls.append(len(texts))
        return encoder.encode(texts)

    store = EmbeddedIndex(tmp_path / "whole.sqlite", dim=encoder.dim, model_name="m")
    report = index_documents([LONG], store, encode, chunking=SMALL, model="m", batch_chunks=3, progress=progress.append)
    assert calls == progress == [3, 3, 3, 1] and report.batches == 4 == store.generation()
    assert report.added == ["manual.md"] and store.unfinished_documents() == {}
    expected = store.chunk_texts()
    assert len(expected) == 10

    def crash_on_third(texts):
        if len(calls) == 6:
            raise KeyboardInterrupt  # killed mid-document
        return encode(texts)

    crashed = EmbeddedIndex(tmp_path / "crashed.sqlite", dim=encoder.dim, model_name="m")
    with pytest.raises(KeyboardInterrupt):
        index_documents([LONG, SMALL_DOC], crashed, crash_on_third, chunking=SMALL, model="m", batch_chunks=3)
    assert [digest for digest, _ in crashed.unfinished_documents().values()] == [entry_hash(LONG, SMALL, "m")]
    assert crashed.unfinished_documents()["manual.md"][1] == 6 == crashed.stats()["chunks"]  # two batches kept
    assert crashed.search("tighten bolt", k=1, mode=Mode.bm25)  # the kept part answers searches

    calls.clear()
    resumed = index_documents([LONG, SMALL_DOC], crashed, encode, chunking=SMALL, model="m", batch_chunks=3)
    assert sum(calls) == 4 + 1  # only the missing chunks of the manual, and the other document
    assert sorted(resumed.added) == ["manual.md", "small.md"] and crashed.unfinished_documents() == {}
    assert crashed.chunk_texts()[:10] == expected and crashed.stats()["chunks"] == 11  # no duplicates
    again = index_documents([LONG, SMALL_DOC], crashed, encode, chunking=SMALL, model="m", batch_chunks=3)
    assert again.unchanged == 2 and sum(calls) == 5


class _WholeDocuments:
    """The embedded index seen as a backend that takes whole documents only (as Elasticsearch does)."""

    def __init__(self, store):
        self.store, self.upserts = store, []

    def document_hashes(self, root=None):
        return self.store.document_hashes(root)

    def upsert(self, entries):
        entries = list(entries)
        self.upserts.append([len(e.chunks) for e in entries])
        self.store.upsert(entries)

    def delete(self, doc_ids):
        return self.store.delete(doc_ids)


def test_a_backend_without_partial_documents_still_embeds_a_batch_at_a_time(tmp_path, encoder):
    calls, progress = [], []

    def encode(texts):
        calls.append(len(texts))
        return encoder.encode(texts)

    backend = _WholeDocuments(EmbeddedIndex(tmp_path / "i.sqlite", dim=encoder.dim, model_name="m"))
    report = index_documents([LONG], backend, encode, chunking=SMALL, model="m", batch_chunks=3,
                             progress=progress.append)
    assert calls == progress == [3, 3, 3, 1] and backend.upserts == [[10]] and report.added == ["manual.md"]


def test_a_second_index_run_on_the_same_index_is_refused(tmp_path, atelier_home):
    """Probe #13: two `atelier index` runs on one index at once both embedded everything and
    misreported the counts. The test holds the writer lock the way a running indexer does."""
    folder = tmp_path / "docs"
    _corpus(folder, 2)
    env = {**os.environ, "ATELIER_HOME": str(atelier_home)}
    with index_lock(RetrievalConfig()):
        result = _run("index", str(folder), "-q", check=False, env=env)
        with pytest.raises(AtelierError, match="being written by another"), index_lock(RetrievalConfig()):
            pass
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "index 'default' is being written by another `atelier index`" in result.stderr
    assert not (atelier_home / "indexes" / "default" / "index.sqlite").exists()  # nothing was embedded
    with index_lock(RetrievalConfig(index="other")), index_lock(RetrievalConfig()):  # released; per index
        pass


def test_cli_summary_counts_skipped_files_by_reason(tmp_path, encoder):
    """What a user sees for probes #7-#9: one line per skipped file, then counts by reason with names."""
    from typer.testing import CliRunner

    from atelier.cli import app

    folder, outside = tmp_path / "docs", tmp_path / "outside.txt"
    folder.mkdir()
    outside.write_text("root:x:0:0:root:/root:/bin/bash\n")
    (folder / "pump.md").write_text("# Pump\n\nPrime the casing before start.\n")
    (folder / "passwd.txt").symlink_to(outside)
    (folder / "blob.txt").write_bytes(random.Random(0).randbytes(1_500))
    (folder / "big.txt").write_text("The impeller was inspected. " * 100)
    result = CliRunner().invoke(app, ["index", str(folder), "-q", "--max-file-mb", "0.002"])
    assert result.exit_code == 0, result.output
    assert "1 added" in result.stdout and "3 skipped" in result.stdout
    assert ("skipped 3: 1 binary content (blob.txt); 1 over the size cap (big.txt); "
            "1 symlink leading outside the folder (passwd.txt)") in result.stdout
    assert "skipped big.txt: 2.8 KB, over the 0.002 MB cap; raise it with --max-file-mb 1" in result.stderr
    assert "pass --follow-symlinks" in result.stderr
