"""The verdict on a specialist: its metrics stage by stage against the base, as JSON, Markdown and a plot.

`compare` is a pure function over metric dicts, so the rule that gates registration can be
tested without a model. The rule is statistical (`eval.gate`): on the required metrics
(perplexity and multiple-choice accuracy by default) the final stage is refused only when a
paired test finds it significantly worse than the base, and accepted with a warning when it is
not significantly better. Metric dicts may carry per-item `outcomes` (see
`eval.specialist.evaluate_loaded`); without them a metric is reported as untested.
matplotlib is imported only when the plot is drawn.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from atelier.home import atomic_write_bytes, atomic_write_text
from atelier.reports import METRICS, EvalReport
from eval.gate import GateConfig, paired_test, verdict

OUTCOMES = "outcomes"  # the per-item key of a metrics dict; never stored in EvalReport.stages
COUNTS = ("perplexity_tokens", "perplexity_windows", "mcq_items", "generation_items", "preference_items")
ARROWS = {"lower": "↓", "higher": "↑", None: ""}


def _judge(metric: str, base: dict, final: dict, final_stage: str) -> tuple[bool | None, str]:
    """(improved?, a sentence) for one metric; None when either side did not measure it."""
    direction, label = METRICS[metric]
    if metric not in base or metric not in final:
        return None, f"{metric}: not measured for {'base' if metric not in base else final_stage} (no held-out data, or left out to fit the --budget)"
    b, f = base[metric], final[metric]
    better = f < b if direction == "lower" else f > b
    word = "better" if better else ("unchanged" if f == b else "worse")
    return better, f"{metric} ({label}, {ARROWS[direction]}): {final_stage} {f:.4g} vs base {b:.4g} — {word}"


def _without_outcomes(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != OUTCOMES}


def compare(base: dict[str, Any], stages: dict[str, dict[str, Any]], gate: GateConfig | None = None) -> EvalReport:
    """Is the last stage accepted against the base? The statistical rule of `eval.gate` on `gate.required`.

    `stages` is in pipeline order (e.g. dapt, sft, dpo); the last one is the specialist. Other
    metrics are reported as reasons but do not decide: generation metrics on a few dozen items
    are too noisy to gate on, and DPO may trade some of them for preference accuracy.
    """
    if not stages:
        raise ValueError("compare needs at least one trained stage besides the base")
    gate = gate or GateConfig()
    final_stage = list(stages)[-1]
    final = stages[final_stage]
    reasons = []
    for metric, (direction, _) in METRICS.items():
        if direction is None:
            continue
        _, sentence = _judge(metric, base, final, final_stage)
        reasons.append(sentence + (" (required)" if metric in gate.required else ""))
    tests = {}
    for metric in gate.required:
        direction = METRICS.get(metric, ("higher", ""))[0] or "higher"
        tests[metric] = paired_test(metric, direction, (base.get(OUTCOMES) or {}).get(metric),
                                    (final.get(OUTCOMES) or {}).get(metric), gate,
                                    base_value=base.get(metric), specialist_value=final.get(metric))
    decision = verdict(tests, list(gate.required))
    needs = " and ".join(gate.required)
    if not decision.accepted:
        head = f"{final_stage} is refused: significantly worse than the base, or not measured, on {needs}"
    elif decision.significant:
        head = f"{final_stage} beats the base: significantly better on {needs}"
    else:
        head = f"{final_stage} is accepted with a warning: not significantly better than the base on {needs}"
    reasons = [head, *[f"{t.sentence()} (gate)" for t in tests.values()], *reasons]
    return EvalReport(stages={"base": _without_outcomes(base), **{k: _without_outcomes(v) for k, v in stages.items()}},
                  final_stage=final_stage, beats_base=decision.significant, reasons=reasons,
                  accepted=decision.accepted, warnings=decision.warnings + decision.reasons,
                  gate={"config": gate.model_dump(mode="json"), **decision.to_dict()})


# ----------------------------------------------------------------------------- rendering


def _cell(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def render_markdown(report: EvalReport) -> str:
    """A table of metrics (rows) by stage (columns), the items used, and the verdict with its reasons."""
    names = list(report.stages)
    head = "| metric | better | " + " | ".join(names) + " |\n|---|:-:|" + "---:|" * len(names) + "\n"
    rows = [f"| {m} | {ARROWS[d] or '·'} | " + " | ".join(_cell(report.stages[s].get(m)) for s in names) + " |"
            for m, (d, _) in METRICS.items() if any(m in report.stages[s] for s in names)]
    counts = [f"| {c} | " + " | ".join(_cell(report.stages[s].get(c)) for s in names) + " |"
              for c in COUNTS if any(c in report.stages[s] for s in names)]
    verdict = {"beats": "**beats the base**", "accepted": "**is accepted, but does not significantly beat the base**",
               "refused": "**is refused**"}[report.verdict]
    lines = ["# Specialist evaluation on the held-out split\n",
             f"Verdict: `{report.final_stage}` {verdict}.\n",
             head + "\n".join(rows) + "\n",
             "↓ lower is better, ↑ higher is better, · context only.\n"]
    if report.gate.get("tests"):
        lines.append("## Gate: paired tests against the base\n\n| metric | base [CI] | specialist [CI] | delta [CI] "
                     "| p | test | n | outcome |\n|---|---:|---:|---:|---:|---|---:|---|\n" + "\n".join(
                         _test_row(t) for t in report.gate["tests"].values()) + "\n")
    if report.warnings:
        lines.append("## Warnings\n\n" + "\n".join(f"- {w}" for w in report.warnings) + "\n")
    if counts:
        lines.append("## Items used\n\n| count | " + " | ".join(names) + " |\n|---|" + "---:|" * len(names) + "\n"
                     + "\n".join(counts) + "\n")
    lines.append("## Reasons\n\n" + "\n".join(f"- {r}" for r in report.reasons) + "\n")
    return "\n".join(lines)


def _test_row(test: dict) -> str:
    num = lambda v: "—" if v is None else f"{v:.4g}"
    ci = lambda v: "" if not v else f" [{v[0]:.3g}, {v[1]:.3g}]"
    return (f"| {test['metric']} | {num(test.get('base'))}{ci(test.get('base_ci'))} | "
            f"{num(test.get('specialist'))}{ci(test.get('specialist_ci'))} | {num(test.get('delta'))}"
            f"{ci(test.get('delta_ci'))} | {num(test.get('p_value'))} | {test.get('test') or '—'} | "
            f"{test.get('n', 0)} | {test['outcome']} |")


def render_plot(report: EvalReport):
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
    word = {"beats": "beats", "accepted": "accepted, not significantly better than", "refused": "does not beat"}[
        report.verdict]
    fig.suptitle(f"{report.final_stage}: {word} the base")
    return fig


def write_report(report: EvalReport, out_dir: Path) -> dict[str, Path]:
    """Write eval.json, eval.md and eval.png atomically into `out_dir`; returns their paths."""
    out_dir = Path(out_dir)
    paths = {"json": out_dir / "eval.json", "md": out_dir / "eval.md", "png": out_dir / "eval.png"}
    buffer = io.BytesIO()
    render_plot(report).savefig(buffer, format="png", dpi=100)
    atomic_write_bytes(paths["png"], buffer.getvalue())
    atomic_write_text(paths["md"], render_markdown(report))
    atomic_write_text(paths["json"], json.dumps(report.to_dict(), indent=2) + "\n")
    return paths
