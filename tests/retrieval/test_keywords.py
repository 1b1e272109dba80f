"""Domain keywords against the wordfreq background, on the real sample manuals."""

from __future__ import annotations

from pathlib import Path

import pytest

from retrieval.documents import load_folder
from retrieval.keywords import Keyword, extract_keywords, log_odds_z

DOCS = Path(__file__).resolve().parents[2] / "examples" / "docs"


@pytest.fixture(scope="module")
def keywords() -> list[Keyword]:
    return extract_keywords(load_folder(DOCS).documents, top_k=300)


def test_top_keywords_are_domain_terms_not_general_words(keywords):
    top = [k.term.lower() for k in keywords[:30]]
    for term in ("impeller", "mechanical seal", "cavitation", "baseplate", "bearing frame"):
        assert term in top, (term, top)
    for general in ("the", "which", "also", "section", "must", "manual", "document"):
        assert general not in top


def test_multi_word_terms_are_found_and_nested_ones_are_not_repeated(keywords):
    terms = [k.term.lower() for k in keywords]
    assert {"net positive suction head", "soft foot", "casing wear ring", "wear ring"} <= set(terms)
    assert "positive suction head" not in terms  # only ever seen inside the longer term
    assert "casing wear" not in terms
    assert sum(k.n_words > 1 for k in keywords[:50]) >= 15


def test_numbers_units_and_plurals_are_handled(keywords):
    terms = [k.term.lower() for k in keywords]
    assert not {"mm", "rpm", "bar", "hz", "kw", "m"} & set(terms)
    assert not any(any(c.isdigit() for c in t) for t in terms)
    assert "bearing" in terms and "bearings" not in terms
    assert "NPSH" in [k.term for k in keywords]  # acronyms keep their capitals


def test_ranking_is_sorted_and_counts_are_real(keywords):
    scores = [k.score for k in keywords]
    assert scores == sorted(scores, reverse=True)
    text = " ".join(d.text.lower() for d in load_folder(DOCS).documents)
    impeller = next(k for k in keywords if k.term == "impeller")
    assert impeller.count >= 80 and text.count("impeller") >= impeller.count


def test_frequent_general_words_lose_to_rare_domain_words():
    # the prior makes a word need both a big frequency ratio and enough occurrences
    assert log_odds_z(20, 10_000, 2.7e-7, 20_000) > log_odds_z(40, 10_000, 1e-4, 20_000) > 0
    docs = ["The impeller of the pump turns. The impeller wears. Check the impeller and the volute casing."] * 3
    terms = [k.term for k in extract_keywords(docs, top_k=5)]
    assert {"impeller", "volute casing"} <= set(terms[:3]) and not {"the", "of", "and"} & set(terms)


def test_empty_input_gives_no_keywords():
    assert extract_keywords([]) == []
    assert extract_keywords(["123 456"]) == []
