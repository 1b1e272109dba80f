"""`atelier ask` (one question) and `atelier chat` (a conversation in the terminal)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from agents.config import OrchestratorConfig
from atelier.config import config_file_option, config_option

CONFIG_FILE = config_file_option(OrchestratorConfig, "orchestrator")


def _orchestrator(config_file: Path | None, model: str | None, index: str | None):
    import logging

    from agents.orchestrator import Orchestrator
    from atelier.config import load_config

    logging.getLogger("agents.llm").setLevel(logging.WARNING)
    config = load_config(OrchestratorConfig, config_file, {"model.name": model, "retrieval.index": index})
    return Orchestrator(config)


def _new_thread() -> str:
    import uuid

    return f"cli-{uuid.uuid4().hex[:12]}"


def _route_line(event: dict) -> str:
    return f"[dim]→ {event['route']} (confidence {event['confidence']:.2f})[/dim]"


def _sources(console, sources: list[dict]) -> None:
    from rich.markup import escape

    for s in sources:
        console.print(f"[dim]  [{s['n']}] {escape(s['title'] or s['doc_id'])} — {escape(s['source'])} "
                      f"chars {s['start']}-{s['end']}[/dim]")


def ask(
    question: str = typer.Argument(..., help="The question."),
    as_json: bool = typer.Option(False, "--json", help="Print answer, route, confidence and sources as JSON."),
    thread: str | None = typer.Option(None, "--thread", help="Continue this conversation (memory across calls); "
                                         "default: a new conversation for each question."),
    model: str | None = config_option(OrchestratorConfig, "model.name", "--model"),
    index: str | None = config_option(OrchestratorConfig, "retrieval.index", "--index"),
    config_file: Path | None = CONFIG_FILE,
) -> None:
    """Ask one question: routed to a specialist, the documents, a tool, or the orchestrator model."""
    from rich.console import Console
    from rich.markup import escape

    orchestrator = _orchestrator(config_file, model, index)
    try:
        answer = orchestrator.ask(question, thread_id=thread or _new_thread())
    finally:
        orchestrator.close()
    if as_json:
        typer.echo(json.dumps(answer.to_dict(), indent=2, default=str))
        return
    console = Console()
    console.print(_route_line({"route": answer.route, "confidence": answer.confidence}))
    console.print(escape(answer.text))
    if answer.route != "search":  # search answers list their passages already
        _sources(console, answer.sources)


def chat(
    thread: str | None = typer.Option(None, "--thread", help="Continue this conversation; default: a new one "
                                         "(its id is shown at the start)."),
    model: str | None = config_option(OrchestratorConfig, "model.name", "--model"),
    index: str | None = config_option(OrchestratorConfig, "retrieval.index", "--index"),
    config_file: Path | None = CONFIG_FILE,
) -> None:
    """Chat in the terminal. Each answer shows which route answered and its sources. /reset, /exit."""
    from rich.console import Console
    from rich.markup import escape

    console = Console()
    orchestrator = _orchestrator(config_file, model, index)
    thread = thread or _new_thread()
    mode = "router-only (no orchestrator model)" if orchestrator.router_only else f"model {orchestrator.model_name}"
    console.print(f"[bold]Atelier chat[/bold] — thread {thread!r}, {mode}. /reset forgets, /exit leaves.")
    try:
        while True:
            try:
                question = console.input("[bold cyan]you>[/bold cyan] ").strip()
            except EOFError:
                break
            if not question:
                continue
            if question in ("/exit", "/quit"):
                break
            if question == "/reset":
                orchestrator.reset(thread)
                console.print("[dim]conversation forgotten[/dim]")
                continue
            _answer_streamed(console, orchestrator, question, thread, escape)
    finally:
        orchestrator.close()


def _answer_streamed(console, orchestrator, question: str, thread: str, escape) -> None:
    for event in orchestrator.stream(question, thread_id=thread):
        if event["type"] == "route":
            console.print(_route_line(event))
        elif event["type"] == "token":
            console.print(escape(event["text"]), end="")
        elif event["type"] == "done":
            console.print()
            if event["answer"].route != "search":
                _sources(console, event["answer"].sources)


def register(app: typer.Typer) -> None:
    app.command("ask")(ask)
    app.command("chat")(chat)
