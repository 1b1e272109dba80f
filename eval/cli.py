"""`atelier eval ...`: measure retrieval (and later routing and specialists)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

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
    index_name: Optional[str] = typer.Option(None, "--index", help="Index to build/reuse (default: beir-<folder name>)."),
    backend: Optional[str] = config_option(RetrievalConfig, "backend", "--backend", "-b"),
    config_file: Optional[Path] = config_file_option(RetrievalConfig, "index"),  # noqa: B008
    max_queries: Optional[int] = typer.Option(None, "--max-queries", min=1, help="Score only the first N queries."),
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
    config_file: Optional[Path] = config_file_option(RouterConfig),
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
    show = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    table.add_row(show(result["accuracy"]), show(result["accuracy_with_fallback"]), show(result["accuracy_drop"]),
                  show(result["oos_recall"]),
                  f"{result['latency_ms_p50']:.2f}", f"{result['latency_ms_p95']:.2f}",
                  f"{result['embedding_ms_p50']:.2f}", f"{result['fit_s']:.1f}")
    Console().print(table)


@eval_app.command("specialist")
def specialist(
    name: str = typer.Argument(..., help="A registered specialist."),
    exam: Optional[Path] = typer.Option(None, "--exam", help="JSONL exam: question, answer, aliases?, options?, "
                                        "correct? (0-based), kind?, id?. Default: the specialist's held-out split."),
    against: list[str] = typer.Option([], "--against", help="Another model on the same items (repeatable): a base "
                                      "name (gemma3-270m), a Hugging Face folder or id, a .gguf file, or a served "
                                      "ollama:/openai:/llamacpp: model (open questions only)."),
    rag: bool = typer.Option(False, "--rag", help="Add `search` (the retrieved passages as the answer) and "
                             "`specialist+search` (the passages in the specialist's prompt)."),
    docs: Optional[Path] = typer.Option(None, "--docs", help="With --rag: index this folder (into eval-<folder>) "
                                        "and search it; default: the existing search index."),
    general: Optional[Path] = typer.Option(None, "--general", help="Text or JSONL file of general text: "
                                           "perplexity of every local model on it, to show forgetting."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write exam.json, exam.md, exam.png and items.jsonl here."),
    config_file: Optional[Path] = config_file_option(SpecialistEvalConfig),
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
