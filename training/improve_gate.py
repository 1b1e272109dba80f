"""The regression gate of an improvement round: is the candidate no worse than the current version?

Current and candidate are scored on the same items of each set (the specialist's held-out split,
the feedback pairs held out from training, the `--exam` when given, and all feedback pairs). Per
metric, the paired test of `eval.gate.paired_test` compares them. A set *regresses* when a metric
is worse by more than the stated tolerance (absolute for scores in [0, 1], relative for perplexity)
and the paired test says the drop is real (p < alpha): a tiny but significant shift (DPO always
moves perplexity a little) passes, and so does a large drop the test cannot tell from noise, with
a warning that says so. The candidate is accepted when no set regresses and it is better on the
feedback items (it learned what the feedback taught: multiple choice over the feedback answers,
else preference accuracy). Flips (right -> wrong, and wrong -> right) are listed either way.

Pure functions over per-item outcomes, so the rule is tested without a model.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, Field

from eval.gate import GateConfig, MetricTest, paired_test

LOWER_IS_BETTER = {"perplexity"}


class SetResult(BaseModel):
    """One evaluation set, current vs candidate."""

    name: str  # "heldout", "feedback_heldout", "exam", "feedback"
    tests: dict[str, MetricTest] = Field(default_factory=dict)
    regressed: list[str] = Field(default_factory=list)  # sentences, one per metric that got worse
    warnings: list[str] = Field(default_factory=list)  # worse beyond the tolerance, but not significantly
    flips_to_wrong: dict[str, list[str]] = Field(default_factory=dict)  # metric -> items right before, wrong after
    flips_to_right: dict[str, list[str]] = Field(default_factory=dict)  # metric -> items wrong before, right after


class ImproveVerdict(BaseModel):
    accepted: bool
    tolerance: float
    sets: dict[str, SetResult] = Field(default_factory=dict)
    reasons: list[str] = Field(default_factory=list)  # why refused (empty when accepted)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def said(test: MetricTest) -> str:
    """The test's sentence, with the two sides named as this gate names them."""
    return test.sentence().replace("specialist", "candidate").replace("vs base", "vs current")


def _beyond_tolerance(test: MetricTest, tolerance: float) -> bool:
    if test.delta is None:
        return False
    if test.direction == "lower":  # perplexity: delta is the change of log perplexity
        return test.delta > math.log1p(tolerance)
    return test.delta < -tolerance


def compare_set(
    name: str,
    current: dict[str, list],
    candidate: dict[str, list],
    gate: GateConfig,
    tolerance: float,
    ids: dict[str, list[str]] | None = None,
) -> SetResult:
    """Paired tests on every metric both sides measured; `ids` names the items of a 0/1 metric (for flips)."""
    result = SetResult(name=name)
    for metric, before in current.items():
        after = candidate.get(metric)
        if not before or not after or len(before) != len(after):
            continue
        direction = "lower" if metric in LOWER_IS_BETTER else "higher"
        test = paired_test(metric, direction, before, after, gate)
        result.tests[metric] = test
        if _beyond_tolerance(test, tolerance):
            (result.regressed if test.outcome == "worse" else result.warnings).append(f"{name} {said(test)}")
        names = (ids or {}).get(metric)
        if names and len(names) == len(before) and all(v in (0, 1) for v in before + after):
            result.flips_to_wrong[metric] = [n for n, a, b in zip(names, before, after) if a and not b]
            result.flips_to_right[metric] = [n for n, a, b in zip(names, before, after) if b and not a]
    return result


FEEDBACK_METRICS = ("mcq_accuracy", "preference_accuracy")  # the first one measured decides "better"


def decide(sets: dict[str, SetResult], tolerance: float) -> ImproveVerdict:
    """Accepted: no set regressed, and the candidate is better on the feedback items (`sets['feedback']`)."""
    reasons = [sentence for s in sets.values() if s.name != "feedback" for sentence in s.regressed]
    feedback = sets.get("feedback")
    tests = feedback.tests if feedback else {}
    test = next((tests[m] for m in FEEDBACK_METRICS if m in tests), None)
    if test is None:
        reasons.append("no feedback items to measure the round on")
    elif not (test.delta or 0) > 0:
        reasons.append(f"not better on the feedback items: {said(test)}")
    return ImproveVerdict(accepted=not reasons, tolerance=tolerance, sets=sets, reasons=reasons)
