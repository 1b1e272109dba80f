"""`atelier eval ...`: measure retrieval (and later routing and specialists)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import typer

from agents.router import RouterConfig
from atelier.config import config_file_option, config_option
from atelier.errors import AtelierError
from eval.specialist import SpecialistEvalConfig
from retrieval.config import RetrievalConfig

eval_app = typer.Typer(help="Measure quality and latency.", no_args_is_help=True)


@eval_app.command("retrieval")
def retrieval(
    beir: Path = typer.Option(..., "--beir", help="BEIR folder: corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv."),
    split: str = typer.Option("test", "--split", help="Which qrels/SPLIT.tsv to score."),
    mode: list[str] = typer.Option([], "--mode", "-m", help="hybrid, bm25, dense (repeatable; default all three)."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
    index_name: str | None = typer.Option(None, "--index", help="Index to build/reuse (default: beir-<folder name>)."),
    backend: str | None = config_option(RetrievalConfig, "backend", "--backend", "-b"),
    config_file: Path | None = config_file_option(RetrievalConfig, "index"),
    max_queries: int | None = typer.Option(None, "--max-queries", min=1, help="Score only the first N queries."),
) -> None:
    """nDCG@10, Recall@100, MRR@10 and latency p50/p95 for each search mode."""
    from atelier.config import load_config
    from atelier.progress import progress_bar, stderr
    from eval.beir import load_beir
    from eval.retrieval import evaluate_mode
    from retrieval.config import Searcher, index_with_progress, open_backend
    from retrieval.embeddings import get_encoder
    from retrieval.types import Mode

    try:
        modes = [Mode(m) for m in (mode or ["hybrid", "bm25", "dense"])]
    except ValueError as exc:
        raise AtelierError(f"{exc}; --mode takes hybrid, bm25 or dense") from None
    data = load_beir(beir, split)
    if max_queries:
        data.queries = dict(list(data.queries.items())[:max_queries])
        data.qrels = {q: data.qrels[q] for q in data.queries}
    name = index_name or "beir-" + (re.sub(r"[^a-z0-9_.-]+", "-", beir.resolve().name.lower()).strip("-.") or "data")
    config = load_config(RetrievalConfig, config_file, {"index": name, "backend": backend})
    encoder = get_encoder(config.embedding)
    store = open_backend(config, dim=encoder.dim)
    index_with_progress(data.corpus, store, encoder, config, show=not as_json, description="indexing the corpus")
    searcher = Searcher(store, encoder, config.embedding)
    results = {}
    try:
        for m in modes:
            with progress_bar(f"{m.value:6} queries", total=len(data.queries), enabled=not as_json) as advance:
                results[m.value] = evaluate_mode(searcher, data, m, progress=advance)
    finally:
        searcher.close()
    if as_json:
        typer.echo(json.dumps(results, indent=2))
        return
    _table(results, f"{beir.name} / {split}: {len(data.queries)} queries, {len(data.corpus)} documents", stderr)


def _table(results: dict, title: str, console) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in ("mode", "nDCG@10", "Recall@100", "MRR@10", "p50 ms", "p95 ms"):
        table.add_column(column, justify="right" if column != "mode" else "left")
    for mode, r in results.items():
        table.add_row(mode, f"{r['ndcg@10']:.4f}", f"{r['recall@100']:.4f}", f"{r['mrr@10']:.4f}",
                      f"{r['latency_ms_p50']:.1f}", f"{r['latency_ms_p95']:.1f}")
    Console().print(table)


@eval_app.command("routing")
def routing(
    routes: Path = typer.Option(..., "--routes", help="JSONL of {\"text\", \"label\"}: exemplars of each route."),
    queries: Path = typer.Option(..., "--queries", help="JSONL of {\"text\", \"label\"}; label null = out of scope."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
    config_file: Path | None = config_file_option(RouterConfig),
) -> None:
    """In-scope accuracy, out-of-scope recall and routing latency p50/p95 of the semantic router."""
    from rich.console import Console
    from rich.table import Table

    from atelier.config import load_config
    from atelier.progress import progress_bar
    from eval.routing import evaluate_routing, read_labelled

    config = load_config(RouterConfig, config_file)
    read_labelled(routes, "--routes")  # user mistakes surface before the encoder loads
    total = len(read_labelled(queries, "--queries"))
    with progress_bar("routing queries", total=total, enabled=not as_json) as advance:
        result = evaluate_routing(routes, queries, config, progress=advance)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    table = Table(title=f"routing: {result['n_queries']} queries ({result['n_oos']} out of scope), "
                        f"{result['n_routes']} routes, {result['n_exemplars']} exemplars")
    for column in ("accuracy", "with fallback", "drop", "OOS recall", "p50 ms", "p95 ms", "embedding p50 ms", "fit s"):
        table.add_column(column, justify="right")
    show = lambda v: "-" if v is None else f"{v:.4f}"
    table.add_row(show(result["accuracy"]), show(result["accuracy_with_fallback"]), show(result["accuracy_drop"]),
                  show(result["oos_recall"]),
                  f"{result['latency_ms_p50']:.2f}", f"{result['latency_ms_p95']:.2f}",
                  f"{result['embedding_ms_p50']:.2f}", f"{result['fit_s']:.1f}")
    Console().print(table)


@eval_app.command("specialist")
def specialist(
    name: str = typer.Argument(..., help="A registered specialist."),
    exam: Path | None = typer.Option(None, "--exam", help="JSONL exam: question, answer, aliases?, options?, "
                                        "correct? (0-based), kind?, id?. Default: the specialist's held-out split."),
    against: list[str] = typer.Option([], "--against", help="Another model on the same items (repeatable): a base "
                                      "name (gemma3-270m), a Hugging Face folder or id, a .gguf file, or a served "
                                      "ollama:/openai:/llamacpp: model (open questions only)."),
    rag: bool = typer.Option(False, "--rag", help="Add `search` (the retrieved passages as the answer) and "
                             "`specialist+search` (the passages in the specialist's prompt)."),
    docs: Path | None = typer.Option(None, "--docs", help="With --rag: index this folder (into eval-<folder>) "
                                        "and search it; default: the existing search index."),
    general: Path | None = typer.Option(None, "--general", help="Text or JSONL file of general text: "
                                           "perplexity of every local model on it, to show forgetting."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
    out: Path | None = typer.Option(None, "--out", help="Write exam.json, exam.md, exam.png and items.jsonl here."),
    config_file: Path | None = config_file_option(SpecialistEvalConfig),
) -> None:
    """A specialist on an exam, side by side with its base and other models, with 95% intervals,
    a paired test against the base and the questions that flipped."""
    from atelier.config import load_config
    from atelier.progress import stderr
    from eval.exam_report import print_table, write_exam_report
    from eval.side_by_side import evaluate_specialist

    config = load_config(SpecialistEvalConfig, config_file)
    status = None if as_json else (lambda text: stderr.print(f"[dim]{text}[/dim]"))
    result, rows = evaluate_specialist(name, exam=exam, against=against, rag=rag, docs=docs, general=general,
                                       config=config, status=status)
    if out is not None:
        paths = write_exam_report(result, rows, out)
        result["report"] = {k: str(v) for k, v in paths.items()}
    if as_json:
        typer.echo(json.dumps(result, indent=2, ensure_ascii=False))
        return
    from rich.console import Console

    print_table(result, Console())
    if out is not None:
        stderr.print(f"report: {out / 'exam.md'}")


@eval_app.command("drift")
def drift(
    since: str | None = typer.Option(None, "--since", help="Traces from this date or time on (ISO 8601, UTC "
                                        "unless it says otherwise, e.g. 2026-11-30 or 2026-11-30T12:00); default: "
                                        "since the router was fitted."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    min_requests: int = typer.Option(5, "--min-requests", min=1, help="Requests a route needs before it can be "
                                     "flagged."),
    clusters: int = typer.Option(5, "--clusters", min=1, help="Most fallback-question clusters listed."),
) -> None:
    """Routing drift: live confidence per route (from the trace store) against the router's out-of-fold
    confidence at fit time; routes whose traffic now falls mostly below the confident level are flagged, and the
    questions that fell back are clustered as candidates for a new specialist or more exemplars."""
    from atelier import tracing
    from atelier.home import atelier_home
    from eval.drift import drift_report

    report = drift_report(tracing.store_path(), atelier_home() / "router", since_ns=_since_ns(since),
                          min_requests=min_requests, clusters=clusters)
    if as_json:
        typer.echo(json.dumps(report, indent=2, ensure_ascii=False))
        return
    _drift_tables(report)


def _since_ns(since: str | None) -> int | None:
    if since is None:
        return None
    from datetime import UTC, datetime

    try:
        moment = datetime.fromisoformat(since.strip())
    except ValueError:
        raise AtelierError(f"--since {since!r} is not a date; write it as 2026-11-30 or 2026-11-30T12:00") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1e9)


def _drift_tables(report: dict) -> None:
    from rich.markup import escape
    from rich.table import Table

    from atelier.trace_view import wide_console

    show = lambda v: "-" if v is None else f"{v:.2f}"
    console = wide_console()
    table = Table(title=f"routing drift: {report['requests']} requests, fallback share {show(report['fallback_share'])}"
                        f" (at fit {show(report['fitted_fallback_share'])}), KS {show(report['ks'])}")
    for column in ("route", "requests", "fallback now", "at fit", "median conf now", "at fit", "KS"):
        table.add_column(column, justify="left" if column == "route" else "right")
    for r in report["routes"]:
        table.add_row(escape(r["route"]) + (" [red]![/red]" if r["flagged"] else ""), str(r["requests"]),
                      show(r["fallback_share"]), show(r["fitted_fallback_share"]), show(r["median_confidence"]),
                      show(r["fitted_median_confidence"]), show(r["ks"]))
    console.print(table)
    for r in (r for r in report["routes"] if r["flagged"]):
        console.print(f"[red]![/red] {escape(r['route'])}: most of its traffic falls below the confident level "
                      f"({r['fallback_share']:.0%} of {r['requests']} requests fell back; {show(r['fitted_fallback_share'])}"
                      " at fit)")
    if not report["questions_recorded"]:
        console.print("[dim]fallback questions were not recorded; set ATELIER_TRACE_CONTENT=on to list them[/dim]")
    for i, c in enumerate(report["fallback_clusters"], start=1):
        console.print(f"[bold]{i}. {c['size']} fallbacks[/bold] ({', '.join(c['keywords'])}) — {c['suggestion']}")
        for example in c["examples"][:3]:
            console.print(f"   [dim]{escape(example)}[/dim]")
