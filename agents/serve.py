"""`atelier serve`: the OpenAI-compatible API (and the browser chat page) over HTTP.

Wire it into the `atelier` command with `register_serve(app)`.
"""

from __future__ import annotations

from pathlib import Path

import typer

from agents.cli import MODEL_HELP


def serve(
    host: str | None = typer.Option(None, "--host", help="Interface to listen on (default 127.0.0.1); "
                                       "anything but loopback needs an API key (ATELIER_API_KEYS)."),
    port: int | None = typer.Option(None, "--port", help="TCP port (default 8000)."),
    config_file: Path | None = typer.Option(None, "--config", help="YAML file with a ServeConfig "  # noqa: B008
                                               "(host, port, api_keys, limits, orchestrator: {...})."),
    model: str | None = typer.Option(None, "--model", help=MODEL_HELP),
) -> None:
    """Serve the orchestrator and the specialists as an OpenAI-compatible API (/v1/chat/completions)."""
    import logging

    from agents.api import ServeConfig, check_exposure, create_app
    from atelier.config import load_config

    config = load_config(ServeConfig, config_file, {"host": host, "port": port, "orchestrator.model.name": model})
    keys = check_exposure(config)  # before loading anything: a bad key or a refused bind fails fast
    import uvicorn

    logging.getLogger("agents.llm").setLevel(logging.WARNING)
    app = create_app(config)
    auth = (f"API key required ({len(keys)} key{'s' if len(keys) != 1 else ''})" if keys
            else "no API key (loopback only)")
    typer.echo(f"Atelier API on http://{config.host}:{config.port}/v1 — {auth}; "
               f"{'router-only' if app.state.orchestrator.router_only else 'with orchestrator model'}")
    uvicorn.run(app, host=config.host, port=config.port, log_level="info", timeout_graceful_shutdown=5)


def register_serve(app: typer.Typer) -> None:
    app.command("serve")(serve)
