"""An exam result as a terminal table, a Markdown report and a PNG plot (scores with their intervals)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from atelier.home import atomic_write_bytes, atomic_write_text

PLOTTED = (("mcq_accuracy", "mcq_ci", "MCQ accuracy"), ("exact", "exact_ci", "exact match"),
           ("contains", "contains_ci", "contains answer"), ("f1", "f1_ci", "token F1"))


def _value(value: float | None, ci: list | None = None) -> str:
    if value is None:
        return "—"
    return f"{value:.3f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def table_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows (one per system) shared by the terminal table and the Markdown report."""
    header = ["system", "MCQ acc [95% CI]", "exact", "contains [95% CI]", "token F1", "general ppl", "seconds"]
    rows = []
    for name, s in result["systems"].items():
        ppl = s.get("general_perplexity")
        rows.append([name, _value(s["mcq_accuracy"], s["mcq_ci"]), _value(s["exact"]),
                     _value(s["contains"], s["contains_ci"]), _value(s["f1"]), "—" if ppl is None else f"{ppl:.1f}",
                     f"{sum(s['seconds'].values()):.0f}"])
    return header, rows


def summary_lines(result: dict[str, Any]) -> list[str]:
    """The paired comparison, the flips and the gate, as sentences."""
    lines = []
    pair = result["paired"].get("specialist_vs_base")
    if pair:
        parts = [f"{m} {pair[f'{m}_delta']:+.3f} (p = {pair[f'{m}_p_value']:.3g}, {pair[f'{m}_test']})"
                 for m in ("mcq", "contains", "f1") if f"{m}_delta" in pair]
        lines.append("specialist vs base: " + "; ".join(parts))
    flips = result.get("flips")
    if flips:
        lines.append(f"flips ({flips['metric']}): base right -> specialist wrong: "
                     f"{', '.join(flips['base_right_specialist_wrong']) or 'none'}; base wrong -> specialist right: "
                     f"{', '.join(flips['base_wrong_specialist_right']) or 'none'}")
    gate = result.get("gate")
    if gate:
        word = ("significantly better" if gate["significant"] else
                "accepted with a warning (not significantly better)" if gate["accepted"] else "REFUSED")
        lines.append(f"gate: {word}" + "".join(f"\n  - {r}" for r in gate["reasons"] + gate["warnings"]))
    if result.get("problems"):
        lines.append(f"{len(result['problems'])} exam line(s) skipped: " + "; ".join(result["problems"][:5]))
    return lines


def print_table(result: dict[str, Any], console) -> None:
    from rich.table import Table

    header, rows = table_rows(result)
    table = Table(title=f"{result['exam']}: {result['items']} items ({result['mcq_items']} multiple choice, "
                        f"{result['open_items']} open)")
    for k, column in enumerate(header):
        table.add_column(column, justify="left" if k == 0 else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    for line in summary_lines(result):
        console.print(line)


def render_markdown(result: dict[str, Any]) -> str:
    header, rows = table_rows(result)
    lines = [f"# Exam `{result['exam']}`\n",
             f"{result['items']} items: {result['mcq_items']} multiple choice (length-normalised option "
             f"log-likelihood), {result['open_items']} open questions (greedy answers). Intervals: 95% bootstrap.\n",
             "| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n"
             + "\n".join("| " + " | ".join(r) + " |" for r in rows) + "\n"]
    lines += [f"- {line}" for line in summary_lines(result)]
    if result.get("by_kind"):
        systems = list(result["systems"])
        lines.append("\n## By kind (MCQ accuracy / contains)\n\n| kind | n | " + " | ".join(systems) + " |\n|---|---:|"
                     + "---:|" * len(systems))
        for kind, per in result["by_kind"].items():
            cells = [f"{_value(per[s]['mcq_accuracy'])} / {_value(per[s]['contains'])}" for s in systems]
            lines.append(f"| {kind} | {next(iter(per.values()))['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render_plot(result: dict[str, Any]):
    """One bar group per metric, one bar per system, 95% intervals as error bars (Agg, no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    systems = list(result["systems"])
    metrics = [m for m in PLOTTED if any(result["systems"][s].get(m[0]) is not None for s in systems)]
    fig = Figure(figsize=(2.2 + 1.6 * len(metrics) * max(len(systems), 1) / 3, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(len(systems), 1)
    for k, name in enumerate(systems):
        s = result["systems"][name]
        xs, ys, errs = [], [], [[], []]
        for g, (metric, ci_key, _) in enumerate(metrics):
            if s.get(metric) is None:
                continue
            xs.append(g + (k - (len(systems) - 1) / 2) * width)
            ys.append(s[metric])
            ci = s.get(ci_key) or [s[metric], s[metric]]
            errs[0].append(max(s[metric] - ci[0], 0))
            errs[1].append(max(ci[1] - s[metric], 0))
        ax.bar(xs, ys, width, yerr=errs, capsize=3, label=name)
    ax.set_xticks(range(len(metrics)), [label for _, _, label in metrics])
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title(f"{Path(result['exam']).name}: {result['items']} items, 95% bootstrap intervals")
    return fig


def write_exam_report(result: dict[str, Any], rows: list[dict[str, Any]], out_dir: Path) -> dict[str, Path]:
    """exam.json, exam.md, exam.png and items.jsonl (every system's pick and answer), each written atomically."""
    out_dir = Path(out_dir)
    paths = {"json": out_dir / "exam.json", "md": out_dir / "exam.md", "png": out_dir / "exam.png",
             "items": out_dir / "items.jsonl"}
    buffer = io.BytesIO()
    render_plot(result).savefig(buffer, format="png", dpi=100)
    atomic_write_bytes(paths["png"], buffer.getvalue())
    atomic_write_text(paths["md"], render_markdown(result))
    atomic_write_text(paths["items"], "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    atomic_write_text(paths["json"], json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return paths
