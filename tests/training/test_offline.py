"""Offline extraction: pairs copied from the real sample manuals, and their corruptions."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from retrieval.chunking import ChunkConfig, chunk_document
from retrieval.documents import Document, load_folder
from retrieval.keywords import extract_keywords
from training.filters import QAPair, grounding, normalise
from training.offline import (
    corrupt,
    dapt_passages,
    extract_pairs,
    parse_units,
    preference_pairs,
    table_columns,
)

DOCS = Path(__file__).resolve().parents[2] / "examples" / "docs"


@pytest.fixture(scope="module")
def corpus():
    docs = load_folder(DOCS).documents
    keywords = [k.term for k in extract_keywords(docs, top_k=200)]
    pairs = {}
    for doc in docs:
        pairs[doc.doc_id] = extract_pairs(doc, chunk_document(doc, ChunkConfig(max_chars=1200, overlap_chars=0)),
                                          keywords, max_pairs_per_chunk=12)
    return {d.doc_id: d for d in docs}, keywords, pairs


def find(pairs, kind: str, question_part: str) -> QAPair:
    return next(p for p in pairs if p.kind == kind and question_part in p.question)


def test_every_kind_is_extracted_and_answers_come_from_the_document(corpus):
    docs, _, pairs = corpus
    every = [p for found in pairs.values() for p in found]
    kinds = Counter(p.kind for p in every)
    assert set(kinds) == {"definition", "procedure", "table", "fact", "cloze", "completion", "summary"}
    assert len(every) >= 600
    for pair in every:
        assert grounding(pair.answer, pair.context) >= 0.8 or pair.answer in ("-", "same"), pair
        if pair.kind not in ("procedure", "summary"):
            assert normalise(pair.answer) in normalise(docs[pair.source].text), pair


def test_definitions_procedures_and_tables(corpus):
    _, _, pairs = corpus
    seal = find(pairs["mechanical-seals.md"], "definition", "What is a mechanical seal?")
    assert seal.answer.startswith("A mechanical seal is a device that seals the gap")
    steps = find(pairs["installation-and-commissioning.md"], "procedure", '"Levelling the baseplate"')
    assert steps.answer.startswith("1. Place the baseplate on the foundation") and "\n5. Carry out" in steps.answer
    fix = find(pairs["troubleshooting.md"], "table", 'under "Corrective action" for "Wrong direction of rotation"')
    assert fix.answer == "Change the phase order (P1.12 on the VCD-300)"
    code = find(pairs["vfd-controller-fault-codes.html"], "table", '"E08"')  # an HTML table
    assert code.source == "vfd-controller-fault-codes.html"


def test_facts_blank_a_value_and_cloze_blanks_a_keyword(corpus):
    _, keywords, pairs = corpus
    facts = [p for p in pairs["mechanical-seals.md"] if p.kind == "fact"]
    assert any(p.answer == "1 bar" and "at least ____ above the seal chamber pressure" in p.question for p in facts)
    terms = {k.lower() for k in keywords}
    for pair in (p for found in pairs.values() for p in found if p.kind == "cloze"):
        assert "____" in pair.question and pair.answer.lower() in terms | {t + "s" for t in terms}, pair


def test_pdf_page_headers_are_not_content(corpus):
    docs, _, pairs = corpus
    pdf = docs["hx-series-specifications.pdf"]
    assert all("VP-HX-SPEC-01, revision D" not in p.question for p in pairs[pdf.doc_id])
    passages = dapt_passages(pdf, chunk_document(pdf, ChunkConfig(max_chars=1200, overlap_chars=0)))
    assert sum("VP-HX-SPEC-01, revision D" in p.text for p in passages) <= 1  # the title page keeps it once


def test_parse_units_reads_markdown_and_plain_text_structure():
    text = ("# Manual\n\n## 3.2 Levelling\n\n1. Place the base.\n2. Level it.\n\n| A | B |\n|---|---|\n| x | 1 mm |\n\n"
            "GLOSSARY\n\nSoft foot\nSoft foot is a condition of the feet.\n")
    units = parse_units(text)
    assert [(u.kind, u.heading) for u in units] == [
        ("heading", "Manual"), ("heading", "Levelling"), ("item", "Levelling"), ("item", "Levelling"),
        ("row", "Levelling"), ("row", "Levelling"), ("heading", "GLOSSARY"), ("heading", "Soft foot"),
        ("prose", "Soft foot")]
    assert all(text[u.start:].startswith(u.text[:3]) for u in units if u.kind in ("prose", "row"))


def test_corruptions_make_the_answer_wrong_in_the_intended_way(corpus):
    _, keywords, _ = corpus
    rng = random.Random(0)
    fact = QAPair("Pressure?", "1.5 bar", "d", "fact", "")
    wrong, how = corrupt(fact, keywords, rng, {})
    assert how == "changed_number" and wrong != "1.5 bar" and wrong[0].isdigit()
    cloze = QAPair("Fill: the ____ leaks", "mechanical seal", "d", "cloze", "")
    wrong, how = corrupt(cloze, keywords, rng, {})
    assert how == "swapped_term" and wrong.lower() != "mechanical seal" and wrong in keywords
    steps = QAPair("Steps?", "1. Stop.\n2. Drain.\n3. Refill.", "d", "procedure", "")
    wrong, how = corrupt(steps, keywords, rng, {})
    assert how == "missing_step" and wrong.count("\n") == 1 and wrong.startswith("1. ") and "\n2. " in wrong
    cell = QAPair("In the table, what for E03?", "Overcurrent", "d", "table", "")
    assert corrupt(cell, keywords, rng, {cell.question: ["Phase loss"]}) == ("Phase loss", "swapped_cell")


def test_preference_pairs_have_grounded_chosen_and_different_rejected(corpus):
    docs, keywords, pairs = corpus
    doc = docs["maintenance-schedule.md"]
    made = preference_pairs(pairs[doc.doc_id], keywords, table_columns(doc), seed=0, max_per_chunk=6)
    assert len(made) >= 40
    assert all(normalise(p.chosen) != normalise(p.rejected) for p in made)
    assert all(Counter((p.source, p.chunk) for p in made)[(p.source, p.chunk)] <= 6 for p in made)
    again = preference_pairs(pairs[doc.doc_id], keywords, table_columns(doc), seed=0, max_per_chunk=6)
    assert again == made  # deterministic for a seed


def test_a_document_without_structure_still_gives_completions():
    doc = Document("note", "Note", "The pump must be stopped before the coupling guard is removed by the fitter on "
                   "duty. The seal must be flushed with clean water before the pump is started again.", "note.txt")
    pairs = extract_pairs(doc, chunk_document(doc), ["coupling guard", "seal"], max_pairs_per_chunk=12)
    assert pairs and {p.kind for p in pairs} <= {"cloze", "completion"}
