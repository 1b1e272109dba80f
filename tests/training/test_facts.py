"""Facts of the documents: found with their topics, asked several ways, restated, and counted."""

from __future__ import annotations

from pathlib import Path

import pytest

from retrieval.chunking import chunk_document
from retrieval.documents import Document, load_folder
from training import facts
from training.data import DEFAULT_CHUNKING, DataConfig, build_datasets

DOCS = Path(__file__).resolve().parents[2] / "examples" / "docs"
TEXT = """# Impeller service

Tighten the impeller nut to 80 N·m in a cross pattern. Fault E14 means the pump ran dry.
The wear ring clearance must not exceed 0.5 mm on any pump.

| Part | HX-40 | HX-65 |
|---|---|---|
| Impeller nut | M16, 45 N·m | M20, 80 N·m |
"""
KEYWORDS = ["impeller nut", "impeller", "wear ring clearance", "pump"]


@pytest.fixture
def doc() -> Document:
    return Document(doc_id="service.md", title="Impeller service", text=TEXT, source="service.md")


def test_values_codes_and_cells_are_found_with_their_topics(doc):
    found = {(f.kind, f.value, f.topic.lower()) for f in facts.find_facts(doc, KEYWORDS)}
    assert ("quantity", "80 N·m", "impeller nut") in found
    assert ("quantity", "0.5 mm", "wear ring clearance") in found
    assert ("code", "E14", "e14") in found
    assert ("cell", "M20, 80 N·m", "impeller nut") in found


def test_each_fact_is_asked_several_ways_and_grounded_in_its_chunk(doc):
    pairs = facts.fact_pairs(doc, chunk_document(doc, DEFAULT_CHUNKING), KEYWORDS, per_fact=2, max_per_chunk=50)
    torque = [p for p in pairs if "80 N·m" in p.answer and p.kind == "fact_quantity"]
    assert len({p.question for p in torque}) == 2
    assert any(p.answer == "80 N·m" for p in torque) and any(len(p.answer) > 20 for p in torque)
    assert all(p.answer.split(".")[0][:6] in p.context or p.answer in p.context for p in pairs)
    capped = facts.fact_pairs(doc, chunk_document(doc, DEFAULT_CHUNKING), KEYWORDS, per_fact=2, max_per_chunk=3)
    assert len(capped) == 3


def test_restatements_hold_every_value_in_another_shape(doc):
    texts = [p.text for p in facts.restatements(doc, KEYWORDS, rounds=2)]
    assert any(text.startswith("Key values") for text in texts)
    assert any("Q: " in text for text in texts)
    assert all(value in "\n".join(texts) for value in ("80 N·m", "0.5 mm", "M20, 80 N·m"))


def test_coverage_counts_value_next_to_topic():
    doc = Document(doc_id="a", title="A", text="Tighten the impeller nut to 80 N·m firmly.", source="a")
    assert facts.coverage([doc], KEYWORDS, ["nothing here"])["seen_share"] == 0.0
    seen = facts.coverage([doc], KEYWORDS, ["impeller nut: 80 Nm", "The impeller nut takes 80 N·m.", "80 N·m"])
    assert seen["facts"] == 1 and seen["seen_share"] == 1.0 and seen["mean_times"] == 2.0


def test_fact_questions_raise_how_often_training_data_states_each_fact(tmp_path, sample_data):
    docs = load_folder(DOCS).documents
    plain = build_datasets(docs, tmp_path / "plain", DataConfig(fact_questions=0, fact_restatements=0))
    _, varied, _ = sample_data  # the defaults: fact questions and restatements on
    assert varied.coverage["facts"] == plain.coverage["facts"] > 100
    assert varied.coverage["seen_3x_share"] > plain.coverage["seen_3x_share"] + 0.15
    assert varied.kinds["dpo/train.jsonl"].get("fact_quantity/changed_number", 0) > 100  # wrong-fact rejections
