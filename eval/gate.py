"""The registration gate as a statistical verdict: refuse only what is significantly worse.

On 100 multiple-choice items a 95% interval is about ±0.09, so "higher by any amount" lets
noise decide. The rule here, per required metric, on paired per-item outcomes (same items,
base and specialist):

* significantly worse than the base (paired test, p < alpha, in the wrong direction) -> refuse;
* significantly better -> fine;
* anything else (a difference the test cannot tell from noise) -> accept, with a warning that
  says so and prints the intervals.

Without per-item outcomes (reports from before the statistical gate) nothing can be tested:
a point value no better than the base's is refused, a better one accepted with a warning.

A required metric measured on neither side is not evidence: the specialist is refused.
Pure functions over outcomes; the thresholds are `GateConfig`, part of the eval config.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, Field

from atelier.config import StrictModel
from eval.stats import bootstrap_ci, mcnemar_exact, paired_bootstrap, paired_log_ratio

Outcome = Literal["better", "worse", "not_significant", "untested", "missing"]


class GateConfig(StrictModel):
    """Thresholds of the statistical gate and of the intervals reported with it."""

    alpha: float = Field(0.05, gt=0, lt=1, description="Significance level of the paired test: the specialist "
                         "is refused when it is worse than its base with p below this on a required metric.")
    confidence: float = Field(0.95, gt=0, lt=1, description="Coverage of the bootstrap intervals printed with "
                              "every score and difference.")
    bootstrap_samples: int = Field(2000, ge=100, description="Bootstrap resamples for intervals and paired "
                                   "tests (2000 gives p-values down to about 0.0005).")
    seed: int = Field(0, description="Seed of the bootstrap resampling, so a report is reproducible.")
    required: list[str] = Field(["perplexity", "mcq_accuracy"], description="Held-out metrics the specialist "
                                "must not be significantly worse on (and must be measured).")
    required_exam: list[str] = Field(["mcq_accuracy", "contains"], description="Exam metrics (from `--exam`) the "
                                     "specialist must not be significantly worse on; those the exam cannot "
                                     "measure (no options, no answers) are skipped.")


class MetricTest(BaseModel):
    """One metric, base vs specialist, with the paired test behind the verdict."""

    metric: str
    direction: Literal["higher", "lower"]
    base: float | None = None
    specialist: float | None = None
    base_ci: list[float] | None = None
    specialist_ci: list[float] | None = None
    delta: float | None = None  # specialist - base (log perplexity for perplexity)
    delta_ci: list[float] | None = None
    p_value: float | None = None
    test: str | None = None  # "mcnemar-exact", "paired-bootstrap", "paired-bootstrap-log-ppl"
    n: int = 0
    outcome: Outcome

    def sentence(self) -> str:
        if self.outcome == "missing":
            return f"{self.metric}: not measured on both sides (no held-out data or no items)"
        show = lambda v: "—" if v is None else f"{v:.4g}"
        interval = lambda ci: "" if not ci else f" [{ci[0]:.3g}, {ci[1]:.3g}]"
        words = {"better": "significantly better", "worse": "significantly worse",
                 "not_significant": "not significantly different", "untested": "not tested (no per-item outcomes)"}
        test = f", p = {self.p_value:.3g} ({self.test}, n = {self.n})" if self.p_value is not None else ""
        return (f"{self.metric}: specialist {show(self.specialist)}{interval(self.specialist_ci)} vs base "
                f"{show(self.base)}{interval(self.base_ci)}, {words[self.outcome]}{test}")


class GateVerdict(BaseModel):
    """accepted: may be registered; significant: significantly better on every required metric."""

    accepted: bool
    significant: bool
    tests: dict[str, MetricTest] = Field(default_factory=dict)
    reasons: list[str] = Field(default_factory=list)  # why refused (empty when accepted)
    warnings: list[str] = Field(default_factory=list)  # accepted, but the evidence is weak

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _classify(delta: float, p: float, direction: str, alpha: float) -> Outcome:
    if p >= alpha or delta == 0:
        return "not_significant"
    improved = delta > 0 if direction == "higher" else delta < 0
    return "better" if improved else "worse"


def paired_test(metric: str, direction: Literal["higher", "lower"], base: Any, specialist: Any,
                config: GateConfig, *, base_value: float | None = None,
                specialist_value: float | None = None) -> MetricTest:
    """Paired test of one metric from per-item outcomes.

    Outcomes are lists aligned by item: booleans (right/wrong: exact McNemar), floats in [0, 1]
    (paired bootstrap of the mean), or (nll, tokens) windows for perplexity (paired bootstrap of
    log perplexity). Without outcomes on both sides (or misaligned ones) the point values are
    reported and the metric is `untested`; without values either, `missing`.
    """
    boot = dict(confidence=config.confidence, samples=config.bootstrap_samples, seed=config.seed)
    if not base or not specialist or len(base) != len(specialist):
        if base_value is None or specialist_value is None:
            return MetricTest(metric=metric, direction=direction, base=base_value, specialist=specialist_value,
                              outcome="missing")
        return MetricTest(metric=metric, direction=direction, base=base_value, specialist=specialist_value,
                          delta=specialist_value - base_value, outcome="untested")
    n = len(base)
    if metric == "perplexity":
        result = paired_log_ratio(base, specialist, **boot)
        value = lambda w: math.exp(sum(x for x, _ in w) / max(sum(t for _, t in w), 1))
        fields = dict(base=value(base), specialist=value(specialist), test="paired-bootstrap-log-ppl")
    else:
        a, b = [float(x) for x in base], [float(x) for x in specialist]
        result = paired_bootstrap(a, b, **boot)
        binary = all(x in (0.0, 1.0) for x in a + b)
        if binary:
            result["p_value"] = mcnemar_exact([x == 1.0 for x in a], [x == 1.0 for x in b])["p_value"]
        fields = dict(base=sum(a) / n, specialist=sum(b) / n, base_ci=list(bootstrap_ci(a, **boot)),
                      specialist_ci=list(bootstrap_ci(b, **boot)),
                      test="mcnemar-exact" if binary else "paired-bootstrap")
    return MetricTest(metric=metric, direction=direction, delta=result["delta"], delta_ci=result["ci"],
                      p_value=result["p_value"], n=n,
                      outcome=_classify(result["delta"], result["p_value"], direction, config.alpha), **fields)


def _improved(test: MetricTest) -> bool:
    if test.delta is None or test.delta == 0:
        return False
    return test.delta > 0 if test.direction == "higher" else test.delta < 0


def verdict(tests: dict[str, MetricTest], required: list[str], *, skip_missing: bool = False) -> GateVerdict:
    """Refuse when a required metric is significantly worse (or missing, unless `skip_missing`);
    warn when one is not significantly better; `significant` when all are significantly better."""
    reasons, warnings, counted = [], [], []
    for metric in required:
        test = tests.get(metric)
        if test is None or test.outcome == "missing":
            if not skip_missing:
                reasons.append(f"{metric}: not measured, so there is no evidence the specialist is not worse")
            continue
        counted.append(test)
        if test.outcome == "worse" or (test.outcome == "untested" and not _improved(test)):
            reasons.append(test.sentence())  # untested and no better: nothing shows the loss is noise
        elif test.outcome in ("not_significant", "untested"):
            warnings.append(test.sentence())
    if not counted and not reasons:
        reasons.append(f"none of the required metrics ({', '.join(required)}) was measured")
    significant = bool(counted) and not reasons and all(t.outcome == "better" for t in counted)
    return GateVerdict(accepted=not reasons, significant=significant, tests=tests, reasons=reasons,
                       warnings=warnings)
