"""The evaluation reports a specialist carries, typed, in a module every package may import.

`EvalReport` is the held-out verdict that `eval.report.compare` writes: metrics per stage against
the base and the statistical gate's decision. `ExamReport` is the side-by-side summary of the
user's own exam (`eval.exam_eval.summarise`). Both live on the registry record, and the API, the
CLI, the model card and the registration gate read them through the accessors here rather than
by dictionary keys.

Old records still load: missing fields take their defaults, an empty `{}` means "no report", and a
report written before the statistical gate (no `accepted`) is accepted exactly when it beat its base.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# metric -> (better direction, label). "lower"/"higher" are judged; None is context only.
METRICS: dict[str, tuple[str | None, str]] = {
    "perplexity": ("lower", "held-out perplexity"),
    "mcq_accuracy": ("higher", "multiple-choice accuracy"),
    "mcq_chance": (None, "multiple-choice chance level"),
    "token_f1": ("higher", "token F1 of greedy answers"),
    "rouge_l": ("higher", "ROUGE-L of greedy answers"),
    "preference_accuracy": ("higher", "chosen ranked above rejected"),
}
HEADLINE = ("perplexity", "mcq_accuracy")  # the two figures a list or a summary shows

Verdict = Literal["beats", "accepted", "refused"]


class EvalReport(BaseModel):
    """Metrics per stage (`base` first, then pipeline order), the final stage and the verdict.

    `beats_base`: significantly better than the base on every required metric. `accepted`: the
    gate lets it be registered (not significantly worse on any). Reports written before the
    statistical gate have no `accepted` and no `gate`; `is_accepted` is then `beats_base`.
    """

    model_config = ConfigDict(extra="ignore")

    stages: dict[str, dict[str, int | float]] = Field(default_factory=dict)
    final_stage: str = ""
    beats_base: bool = False
    reasons: list[str] = Field(default_factory=list)
    accepted: bool | None = None
    warnings: list[str] = Field(default_factory=list)
    gate: dict[str, Any] = Field(default_factory=dict)

    @property
    def is_accepted(self) -> bool:
        return self.beats_base if self.accepted is None else self.accepted

    @property
    def verdict(self) -> Verdict:
        return "beats" if self.beats_base else "accepted" if self.is_accepted else "refused"

    @property
    def base(self) -> dict[str, int | float]:
        return self.stages.get("base", {})

    @property
    def final(self) -> dict[str, int | float]:
        return self.stages.get(self.final_stage, {})

    def final_metrics(self) -> dict[str, float]:
        """The final stage's judged and context metrics (no item counts)."""
        return {k: float(v) for k, v in self.final.items() if k in METRICS}

    def headline(self) -> dict[str, tuple[float | None, float | None]]:
        """(base, final) of perplexity and multiple-choice accuracy, for those measured."""
        return {m: (self.base.get(m), self.final.get(m)) for m in HEADLINE if m in self.base or m in self.final}

    def refusal(self) -> str | None:
        """Why the gate refuses it, in one line (None when accepted)."""
        if self.is_accepted:
            return None
        reasons = self.gate.get("reasons") or [r for r in self.reasons if "(required)" in r] or self.reasons
        return "; ".join(reasons) or "no reasons recorded"

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class ExamReport(BaseModel):
    """Base and specialist (and any other system) on the user's exam: the summary `atelier eval
    specialist --json` prints. Only what the registry and its readers use is typed; the rest of the
    summary (per-system scores, paired comparisons, flips, results by kind) is kept as it came."""

    model_config = ConfigDict(extra="allow")

    exam: str = ""
    exam_sha256: str | None = None
    items: int = 0
    gate: dict[str, Any] | None = None

    def refusal(self) -> str | None:
        """Why the exam gate refuses the specialist, in one line (None when accepted)."""
        if self.gate and self.gate.get("accepted") is True:
            return None
        reasons = (self.gate or {}).get("reasons") or ["the exam result has no gate verdict (no base/specialist pair)"]
        return "; ".join(reasons)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def none_if_empty(value: Any) -> Any:
    """`{}` (how records written before these types said "no report") as None."""
    return None if value == {} else value
