"""`atelier traces`: the local trace store as a table of requests, and one request as a timing waterfall."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import typer

from atelier import tracing

BAR_WIDTH = 40
SHOWN = (
    tracing.ROUTE,
    tracing.CONFIDENCE,
    tracing.FALLBACK,
    tracing.THRESHOLD,
    tracing.INPUT_TOKENS,
    tracing.OUTPUT_TOKENS,
    tracing.SEARCH_HITS,
    tracing.TOOL,
    "http.response.status_code",
)
SHORT = {
    tracing.ROUTE: "route",
    tracing.CONFIDENCE: "conf",
    tracing.FALLBACK: "fallback",
    tracing.THRESHOLD: "threshold",
    tracing.INPUT_TOKENS: "in",
    tracing.OUTPUT_TOKENS: "out",
    tracing.SEARCH_HITS: "hits",
    tracing.TOOL: "tool",
    "http.response.status_code": "status",
}


def when(start_ns: int) -> str:
    return datetime.fromtimestamp(start_ns / 1e9, tz=UTC).strftime("%Y-%m-%d %H:%M:%S")


def summary(root: dict[str, Any]) -> dict[str, Any]:
    a = root["attributes"]
    return {
        "trace_id": root["trace_id"],
        "start": when(root["start_ns"]),
        "name": root["name"],
        "duration_ms": round(root["duration_ms"], 2),
        "route": a.get(tracing.ROUTE),
        "confidence": a.get(tracing.CONFIDENCE),
        "fallback": a.get(tracing.FALLBACK),
        "thread": a.get(tracing.CONVERSATION),
        "input_tokens": a.get(tracing.INPUT_TOKENS),
        "output_tokens": a.get(tracing.OUTPUT_TOKENS),
        "status": root["status"],
    }


def waterfall_rows(spans: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Spans in tree order (children after their parent, by start), with depth and offset from the trace start."""
    children: dict[str | None, list[dict]] = {}
    ids = {s["span_id"] for s in spans}
    for s in spans:
        children.setdefault(s["parent_id"] if s["parent_id"] in ids else None, []).append(s)
    start = min((s["start_ns"] for s in spans), default=0)
    rows: list[dict[str, Any]] = []

    def walk(parent: str | None, depth: int) -> None:
        for s in sorted(children.get(parent, []), key=lambda s: s["start_ns"]):
            rows.append({**s, "depth": depth, "offset_ms": (s["start_ns"] - start) / 1e6})
            walk(s["span_id"], depth + 1)

    walk(None, 0)
    return rows


def _bar(offset: float, duration: float, total: float) -> str:
    scale = BAR_WIDTH / total if total > 0 else 0
    lead = min(int(offset * scale), BAR_WIDTH - 1)
    return " " * lead + "█" * max(1, min(round(duration * scale), BAR_WIDTH - lead))


def print_waterfall(console, spans: list[dict[str, Any]]) -> None:
    from rich.markup import escape
    from rich.table import Table

    rows = waterfall_rows(spans)
    total = max((r["offset_ms"] + r["duration_ms"] for r in rows), default=0.0)
    table = Table(title=f"trace {spans[0]['trace_id']} — {total:.1f} ms", title_justify="left")
    for column, justify in (("span", "left"), ("start ms", "right"), ("ms", "right"), ("", "left"), ("", "left")):
        table.add_column(column, justify=justify, no_wrap=column != "")
    for r in rows:
        details = " ".join(f"{SHORT[k]}={r['attributes'][k]}" for k in SHOWN if k in r["attributes"])
        style = "red" if r["status"] == "ERROR" else None
        table.add_row(
            escape("  " * r["depth"] + r["name"]),
            f"{r['offset_ms']:.1f}",
            f"{r['duration_ms']:.2f}",
            f"[cyan]{_bar(r['offset_ms'], r['duration_ms'], total)}[/cyan]",
            escape(details),
            style=style,
        )
    console.print(table)


def print_list(console, roots: list[dict[str, Any]]) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"{len(roots)} most recent traces")
    for column in ("trace", "start (UTC)", "request", "route", "conf", "ms", "tokens", "thread"):
        table.add_column(column, justify="right" if column in ("conf", "ms", "tokens") else "left")
    for root in roots:
        s = summary(root)
        tokens = "" if s["input_tokens"] is None else f"{s['input_tokens']}/{s['output_tokens']}"
        route = (s["route"] or "") + (" (fallback)" if s["fallback"] else "")
        table.add_row(
            s["trace_id"][:12],
            s["start"],
            escape(s["name"]),
            escape(route),
            "" if s["confidence"] is None else f"{s['confidence']:.2f}",
            f"{s['duration_ms']:.1f}",
            tokens,
            escape(s["thread"] or ""),
        )
    console.print(table)


def wide_console():
    import sys

    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=160)  # piped: wide enough for a row


def traces(
    trace_id: str | None = typer.Argument(
        None, help="Show this trace (its id, or the first 6+ characters) as a timing waterfall."
    ),
    last: int = typer.Option(20, "--last", "-n", min=1, help="List this many of the most recent traces."),
    thread: str | None = typer.Option(None, "--thread", help="Only this conversation (thread id)."),
    route: str | None = typer.Option(
        None,
        "--route",
        help="Only requests answered by this route (search, tool:calculator, specialist:NAME, direct, agent).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the traces (or the trace's spans) as JSON."),
) -> None:
    """List recent request traces from the local store, or show one as a timing waterfall.

    Only one trace matching (or a TRACE_ID given) shows its waterfall: span, start, duration, a bar, and the
    route, confidence, tokens and hits of each span."""
    from atelier.trace_store import TraceStore

    store = TraceStore(tracing.store_path())
    try:
        if trace_id is None:
            roots = store.traces(last=last, thread=thread, route=route)
            if len(roots) != 1:
                if as_json:
                    typer.echo(json.dumps([summary(r) for r in roots], indent=2))
                else:
                    print_list(wide_console(), roots) if roots else typer.echo("no traces match")
                return
            trace_id = roots[0]["trace_id"]
        spans = store.spans(trace_id)
    finally:
        store.close()
    if not spans:
        from atelier.errors import AtelierError

        raise AtelierError(f"no trace {trace_id!r} in {tracing.store_path()}; `atelier traces` lists the recent ones")
    if as_json:
        typer.echo(json.dumps(waterfall_rows(spans), indent=2, default=str))
        return
    print_waterfall(wide_console(), spans)


def register(app: typer.Typer) -> None:
    app.command("traces")(traces)
