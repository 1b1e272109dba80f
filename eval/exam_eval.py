"""Putting one exam to several systems, and what a careful reader needs from the result.

`run_system` asks one system every item (multiple choice by option log-likelihood, open QA by
greedy answers); `summarise` turns the per-item results into scores with 95% bootstrap
intervals, paired comparisons of the specialist against every other system (exact McNemar on
multiple choice, paired bootstrap on the answer metrics), the flips against the base, a
breakdown by `kind`, and the gate's verdict. `summarise` is pure, so the statistics are tested
without a model.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from eval.answers import contains_answer, exact_match, token_f1
from eval.exam import Exam
from eval.gate import GateConfig, paired_test, verdict
from eval.stats import bootstrap_ci

METRIC_KEYS = {"mcq_accuracy": "mcq", "exact": "exact", "contains": "contains", "f1": "f1"}


@dataclass
class SystemRun:
    """Per-item results of one system; absent dicts mean the system could not do that part."""

    name: str
    kind: str
    mcq: dict[str, int] | None = None  # item id -> 1 right / 0 wrong
    choices: dict[str, int] = field(default_factory=dict)  # item id -> option picked
    answers: dict[str, str] = field(default_factory=dict)
    exact: dict[str, int] = field(default_factory=dict)
    contains: dict[str, int] = field(default_factory=dict)
    f1: dict[str, float] = field(default_factory=dict)
    general_perplexity: float | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def per_item(self, metric: str) -> dict[str, float] | None:
        values = getattr(self, METRIC_KEYS[metric])
        return values if values else None


def run_system(system, exam: Exam, *, general_texts: list[str] | None = None,
               status: Callable[[str], None] | None = None) -> SystemRun:
    """Every exam item put to `system`; the system is closed afterwards (a local model is released)."""
    run = SystemRun(system.name, system.kind)
    say = status or (lambda _: None)
    try:
        mcq = exam.mcq_items
        if mcq:
            say(f"{system.name}: {len(mcq)} multiple-choice items")
            started = time.perf_counter()
            scores = system.choose(mcq)
            if scores is not None:
                run.choices = {i.id: max(range(len(s)), key=s.__getitem__) for i, s in zip(mcq, scores)}
                run.mcq = {i.id: int(run.choices[i.id] == i.correct) for i in mcq}
                run.seconds["mcq"] = round(time.perf_counter() - started, 2)
        open_items = exam.open_items
        if open_items:
            say(f"{system.name}: {len(open_items)} open questions")
            started = time.perf_counter()
            answers = system.answer(open_items)
            for item, text in zip(open_items, answers):
                run.answers[item.id] = text
                run.exact[item.id] = int(exact_match(text, item.answer, item.aliases))
                run.contains[item.id] = int(contains_answer(text, item.answer, item.aliases))
                run.f1[item.id] = token_f1(text, item.answer, item.aliases)
            run.seconds["open"] = round(time.perf_counter() - started, 2)
        if general_texts:
            say(f"{system.name}: perplexity on general text")
            started = time.perf_counter()
            run.general_perplexity = system.perplexity(general_texts)
            run.seconds["general"] = round(time.perf_counter() - started, 2)
    finally:
        system.close()
    return run


def _score(values: dict[str, float] | None, ids: list[str], gate: GateConfig) -> tuple[float | None, list | None]:
    if not values:
        return None, None
    data = [float(values[i]) for i in ids if i in values]
    low, high = bootstrap_ci(data, confidence=gate.confidence, samples=gate.bootstrap_samples, seed=gate.seed)
    return sum(data) / len(data), [round(low, 4), round(high, 4)]


def _system_summary(run: SystemRun, exam: Exam, gate: GateConfig) -> dict[str, Any]:
    mcq_ids, open_ids = [i.id for i in exam.mcq_items], [i.id for i in exam.open_items]
    out: dict[str, Any] = {"kind": run.kind}
    for metric in METRIC_KEYS:
        value, ci = _score(run.per_item(metric), mcq_ids if metric == "mcq_accuracy" else open_ids, gate)
        out[metric] = None if value is None else round(value, 4)
        out["mcq_ci" if metric == "mcq_accuracy" else f"{metric}_ci"] = ci
    out["n"] = len(exam.items)
    out["mcq_n"] = len(run.mcq or {})
    out["open_n"] = len(run.answers)
    if run.general_perplexity is not None:
        out["general_perplexity"] = round(run.general_perplexity, 3)
    out["seconds"] = run.seconds
    return out


def _aligned(first: SystemRun, second: SystemRun, metric: str) -> tuple[list, list] | None:
    a, b = first.per_item(metric), second.per_item(metric)
    if not a or not b:
        return None
    ids = [i for i in a if i in b]
    return [a[i] for i in ids], [b[i] for i in ids]


def compare_runs(reference: SystemRun, specialist: SystemRun, gate: GateConfig) -> dict[str, Any]:
    """Paired tests of `specialist` against `reference` on every metric both measured."""
    out: dict[str, Any] = {}
    for metric in METRIC_KEYS:
        pair = _aligned(reference, specialist, metric)
        if pair is None:
            continue
        test = paired_test(metric, "higher", pair[0], pair[1], gate)
        short = "mcq" if metric == "mcq_accuracy" else metric
        out[f"{short}_delta"] = round(test.delta, 4)
        out[f"{short}_delta_ci"] = [round(x, 4) for x in test.delta_ci]
        out[f"{short}_p_value"] = float(f"{test.p_value:.4g}")
        out[f"{short}_test"] = test.test
    if "mcq_p_value" in out:  # the headline numbers of the JSON shape
        out["p_value"] = out["mcq_p_value"]
    elif "contains_p_value" in out:
        out["p_value"] = out["contains_p_value"]
    return out


def flips(base: SystemRun, specialist: SystemRun) -> dict[str, Any]:
    """Items the base got right and the specialist wrong, and the reverse (MCQ, else 'contains')."""
    metric = "mcq_accuracy" if base.mcq and specialist.mcq else "contains"
    a, b = base.per_item(metric) or {}, specialist.per_item(metric) or {}
    ids = [i for i in a if i in b]
    return {"metric": metric,
            "base_right_specialist_wrong": [i for i in ids if a[i] and not b[i]],
            "base_wrong_specialist_right": [i for i in ids if b[i] and not a[i]]}


def by_kind(exam: Exam, runs: dict[str, SystemRun]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per `kind`: each system's MCQ accuracy and 'contains' rate on that kind's items."""
    kinds = sorted({i.kind for i in exam.items if i.kind})
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for kind in kinds:
        ids = {i.id for i in exam.items if i.kind == kind}
        out[kind] = {}
        for name, run in runs.items():
            row: dict[str, Any] = {"n": len(ids)}
            for metric in ("mcq_accuracy", "contains"):
                values = [v for i, v in (run.per_item(metric) or {}).items() if i in ids]
                row[metric] = round(sum(values) / len(values), 4) if values else None
            out[kind][name] = row
    return out


