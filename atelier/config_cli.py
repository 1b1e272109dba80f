"""`atelier config show specialist|serve|index|orchestrator`: a config's defaults as commented YAML.

The files under examples/configs/ are this command's output, and a test keeps them equal to it.
"""

from __future__ import annotations

from enum import Enum

import typer
from pydantic import BaseModel

from agents.config import OrchestratorConfig, ServeConfig
from retrieval.config import RetrievalConfig
from training.config import SpecialistConfig

config_app = typer.Typer(help="The configs behind --config FILE: print their defaults.", no_args_is_help=True)


class ConfigKind(str, Enum):
    specialist = "specialist"
    serve = "serve"
    index = "index"
    orchestrator = "orchestrator"


# kind -> (the config, the commands whose --config takes it)
KINDS: dict[ConfigKind, tuple[type[BaseModel], str]] = {
    ConfigKind.specialist: (SpecialistConfig, "atelier specialist add NAME --docs DIR"),
    ConfigKind.serve: (ServeConfig, "atelier serve"),
    ConfigKind.index: (RetrievalConfig, "atelier index DIR, atelier search, atelier eval retrieval"),
    ConfigKind.orchestrator: (OrchestratorConfig, "atelier ask, atelier chat"),
}


def config_class(kind: ConfigKind) -> type[BaseModel]:
    return KINDS[ConfigKind(kind)][0]


def default_config_yaml(kind: ConfigKind) -> str:
    """The defaults of `kind` as YAML with every field's description above it (what `show` prints)."""
    from atelier.config import config_yaml, load_config

    kind = ConfigKind(kind)
    cls = config_class(kind)
    summary = (cls.__doc__ or "").strip().splitlines()[0]
    header = (
        f"{cls.__name__}: {summary}\n"
        f"Defaults, as `atelier config show {kind.value}` prints them. Use a copy with `--config FILE` on:\n"
        f"  {KINDS[kind][1]}\n"
        "Unknown keys are errors; leave out what you do not change; options given on the command line win."
    )
    return config_yaml(load_config(cls), header)  # a bad $ELASTICSEARCH_URL is a one-line error


KIND = typer.Argument(..., help="Which config: specialist, serve, index or orchestrator.")


@config_app.command("show")
def show(kind: ConfigKind = KIND) -> None:
    """Print a config's defaults as YAML, each field's description as a comment above it."""
    typer.echo(default_config_yaml(kind), nl=False)
