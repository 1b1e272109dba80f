import sqlite3

import numpy as np
import pytest

from atelier.errors import AtelierError
from retrieval.chunking import ChunkConfig
from retrieval.documents import Document
from retrieval.embedded import EmbeddedIndex, read_summary
from retrieval.fusion import FusionConfig, FusionMethod
from retrieval.indexer import index_documents
from retrieval.types import IndexSummary, Mode

DOCS = [
    Document("seals.md", "Mechanical seals", "A mechanical seal stops leakage where the shaft leaves the pump casing. "
             "Replace the seal faces when the leak rate passes ten drops per minute.", "seals.md"),
    Document("faults.md", "Controller fault codes", "Fault E14 means the motor winding overheated. "
             "Let the motor cool for thirty minutes and check the cooling fan.", "faults.md"),
    Document("align.md", "Shaft alignment", "Check soft foot with a feeler gauge under each motor foot before "
             "aligning the coupling. Shim any foot that moves more than 0.05 mm.", "align.md"),
    Document("lube.md", "Lubrication", "Grease the motor bearings every 4000 operating hours with lithium complex grease.",
             "lube.md"),
]


@pytest.fixture
def index(tmp_path, encoder):
    store = EmbeddedIndex(tmp_path / "idx.sqlite", dim=encoder.dim, model_name="all-MiniLM-L6-v2")
    index_documents(DOCS, store, encoder.encode, chunking=ChunkConfig(), model="all-MiniLM-L6-v2", root="/docs")
    yield store
    store.close()


def _query(index, encoder, text, mode, k=3):
    return index.search(text, k=k, mode=mode, query_vector=encoder.encode_query(text))


@pytest.mark.parametrize("mode", list(Mode))
def test_each_mode_finds_the_right_document(index, encoder, mode):
    assert _query(index, encoder, "what does fault code E14 mean", mode)[0].doc_id == "faults.md"
    assert _query(index, encoder, "how often should bearings be greased", mode)[0].doc_id == "lube.md"


def test_dense_finds_paraphrases_bm25_cannot(index, encoder):
    query = "water dripping from around the rotating axle"
    assert _query(index, encoder, query, Mode.dense)[0].doc_id == "seals.md"
    assert all(h.doc_id != "seals.md" for h in _query(index, encoder, query, Mode.bm25))


def test_hits_are_citable(index, encoder):
    hit = _query(index, encoder, "soft foot feeler gauge", Mode.hybrid)[0]
    doc = next(d for d in DOCS if d.doc_id == hit.doc_id)
    assert doc.text[hit.start:hit.end] == hit.text
    assert hit.source == "align.md" and hit.title == "Shaft alignment" and hit.chunk_id == "align.md#0"
    assert hit.rank == 1 and set(hit.scores) == {"bm25", "dense"}


def test_rrf_and_convex_both_rank(index, encoder):
    index.fusion = FusionConfig(method=FusionMethod.rrf, rrf_k=60)
    hits = _query(index, encoder, "grease interval", Mode.hybrid)
    assert hits[0].doc_id == "lube.md"
    assert hits[0].score == pytest.approx(2 / 61)  # first in both legs


def test_update_and_delete_by_id(index, encoder):
    changed = Document("lube.md", "Lubrication", "Oil the pump bearings with ISO VG 68 turbine oil.", "lube.md")
    index_documents([*DOCS[:3], changed], index, encoder.encode, chunking=ChunkConfig(), model="all-MiniLM-L6-v2",
                    root="/docs")
    hits = _query(index, encoder, "turbine oil grade", Mode.bm25)
    assert hits[0].doc_id == "lube.md" and "VG 68" in hits[0].text
    assert not _query(index, encoder, "lithium complex grease", Mode.bm25)
    assert index.delete(["faults.md", "missing"]) == 1
    assert "faults.md" not in index.document_hashes()
    assert all(h.doc_id != "faults.md" for h in _query(index, encoder, "fault E14", Mode.hybrid, k=10))
    assert index.stats()["chunks"] == 3


def test_failed_batch_leaves_nothing_half_written(index, encoder):
    from retrieval.chunking import chunk_document
    from retrieval.types import DocumentEntry

    good = Document("new.md", "New", "A new document about impellers.", "new.md")
    chunks = chunk_document(good)
    entries = [DocumentEntry("new.md", "h", "New", "new.md", chunks, encoder.encode([c.text for c in chunks])),
               DocumentEntry("bad.md", "h", "Bad", "bad.md", chunks, np.zeros((5, 2), dtype=np.float32))]
    with pytest.raises(ValueError):
        index.upsert(entries)
    assert "new.md" not in index.document_hashes()
    assert index.stats()["chunks"] == 4


def test_opening_with_another_model_is_refused(index, tmp_path):
    with pytest.raises(AtelierError, match="--model all-MiniLM-L6-v2"):
        EmbeddedIndex(tmp_path / "idx.sqlite", dim=768, model_name="other-model")


def test_a_corrupt_file_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.sqlite"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(AtelierError, match="not a usable index"):
        EmbeddedIndex(path, dim=4, model_name="m")


def test_odd_queries_are_harmless(index):
    for query in ['"unbalanced', "NEAR(seal AND OR", "*", "E14) OR (x", "DROP TABLE chunks;--"]:
        index.search(query, k=3, mode=Mode.bm25)
    assert index.search("???", k=3, mode=Mode.bm25) == []
    assert index.search("the and of", k=3, mode=Mode.bm25) == []  # stopwords only: nothing to match
    assert index.search("zzzunknownword", k=3, mode=Mode.bm25) == []


