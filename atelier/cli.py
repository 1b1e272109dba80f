"""The `atelier` command: assembles each package's command group and turns `AtelierError`
into a one-line message. Keep imports here light: `atelier --help` must not import torch.
"""

from __future__ import annotations

import logging
import os
import sys

import typer

from atelier import __version__
from atelier.errors import AtelierError

app = typer.Typer(
    name="atelier",
    help="Specialist small language models from your documents, behind one orchestrator agent.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"atelier {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log what happens (to stderr)."),
) -> None:
    from atelier import redact

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    redact.install()  # no user:password of a server URL in any log line


def _assemble() -> None:
    from agents.cli import register as register_agents
    from agents.serve import register_serve
    from atelier.config_cli import config_app
    from atelier.doctor import doctor
    from atelier.trace_view import register as register_traces
    from eval.cli import eval_app
    from retrieval.cli import register as register_retrieval
    from specialists.cli import specialist_app
    from specialists.export.cli import register_export
    from training.cli import register as register_training
    from training.improve_cli import register as register_improve

    app.command("doctor")(doctor)
    register_traces(app)
    app.add_typer(config_app, name="config")
    register_retrieval(app)
    register_agents(app)
    register_serve(app)
    register_training(specialist_app)
    register_improve(specialist_app)
    register_export(specialist_app)
    app.add_typer(specialist_app, name="specialist")
    app.add_typer(eval_app, name="eval")


_assemble()


def main() -> None:
    """Console-script entry point."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app()
    except AtelierError as exc:
        from atelier.redact import scrub

        typer.secho(f"error: {scrub(str(exc))}", err=True, fg="red")
        sys.exit(1)
    except KeyboardInterrupt:
        typer.secho("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
