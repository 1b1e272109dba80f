"""The exam scorer on its own, with systems whose behaviour is known: the longest option, always "A",
an oracle, and a specialist that is right exactly where the base is wrong."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from eval.exam import Exam, ExamItem, read_exam
from eval.exam_eval import run_system, summarise
from eval.gate import GateConfig

EXAM = Path(__file__).resolve().parents[2] / "bench" / "exams" / "hx-pumps.jsonl"


@dataclass
class Scripted:
    """A system that picks with `pick(item) -> option index` and answers with `say(item) -> text`."""

    name: str
    pick: object = None
    say: object = None
    kind: str = "local"
    closed: list = field(default_factory=list)

    def choose(self, items):
        if self.pick is None:
            return None
        return [[1.0 if k == self.pick(i) else 0.0 for k in range(len(i.options))] for i in items]

    def answer(self, items):
        return [self.say(i) for i in items]

    def perplexity(self, texts):
        return None

    def close(self):
        self.closed.append(True)


def longest(item):
    return max(range(len(item.options)), key=lambda k: (len(item.options[k]), -k))


def always_a(item):
    return 0


def test_a_model_that_always_picks_the_longest_option_scores_what_the_lengths_give():
    exam = read_exam(EXAM)
    expected = sum(longest(i) == i.correct for i in exam.items) / len(exam.items)
    run = run_system(Scripted("longest", longest, lambda i: max(i.options, key=len)), exam)
    result = summarise(exam, {"longest": run})["systems"]["longest"]
    assert result["mcq_accuracy"] == pytest.approx(expected)
    assert result["mcq_accuracy"] < 0.25, "on this exam the longest option is no better than chance"
    low, high = result["mcq_ci"]
    assert low <= result["mcq_accuracy"] <= high and 0.1 < high - low < 0.25


def test_a_model_that_always_answers_a_scores_the_share_of_a_and_nothing_on_open_questions():
    exam = read_exam(EXAM)
    system = Scripted("a", always_a, lambda i: "A")
    run = run_system(system, exam)
    result = summarise(exam, {"a": run})["systems"]["a"]
    assert result["mcq_accuracy"] == pytest.approx(sum(i.correct == 0 for i in exam.items) / 80) == 0.25
    assert result["exact"] == result["contains"] == result["f1"] == 0.0
    assert result["mcq_n"] == result["open_n"] == result["n"] == 80
    assert system.closed == [True], "the system is released after its run"


def test_search_like_systems_without_logits_answer_open_questions_only():
    exam = read_exam(EXAM)
    run = run_system(Scripted("search", None, lambda i: f"From the documents: {i.answer}."), exam)
    result = summarise(exam, {"search": run})["systems"]["search"]
    assert result["mcq_accuracy"] is None and result["mcq_ci"] is None and result["mcq_n"] == 0
    assert result["contains"] == 1.0 and result["exact"] == 0.0


def _small_exam(n: int = 40) -> Exam:
    items = [ExamItem(id=f"q{k:02d}", question=f"Question {k}?", answer=f"{10 + k} N·m",
                      options=(f"{10 + k} N·m", f"{90 + k} N·m", f"{200 + k} N·m", f"{300 + k} N·m"), correct=k % 4,
                      kind="number" if k % 2 else "code") for k in range(n)]
    return Exam(name="small.jsonl", items=items, sha256="0" * 64)


def test_paired_comparison_flips_and_kinds():
    exam = _small_exam()
    base_right = {i.id for k, i in enumerate(exam.items) if k < 10}
    spec_right = {i.id for k, i in enumerate(exam.items) if 5 <= k < 35}  # loses q00-q04, gains q10-q34
    wrong = lambda i: (i.correct + 1) % 4
    base = Scripted("base", lambda i: i.correct if i.id in base_right else wrong(i),
                    lambda i: i.answer if i.id in base_right else "no idea")
    spec = Scripted("specialist", lambda i: i.correct if i.id in spec_right else wrong(i),
                    lambda i: f"Use {i.answer.replace('N·m', 'Nm')}." if i.id in spec_right else "80 N·m")
    runs = {"base": run_system(base, exam), "specialist": run_system(spec, exam)}
    result = summarise(exam, runs)
    assert set(result) >= {"exam", "items", "mcq_items", "systems", "paired", "flips", "by_kind", "gate"}
    assert result["items"] == result["mcq_items"] == 40
    assert result["systems"]["base"]["mcq_accuracy"] == 0.25 and result["systems"]["specialist"]["mcq_accuracy"] == 0.75
    assert result["systems"]["specialist"]["contains"] == 0.75 and result["systems"]["specialist"]["exact"] == 0.0
    pair = result["paired"]["specialist_vs_base"]
    assert pair["mcq_delta"] == 0.5 and pair["mcq_test"] == "mcnemar-exact"
    assert pair["p_value"] == pair["mcq_p_value"] == pytest.approx(2 * sum(
        __import__("math").comb(30, k) for k in range(6)) / 2 ** 30, rel=1e-3)
    assert result["flips"]["base_right_specialist_wrong"] == ["q00", "q01", "q02", "q03", "q04"]
    assert result["flips"]["base_wrong_specialist_right"] == [f"q{k:02d}" for k in range(10, 35)]
    assert result["by_kind"]["code"]["base"]["n"] == 20
    assert result["by_kind"]["code"]["specialist"]["mcq_accuracy"] == 0.75
    gate = result["gate"]
    assert gate["accepted"] and gate["significant"] and not gate["warnings"]
    # the same pair the other way round: the "specialist" is significantly worse and the gate refuses it
    reverse = summarise(exam, {"base": runs["specialist"], "specialist": runs["base"]})
    assert not reverse["gate"]["accepted"] and any("significantly worse" in r for r in reverse["gate"]["reasons"])
    # a difference of one item is noise: accepted, with a warning
    near = {i.id for k, i in enumerate(exam.items) if k < 11}
    close = summarise(exam, {"base": runs["base"], "specialist": run_system(
        Scripted("specialist", lambda i: i.correct if i.id in near else wrong(i),
                 lambda i: i.answer if i.id in near else "x"), exam)}, GateConfig(required_exam=["mcq_accuracy"]))
    assert close["gate"]["accepted"] and not close["gate"]["significant"]
    assert "not significantly different" in close["gate"]["warnings"][0]
