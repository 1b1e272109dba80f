"""Filters: every drop is counted under its reason."""

from __future__ import annotations

from collections import Counter

from training.filters import (
    Bounds,
    Passage,
    PreferencePair,
    QAPair,
    dedupe,
    drop_overlap,
    filter_dpo,
    filter_passages,
    filter_sft,
    grounding,
    unique_answers,
)

CONTEXT = ("Plan 32 injects clean liquid from an external source into the seal chamber. The injection pressure "
           "must be at least 1 bar above the seal chamber pressure, and the flow should be 2 L/min to 4 L/min.")
BOUNDS = Bounds(min_question_chars=5, max_question_chars=200, min_answer_chars=1, max_answer_chars=120,
                min_passage_chars=20, max_passage_chars=1000, grounding_threshold=0.8,
                enrichment_grounding_threshold=0.6, near_duplicate_threshold=0.85)


def qa(question: str, answer: str, context: str = CONTEXT) -> QAPair:
    return QAPair(question, answer, "doc", "fact", context)


def test_grounding_is_the_share_of_answer_content_words_in_the_context():
    assert grounding("The injection pressure must be at least 1 bar.", CONTEXT) == 1.0
    assert grounding("Injection pressures of 1 bar", CONTEXT) == 1.0  # plurals folded, stopwords ignored
    assert grounding("The impeller needs 7 bar of nitrogen.", CONTEXT) < 0.5
    assert grounding("the of and", CONTEXT) == 0.0


def test_filter_sft_counts_each_reason():
    rejected: Counter[str] = Counter()
    pairs = [qa("What pressure is needed?", "At least 1 bar above the seal chamber pressure."),
             qa("What pressure is needed?", "At least 1 BAR above the seal chamber pressure!"),  # same, normalised
             qa("Why?", "1 bar"),  # question too short
             qa("What flow does Plan 32 need?", "2 L/min " * 30),  # answer too long
             qa("What does Plan 32 use?", "Nitrogen from a bottle at 6 bar."),  # not in the context
             qa("What flow does Plan 32 need?", "2 L/min to 4 L/min")]
    kept = filter_sft(pairs, BOUNDS, rejected)
    assert [p.answer for p in kept] == [pairs[0].answer, "2 L/min to 4 L/min"]
    assert rejected == {"sft.duplicate": 1, "sft.question_too_short": 1, "sft.answer_too_long": 1,
                        "sft.ungrounded": 1}


def test_near_duplicates_are_found_by_minhash():
    rejected: Counter[str] = Counter()
    base = ("Plan 32 injects clean liquid from an external source into the seal chamber when the pumped liquid "
            "carries solids or fibres that would clog the orifice")
    texts = [base, base + " within hours", "Grease the motor bearings every 4,000 hours with polyurea grease."]
    assert dedupe(texts, str, 0.85, rejected, "x") == [texts[0], texts[2]]
    assert rejected == {"x.near_duplicate": 1}
    assert dedupe(texts, str, 0.95, Counter(), "x") == texts  # a stricter threshold keeps it


def test_preference_filter_drops_identical_sides_and_ungrounded_chosen():
    rejected: Counter[str] = Counter()
    pairs = [PreferencePair("What pressure?", "1 bar", "10 bar", "doc", "fact/changed_number", CONTEXT),
             PreferencePair("What flow?", "2 L/min", "2 l/min", "doc", "fact/changed_number", CONTEXT),
             PreferencePair("What gas?", "Nitrogen", "Air", "doc", "teacher", CONTEXT)]
    assert [p.chosen for p in filter_dpo(pairs, BOUNDS, rejected)] == ["1 bar"]
    assert rejected == {"dpo.rejected_equals_chosen": 1, "dpo.ungrounded": 1}


def test_enriched_passages_must_stay_grounded():
    rejected: Counter[str] = Counter()
    passages = [Passage(CONTEXT, "doc"), Passage("Plan 32 injects clean external liquid into the seal chamber at "
                                                  "1 bar above its pressure.", "doc", "enriched", CONTEXT),
                Passage("Submarines dive deeper when the ballast tanks are flooded with sea water.", "doc",
                        "enriched", CONTEXT), Passage("short", "doc")]
    kept = filter_passages(passages, BOUNDS, rejected)
    assert [p.kind for p in kept] == ["chunk", "enriched"]
    assert rejected == {"dapt.ungrounded": 1, "dapt.too_short": 1}


def test_training_items_overlapping_heldout_ones_are_dropped():
    rejected: Counter[str] = Counter()
    heldout = ["Wait at least 5 minutes after disconnection before touching any terminal of the drive."]
    train = [heldout[0], "Lift the unit only at the baseplate lifting lugs, never by the motor eyebolts."]
    assert drop_overlap(train, heldout, str, 0.85, rejected, "sft") == [train[1]]
    assert rejected == {"sft.overlaps_heldout": 1}


def test_heldout_answers_are_made_unique():
    rejected: Counter[str] = Counter()
    pairs = [qa("Q one?", "16 bar"), qa("Q two?", "16 bar."), qa("Q three?", "24 bar")]
    assert [p.question for p in unique_answers(pairs, rejected, "sft.heldout")] == ["Q one?", "Q three?"]
    assert rejected == {"sft.heldout.repeated_answer": 1}
