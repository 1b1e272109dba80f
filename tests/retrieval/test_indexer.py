"""Incremental, durable indexing through the real CLI: skip unchanged, update, prune, survive a kill."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path


from retrieval.chunking import ChunkConfig
from retrieval.documents import Document
from retrieval.embedded import EmbeddedIndex
from retrieval.indexer import index_documents

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


def test_killed_indexer_leaves_a_usable_index_and_rerun_completes(tmp_path, atelier_home):
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
    hits = json.loads(_run("search", "impeller inspected", "--mode", "bm25", "--json", env=env).stdout)["hits"]
    assert hits  # the interrupted index answers searches

    out = _run("index", str(folder), "--config", str(config), "-q", env=env).stdout
    assert f"{docs} unchanged" in out and f"{120 - docs} added" in out
    assert _counts(db) == (120, 120, 120, 120)


def test_cli_index_prunes_and_deletes(tmp_path, atelier_home):
    folder = tmp_path / "docs"
    _corpus(folder, 3)
    env = {**os.environ, "ATELIER_HOME": str(atelier_home)}
    _run("index", str(folder), "-q", env=env)
    (folder / "doc002.txt").unlink()
    out = _run("index", str(folder), "-q", env=env).stdout
    assert "1 removed" in out and "2 unchanged" in out
    out = _run("index", "--delete", "doc000.txt", env=env).stdout
    assert "removed 1 of 1" in out
    hits = json.loads(_run("search", "pump maintenance", "--json", "-k", "5", env=env).stdout)["hits"]
    assert {h["doc_id"] for h in hits} == {"doc001.txt"}
