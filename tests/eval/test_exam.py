"""Reading an exam: usable items, bad lines reported by number, duplicated ids, the shipped exam."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from atelier.errors import AtelierError
from eval.exam import read_exam

EXAM = Path(__file__).resolve().parents[2] / "bench" / "exams" / "hx-pumps.jsonl"


def _write(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_bad_lines_are_reported_with_their_numbers_and_skipped(tmp_path):
    exam = read_exam(_write(tmp_path / "exam.jsonl", [
        {"id": "a", "question": "Torque?", "answer": "80 N·m", "options": ["80 N·m", "65 N·m"], "correct": 0},
        "{not json",
        {"question": "Only open", "answer": "E14", "kind": "code"},
        {"question": "", "answer": "x"},
        {"question": "Bad index", "answer": "x", "options": ["x", "y"], "correct": 2},
        {"question": "Same option", "options": ["x", "x"], "correct": 0},
        "",
        {"question": "Nothing to score"},
        {"id": "a", "question": "Repeated id", "answer": "y"},
        {"question": "Bool index", "answer": "x", "options": ["x", "y"], "correct": True},
        {"question": "MCQ only", "options": ["x", "y", "z"], "correct": 1},
    ]))
    assert [i.id for i in exam.items] == ["a", "line3", "line11"]
    assert [line.split(":")[0] for line in exam.problems] == [
        "line 2", "line 4", "line 5", "line 6", "line 8", "line 9", "line 10"]
    assert "already used on line 1" in exam.problems[5]
    assert [i.is_mcq for i in exam.items] == [True, False, True]
    assert [i.is_open for i in exam.items] == [True, True, False]
    assert exam.items[1].kind == "code" and len(exam.sha256) == 64


def test_an_exam_with_no_usable_item_is_a_one_line_error(tmp_path):
    with pytest.raises(AtelierError, match=r"no usable item \(line 1: not valid JSON") as caught:
        read_exam(_write(tmp_path / "bad.jsonl", ["nope", "{}"]))
    assert "\n" not in str(caught.value)
    with pytest.raises(AtelierError, match="cannot read the exam"):
        read_exam(tmp_path / "missing.jsonl")


def test_the_shipped_exam_is_well_formed_and_balanced():
    exam = read_exam(EXAM)
    assert not exam.problems and len(exam.items) == 80 and len(exam.mcq_items) == 80 == len(exam.open_items)
    positions = Counter(i.correct for i in exam.items)
    assert positions == {0: 20, 1: 20, 2: 20, 3: 20}
    assert all(len(i.options) == 4 and i.options[i.correct] == i.answer for i in exam.items)
    expected = 0.0  # accuracy of "pick the longest option", ties broken at random
    for item in exam.items:
        lengths = [len(o) for o in item.options]
        tied = [k for k, n in enumerate(lengths) if n == max(lengths)]
        expected += (item.correct in tied) / len(tied)
    assert expected / len(exam.items) <= 0.25, f"picking the longest option scores {expected / 80:.2f}"
    rows = [json.loads(line) for line in EXAM.read_text().splitlines()]
    docs = {p.name for p in (EXAM.parents[2] / "examples" / "docs").iterdir()}
    assert {r["source"] for r in rows} <= docs
