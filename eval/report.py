"""The verdict on a specialist: its metrics stage by stage against the base, as JSON, Markdown and a plot.

`compare` is a pure function over metric dicts, so the rule that gates registration (lower
held-out perplexity AND higher multiple-choice accuracy than the base) can be tested without a
model. matplotlib is imported only when the plot is drawn.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from pydantic import BaseModel

from atelier.home import atomic_write_bytes, atomic_write_text

# metric -> (better direction, label). "lower"/"higher" are judged; None is context only.
METRICS: dict[str, tuple[str | None, str]] = {
    "perplexity": ("lower", "held-out perplexity"),
    "mcq_accuracy": ("higher", "multiple-choice accuracy"),
    "mcq_chance": (None, "multiple-choice chance level"),
    "token_f1": ("higher", "token F1 of greedy answers"),
    "rouge_l": ("higher", "ROUGE-L of greedy answers"),
    "preference_accuracy": ("higher", "chosen ranked above rejected"),
}
REQUIRED = ("perplexity", "mcq_accuracy")  # the specialist must beat the base on both
COUNTS = ("perplexity_tokens", "perplexity_windows", "mcq_items", "generation_items", "preference_items")
ARROWS = {"lower": "↓", "higher": "↑", None: ""}


class Report(BaseModel):
    """Metrics per stage (`base` first, then pipeline order), the final stage and the verdict."""

    stages: dict[str, dict[str, int | float]]
    final_stage: str
    beats_base: bool
    reasons: list[str]

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")


def _judge(metric: str, base: dict, final: dict, final_stage: str) -> tuple[bool | None, str]:
    """(improved?, a sentence) for one metric; None when either side did not measure it."""
    direction, label = METRICS[metric]
    if metric not in base or metric not in final:
        return None, f"{metric}: not measured for {'base' if metric not in base else final_stage} (no held-out data)"
    b, f = base[metric], final[metric]
    better = f < b if direction == "lower" else f > b
    word = "better" if better else ("unchanged" if f == b else "worse")
    return better, f"{metric} ({label}, {ARROWS[direction]}): {final_stage} {f:.4g} vs base {b:.4g} — {word}"


def compare(base: dict[str, float], stages: dict[str, dict[str, float]]) -> Report:
    """Does the last stage beat the base? Required: lower perplexity AND higher MCQ accuracy.

    `stages` is in pipeline order (e.g. dapt, sft, dpo); the last one is the specialist. Other
    metrics are reported as reasons but do not decide: generation metrics on a few dozen items
    are too noisy to gate on, and DPO may trade some of them for preference accuracy.
    """
    if not stages:
        raise ValueError("compare needs at least one trained stage besides the base")
    final_stage = list(stages)[-1]
    final = stages[final_stage]
    beats, reasons = True, []
    for metric, (direction, _) in METRICS.items():
        if direction is None:
            continue
        better, sentence = _judge(metric, base, final, final_stage)
        if metric in REQUIRED:
            beats = beats and bool(better)
            sentence += " (required)"
        reasons.append(sentence)
    verdict = "beats" if beats else "does not beat"
    reasons.insert(0, f"{final_stage} {verdict} the base: it needs lower perplexity and higher mcq_accuracy")
    return Report(stages={"base": dict(base), **{k: dict(v) for k, v in stages.items()}},
                  final_stage=final_stage, beats_base=beats, reasons=reasons)


# ----------------------------------------------------------------------------- rendering


def _cell(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def render_markdown(report: Report) -> str:
    """A table of metrics (rows) by stage (columns), the items used, and the verdict with its reasons."""
    names = list(report.stages)
    head = "| metric | better | " + " | ".join(names) + " |\n|---|:-:|" + "---:|" * len(names) + "\n"
    rows = [f"| {m} | {ARROWS[d] or '·'} | " + " | ".join(_cell(report.stages[s].get(m)) for s in names) + " |"
            for m, (d, _) in METRICS.items() if any(m in report.stages[s] for s in names)]
    counts = [f"| {c} | " + " | ".join(_cell(report.stages[s].get(c)) for s in names) + " |"
              for c in COUNTS if any(c in report.stages[s] for s in names)]
    verdict = "**beats the base**" if report.beats_base else "**does not beat the base**"
    lines = ["# Specialist evaluation on the held-out split\n",
             f"Verdict: `{report.final_stage}` {verdict} (required: lower perplexity and higher mcq_accuracy).\n",
             head + "\n".join(rows) + "\n",
             "↓ lower is better, ↑ higher is better, · context only.\n"]
    if counts:
        lines.append("## Items used\n\n| count | " + " | ".join(names) + " |\n|---|" + "---:|" * len(names) + "\n"
                     + "\n".join(counts) + "\n")
    lines.append("## Reasons\n\n" + "\n".join(f"- {r}" for r in report.reasons) + "\n")
    return "\n".join(lines)


def render_plot(report: Report):
    """A matplotlib Figure (Agg, no pyplot global state): one subplot per metric, value by stage."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(report.stages)
    metrics = [m for m, (d, _) in METRICS.items() if d and any(m in report.stages[s] for s in names)]
    fig = Figure(figsize=(3.2 * max(len(metrics), 1), 3.0), layout="constrained")
    FigureCanvasAgg(fig)
    for k, metric in enumerate(metrics):
        ax = fig.add_subplot(1, len(metrics), k + 1)
        xs = [s for s in names if metric in report.stages[s]]
        ax.plot(xs, [report.stages[s][metric] for s in xs], marker="o", label=metric)
        if metric == "mcq_accuracy" and any("mcq_chance" in report.stages[s] for s in xs):
            chance = max(report.stages[s].get("mcq_chance", 0.0) for s in xs)
            ax.axhline(chance, linestyle="--", color="grey", label="chance")
        if metric == "perplexity" and min(report.stages[s][metric] for s in xs) > 0:
            ax.set_yscale("log")
        ax.set_title(f"{metric} {ARROWS[METRICS[metric][0]]}")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{report.final_stage}: {'beats' if report.beats_base else 'does not beat'} the base")
    return fig


def write_report(report: Report, out_dir: Path) -> dict[str, Path]:
    """Write eval.json, eval.md and eval.png atomically into `out_dir`; returns their paths."""
    out_dir = Path(out_dir)
    paths = {"json": out_dir / "eval.json", "md": out_dir / "eval.md", "png": out_dir / "eval.png"}
    buffer = io.BytesIO()
    render_plot(report).savefig(buffer, format="png", dpi=100)
    atomic_write_bytes(paths["png"], buffer.getvalue())
    atomic_write_text(paths["md"], render_markdown(report))
    atomic_write_text(paths["json"], json.dumps(report.to_dict(), indent=2) + "\n")
    return paths


def load_report(path: Path) -> Report:
    """Read an eval.json back (the registry stores the same dict in the record)."""
    return Report.model_validate_json(Path(path).read_text(encoding="utf-8"))