def summarise(exam: Exam, runs: dict[str, SystemRun], gate: GateConfig | None = None) -> dict[str, Any]:
    """The whole result as one JSON-ready dict (the shape `atelier eval specialist --json` prints)."""
    gate = gate or GateConfig()
    result: dict[str, Any] = {
        "exam": exam.name, "exam_sha256": exam.sha256, "items": len(exam.items), "mcq_items": len(exam.mcq_items),
        "open_items": len(exam.open_items), "problems": list(exam.problems),
        "systems": {name: _system_summary(run, exam, gate) for name, run in runs.items()},
        "paired": {}, "flips": {}, "by_kind": by_kind(exam, runs)}
    specialist = runs.get("specialist")
    if specialist is not None:
        for name, run in runs.items():
            if name != "specialist":
                result["paired"][f"specialist_vs_{name}"] = compare_runs(run, specialist, gate)
        if "base" in runs:
            result["flips"] = flips(runs["base"], specialist)
            tests = {}
            for metric in gate.required_exam:
                pair = _aligned(runs["base"], specialist, metric) if metric in METRIC_KEYS else None
                if pair is not None:
                    tests[metric] = paired_test(metric, "higher", pair[0], pair[1], gate)
            result["gate"] = verdict(tests, list(gate.required_exam), skip_missing=True).to_dict()
    return result


def item_rows(exam: Exam, runs: dict[str, SystemRun]) -> list[dict[str, Any]]:
    """One row per item with every system's pick and answer (written as items.jsonl with --out)."""
    rows = []
    for item in exam.items:
        row: dict[str, Any] = {"id": item.id, "kind": item.kind, "question": item.question, "answer": item.answer}
        for name, run in runs.items():
            row[name] = {"choice": run.choices.get(item.id), "mcq": (run.mcq or {}).get(item.id),
                         "answer": run.answers.get(item.id), "contains": run.contains.get(item.id),
                         "f1": None if item.id not in run.f1 else round(run.f1[item.id], 4)}
        rows.append(row)
    return rows
