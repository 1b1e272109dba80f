"""`atelier serve`: the OpenAI-compatible API (and the browser chat page) over HTTP.

Wire it into the `atelier` command with `register_serve(app)`.
"""

from __future__ import annotations

from pathlib import Path

import typer

from agents.config import ServeConfig
from atelier.config import config_file_option, config_option

CONFIG_FILE = config_file_option(ServeConfig, "serve")


def serve(
    host: str | None = config_option(ServeConfig, "host", "--host"),
    port: int | None = config_option(ServeConfig, "port", "--port"),
    config_file: Path | None = CONFIG_FILE,
    model: str | None = config_option(ServeConfig, "orchestrator.model.name", "--model"),
) -> None:
    """Serve the orchestrator and the specialists as an OpenAI-compatible API (/v1/chat/completions)."""
    import logging

    from agents.api import check_exposure, create_app
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