def test_a_version_1_index_is_migrated(tmp_path, encoder):
    """Indexes written before BM25 moved from FTS5 to stored terms open and search as before."""
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE documents (doc_id TEXT PRIMARY KEY, content_hash TEXT NOT NULL, title TEXT NOT NULL,
            source TEXT NOT NULL, root TEXT NOT NULL, n_chunks INTEGER NOT NULL, indexed_at REAL NOT NULL);
        CREATE TABLE chunks (id INTEGER PRIMARY KEY, doc_id TEXT NOT NULL, idx INTEGER NOT NULL, title TEXT NOT NULL,
            source TEXT NOT NULL, text TEXT NOT NULL, start INTEGER NOT NULL, "end" INTEGER NOT NULL,
            vector BLOB NOT NULL, UNIQUE (doc_id, idx));
        CREATE VIRTUAL TABLE chunks_fts USING fts5(body);""")
    text = "Grease the motor bearings every 4000 hours."
    db.executemany("INSERT INTO meta VALUES (?, ?)", [("schema", "1"), ("model", "m"), ("dim", str(encoder.dim)),
                                                      ("generation", "1")])
    db.execute("INSERT INTO documents VALUES ('lube.md', 'h', 'Lubrication', 'lube.md', '', 1, 0)")
    db.execute("INSERT INTO chunks VALUES (1, 'lube.md', 0, 'Lubrication', 'lube.md', ?, 0, ?, ?)",
               (text, len(text), encoder.encode([text])[0].tobytes()))
    db.commit()
    db.close()
    store = EmbeddedIndex(path, dim=encoder.dim, model_name="m")
    assert store.search("greasing bearings", k=1, mode=Mode.bm25)[0].doc_id == "lube.md"
    assert store._meta("schema") == "2"


def test_reads_list_documents_chunks_and_the_generation(index):
    assert index.documents() == [("align.md", "Shaft alignment"), ("faults.md", "Controller fault codes"),
                                 ("lube.md", "Lubrication"), ("seals.md", "Mechanical seals")]
    texts = index.chunk_texts()
    assert len(texts) == index.stats()["chunks"] and "soft foot" in texts[0] and "mechanical seal" in texts[-1]
    assert index.chunk_texts(limit=2) == texts[:2]
    before = index.generation()
    index.delete(["lube.md"])
    assert index.generation() == before + 1
    assert [doc_id for doc_id, _ in index.documents()] == ["align.md", "faults.md", "seals.md"]


def test_read_summary_peeks_without_creating_or_writing(index, tmp_path):
    modified = index.path.stat().st_mtime_ns
    summary = read_summary(index.path)
    assert summary.generation == index.generation()
    assert summary.documents == index.documents() and summary.chunk_texts == index.chunk_texts()
    assert index.path.stat().st_mtime_ns == modified
    missing = tmp_path / "nowhere" / "index.sqlite"
    assert read_summary(missing) is None
    assert not missing.parent.exists()


def test_read_summary_of_a_file_with_no_index_yet_is_none(tmp_path):
    path = tmp_path / "empty.sqlite"
    with pytest.raises(AtelierError, match="holds no index yet"):
        EmbeddedIndex(path, dim=None, model_name="m")
    assert read_summary(path) is None


def test_read_summary_of_a_corrupt_file_says_to_rebuild(tmp_path):
    path = tmp_path / "bad.sqlite"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(AtelierError, match="rebuild it with `atelier index DIR`"):
        read_summary(path)


def test_fingerprint_and_summary_are_what_the_router_reads(index, tmp_path, encoder):
    fingerprint = index.fingerprint()
    assert fingerprint == index.fingerprint() and fingerprint.endswith(f"@{index.generation()}")
    assert str(index.path.resolve()) in fingerprint  # two indexes never share one
    first = index.summary(max_titles=2, max_chars=1)  # bounded: the chunk that crosses max_chars is the last
    assert first.titles == ["Shaft alignment", "Controller fault codes"] and first.texts == index.chunk_texts()[:1]
    everything = index.summary(max_titles=100, max_chars=10**6)
    assert len(everything.titles) == 4 and everything.texts == index.chunk_texts()
    index.delete(["lube.md"])
    assert index.fingerprint() != fingerprint and "Lubrication" not in index.summary(100, 10**6).titles
    empty = EmbeddedIndex(tmp_path / "empty.sqlite", dim=encoder.dim, model_name="all-MiniLM-L6-v2")
    assert empty.summary(100, 10**6) == IndexSummary() and empty.fingerprint() != index.fingerprint()
    empty.close()


def test_a_continuation_needs_the_unfinished_document_it_continues(index, encoder):
    from retrieval.chunking import chunk_document
    from retrieval.types import DocumentEntry

    doc = Document("steps.md", "Steps", " ".join(f"Step {i} tightens bolt {i} to spec." for i in range(6)), "steps.md")
    chunks = chunk_document(doc, ChunkConfig(max_chars=50, overlap_chars=0))
    assert len(chunks) == 6
    vectors = encoder.encode([c.text for c in chunks])
    entry = DocumentEntry("steps.md", "h", "Steps", "steps.md", chunks[2:], vectors[2:])
    with pytest.raises(ValueError, match="continue no unfinished document"):
        index.upsert([entry])  # nothing stored to continue
    index.upsert([DocumentEntry("steps.md", "h", "Steps", "steps.md", chunks[:2], vectors[:2])], unfinished={"steps.md"})
    assert index.unfinished_documents() == {"steps.md": ("h", 2)}
    assert index.document_hashes()["steps.md"] != "h"  # an unfinished document never counts as indexed
    index.upsert([entry])
    assert index.unfinished_documents() == {} and index.document_hashes()["steps.md"] == "h"
    assert [t for t in index.chunk_texts() if t.startswith("Step")] == [c.text for c in chunks]
