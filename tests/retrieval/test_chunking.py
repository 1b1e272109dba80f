import pytest

from atelier.config import load_config
from atelier.errors import AtelierError
from retrieval.chunking import ChunkConfig, chunk_document
from retrieval.documents import Document

TEXT = """# Mechanical seals

A mechanical seal stops leakage where the shaft leaves the casing. The faces are lapped flat. Never run the seal dry.

## Replacing the seal

1. Lock out the motor.
2. Drain the casing and remove the back pull-out unit.
3. Fit the new seal, e.g. the kit MS-40, and torque the gland nuts to 25 N m.

""" + " ".join(f"Sentence number {i} describes step {i} of the long inspection in detail." for i in range(60))


def _doc(text=TEXT):
    return Document(doc_id="seals.md", title="Seals", text=text, source="/docs/seals.md")


def test_offsets_are_exact_and_cover_the_text():
    doc = _doc()
    chunks = chunk_document(doc, ChunkConfig(max_chars=300, overlap_chars=80))
    assert len(chunks) > 5
    for chunk in chunks:
        assert doc.text[chunk.start:chunk.end] == chunk.text
        assert len(chunk.text) <= 300
        assert chunk.title == "Seals" and chunk.source == "/docs/seals.md"
    covered = set()
    for chunk in chunks:
        covered.update(range(chunk.start, chunk.end))
    assert all(i in covered for i, ch in enumerate(doc.text) if not ch.isspace())


def test_chunks_end_on_sentence_boundaries_and_overlap():
    chunks = chunk_document(_doc(), ChunkConfig(max_chars=300, overlap_chars=80))
    long_part = [c for c in chunks if c.text.startswith("Sentence")]
    assert long_part
    for chunk in long_part[:-1]:
        assert chunk.text.endswith("detail.")
    overlaps = [a.end - b.start for a, b in zip(chunks, chunks[1:]) if b.start < a.end]
    assert overlaps and all(0 < o <= 80 for o in overlaps)


def test_never_ends_on_a_heading_and_keeps_abbreviations():
    chunks = chunk_document(_doc(), ChunkConfig(max_chars=200, overlap_chars=0))
    assert not any(c.text.rstrip().endswith("Replacing the seal") for c in chunks)
    assert not any(c.text.startswith("the kit MS-40") for c in chunks)


def test_over_long_sentence_is_cut_at_words():
    doc = _doc("word " * 500)
    chunks = chunk_document(doc, ChunkConfig(max_chars=100, overlap_chars=0))
    assert all(len(c.text) <= 100 for c in chunks)
    assert all(c.text.split() and set(c.text.split()) == {"word"} for c in chunks)


def test_config_rejects_overlap_not_smaller_and_unknown_keys():
    with pytest.raises(AtelierError, match="overlap_chars"):
        load_config(ChunkConfig, overrides={"max_chars": 100, "overlap_chars": 100})
    with pytest.raises(AtelierError, match="chunk_size"):
        load_config(ChunkConfig, overrides={"chunk_size": 100})
