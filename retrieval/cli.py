"""`atelier index` and `atelier search`."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from atelier.config import config_file_option, config_option
from atelier.errors import AtelierError
from retrieval.config import RetrievalConfig

# `--model` named the embedding model here but the chat model in ask/chat/serve: it is now --embedding-model
DEPRECATED_MODEL = typer.Option(None, "--model", hidden=True, help="Deprecated: use --embedding-model.")
CONFIG_FILE = config_file_option(RetrievalConfig, "index")


def _config(config_file: Path | None, command: str, embedding_model: str | None, model: str | None,
            **overrides):
    from atelier.config import load_config

    if model is not None:
        from atelier.progress import stderr

        stderr.print(f"[yellow]warning:[/yellow] `atelier {command} --model` is deprecated and will be removed in "
                     "the next release; use --embedding-model", soft_wrap=True)
        if embedding_model is not None and embedding_model != model:
            raise AtelierError("--model and --embedding-model name different embedding models; pass only "
                               "--embedding-model")
    return load_config(RetrievalConfig, config_file, {**overrides, "embedding.model": embedding_model or model})


def index(
    folder: Path | None = typer.Argument(None, help="Folder of .txt, .md, .html, .pdf and .jsonl documents."),
    backend: str | None = config_option(RetrievalConfig, "backend", "--backend", "-b"),
    index_name: str | None = config_option(RetrievalConfig, "index", "--index"),
    embedding_model: str | None = config_option(RetrievalConfig, "embedding.model", "--embedding-model"),
    model: str | None = DEPRECATED_MODEL,
    config_file: Path | None = CONFIG_FILE,
    prune: bool = typer.Option(True, help="Remove documents indexed from FOLDER that no longer exist there."),
    delete: list[str] = typer.Option([], "--delete", help="Remove this document id from the index (repeatable)."),
    follow_symlinks: bool | None = config_option(RetrievalConfig, "documents.follow_symlinks",
                                                    "--follow-symlinks/--no-follow-symlinks"),
    max_file_mb: float | None = config_option(RetrievalConfig, "documents.max_file_mb", "--max-file-mb"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Index a folder of documents (incremental: unchanged documents are skipped)."""
    from retrieval.config import index_lock, index_with_progress, open_backend
    from retrieval.documents import load_folder
    from retrieval.embeddings import get_encoder

    if folder is None and not delete:
        raise AtelierError("give a folder to index (`atelier index DIR`) or --delete ID")
    config = _config(config_file, "index", embedding_model, model, backend=backend, index=index_name, **{
        "documents.follow_symlinks": follow_symlinks, "documents.max_file_mb": max_file_mb})
    with index_lock(config):
        if folder is None:  # deletions only: no need for the encoder
            store = open_backend(config, dim=None, create=False) if config.backend.value == "embedded" else \
                open_backend(config, dim=get_encoder(config.embedding).dim)
            removed = store.delete(delete)
            typer.echo(f"removed {removed} of {len(delete)} document(s) from index {config.index!r}")
            return
        loaded = load_folder(folder, config.documents)
        _print_skipped(loaded.skipped)
        if not loaded.documents:
            raise AtelierError(f"no readable documents in {folder}; add .txt, .md, .html, .pdf or .jsonl files")
        encoder = get_encoder(config.embedding)
        store = open_backend(config, dim=encoder.dim)
        try:
            if delete:
                store.delete(delete)
            report = index_with_progress(loaded.documents, store, encoder, config, root=str(folder.resolve()),
                                         prune=prune, show=not quiet)
            report.skipped = loaded.skipped
            stats = store.stats()
        finally:
            store.close()
    typer.echo(f"index {config.index!r} ({stats['backend']}): {report.summary()}; "
               f"now {stats['documents']} documents, {stats['chunks']} chunks")
    if report.skipped:
        typer.echo(report.skip_summary())


def _print_skipped(skipped, limit: int = 20) -> None:
    """One stderr line per skipped file, up to `limit` (the summary line counts them all)."""
    from rich.markup import escape

    from atelier.progress import stderr

    for skip in skipped[:limit]:
        stderr.print(f"[yellow]skipped[/yellow] {escape(skip.path)}: {escape(skip.reason)}", soft_wrap=True)
    if len(skipped) > limit:
        stderr.print(f"[yellow]skipped[/yellow] {len(skipped) - limit} more (counted in the summary)")


def search(
    query: str = typer.Argument(..., help="What to search for."),
    k: int = typer.Option(10, "-k", min=1, max=1000, help="How many hits."),
    mode: str = typer.Option("hybrid", "--mode", "-m", help="hybrid, bm25 or dense."),
    as_json: bool = typer.Option(False, "--json", help="Print hits as JSON."),
    backend: str | None = config_option(RetrievalConfig, "backend", "--backend", "-b"),
    index_name: str | None = config_option(RetrievalConfig, "index", "--index"),
    embedding_model: str | None = config_option(RetrievalConfig, "embedding.model", "--embedding-model"),
    model: str | None = DEPRECATED_MODEL,
    config_file: Path | None = CONFIG_FILE,
) -> None:
    """Search the index: ranked hits with source, score and snippet."""
    from retrieval.config import Searcher
    from retrieval.types import Mode

    try:
        mode_ = Mode(mode)
    except ValueError:
        raise AtelierError(f"unknown --mode {mode!r}; use hybrid, bm25 or dense") from None
    config = _config(config_file, "search", embedding_model, model, backend=backend, index=index_name)
    searcher = Searcher.open(config, lexical_only=mode_ is Mode.bm25)
    try:
        hits = searcher.search(query, k=k, mode=mode_)
    finally:
        searcher.close()
    if as_json:
        typer.echo(json.dumps({"query": query, "mode": mode_.value, "hits": [h.to_dict() for h in hits]}, indent=2))
        return
    _print_hits(hits)


def _print_hits(hits) -> None:
    from rich.console import Console
    from rich.markup import escape

    console = Console()
    if not hits:
        console.print("no hits")
        return
    for hit in hits:
        legs = " ".join(f"{leg}={value:.3f}" for leg, value in hit.scores.items())
        console.print(f"[bold]{hit.rank}.[/bold] {escape(hit.title or hit.doc_id)}  [dim]{escape(hit.source)} "
                      f"chars {hit.start}-{hit.end}  score {hit.score:.4f} ({legs})[/dim]")
        snippet = " ".join(hit.text.split())
        console.print(f"   {escape(snippet[:300])}{'…' if len(snippet) > 300 else ''}")


def register(app: typer.Typer) -> None:
    app.command("index")(index)
    app.command("search")(search)
