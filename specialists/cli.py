"""`atelier specialist ...`: list, show, activate, roll back and remove registered specialists.

Only the registry (pydantic + JSON files) is imported here: torch stays out of `atelier --help`.
The root CLI mounts `specialist_app` under the name `specialist`.
"""

from __future__ import annotations

import json
from typing import Any

import typer

specialist_app = typer.Typer(help="Specialist models: add, improve, list, show, activate, roll back, remove.",
                             no_args_is_help=True)


def _registry():
    from specialists.registry import Registry

    return Registry()


# `atelier specialist add NAME --docs DIR ...` is defined by the training pipeline
# (training/) and registered on this same app: `specialist_app.command("add")(add)`.


def _final_metrics(record) -> dict[str, Any]:
    """The active version's key held-out metrics, base -> final stage, from its eval report."""
    return record.eval_report.headline() if record.eval_report else {}


def _metric_cell(before: float | None, after: float | None) -> str:
    fmt = lambda v: "—" if v is None else f"{v:.3g}"
    return f"{fmt(before)} → {fmt(after)}"


@specialist_app.command("list")
def list_specialists(as_json: bool = typer.Option(False, "--json", help="Print the active records as JSON.")) -> None:
    """Registered specialists with their active version, base model and key held-out metrics."""
    registry = _registry()
    records, problems = registry.scan()
    for problem in problems:
        typer.echo(f"warning: {problem}", err=True)
    if as_json:
        typer.echo(json.dumps([r.model_dump(mode="json") for r in records], indent=2))
        return
    if not records and not problems:
        typer.echo("no specialists registered yet; add one with `atelier specialist add NAME --docs DIR`")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"specialists in {registry.root}")
    for column in ("name", "version", "base model", "created", "perplexity (base → it)", "MCQ acc (base → it)"):
        table.add_column(column)
    for record in records:
        metrics = _final_metrics(record)
        versions = registry.versions(record.name)
        table.add_row(record.name, f"v{record.version} of {len(versions)}" + (" (forced)" if record.forced else ""),
                      record.base_model, record.created_at.replace("T", " ")[:16],
                      _metric_cell(*metrics.get("perplexity", (None, None))),
                      _metric_cell(*metrics.get("mcq_accuracy", (None, None))))
    Console().print(table)


@specialist_app.command("show")
def show(
    name: str = typer.Argument(..., help="Specialist name."),
    version: int | None = typer.Option(None, "--version", min=1, help="A version other than the active one."),
    as_json: bool = typer.Option(False, "--json", help="Print the whole record, eval report included, as JSON."),
    candidates: bool = typer.Option(False, "--candidates", help="List the versions kept as candidates (refused by "
                                    "the regression gate of `specialist improve`) with the reasons."),
) -> None:
    """One specialist's record: where its adapter lives, what it knows, how it scored."""
    registry = _registry()
    if candidates:
        _show_candidates(registry, name, as_json)
        return
    record = registry.get(name, version)
    if as_json:
        typer.echo(record.model_dump_json(indent=2))
        return
    active = registry.current_version(name)
    typer.echo(f"{record.name} v{record.version}{' (active)' if record.version == active else ''}"
               f" of versions {', '.join(map(str, registry.versions(name)))}")
    typer.echo(f"  {record.description}")
    typer.echo(f"  base model:  {record.base_model}")
    typer.echo(f"  {'model' if record.full_model else 'adapter'}:     {record.model_path or record.adapter_path}")
    typer.echo(f"  created:     {record.created_at}{'  (registered with --force)' if record.forced else ''}")
    if record.served_by:
        typer.echo(f"  served by:   {record.served_by}")
    if record.parent_version is not None:
        lineage = record.lineage
        typer.echo(f"  improved from v{record.parent_version}: {len(lineage.get('feedback_ids', []))} feedback "
                   f"item(s), {len(lineage.get('pair_files', {}))} pair file(s), "
                   f"{(lineage.get('pairs') or {}).get('train', 0)} training pairs")
    for reason in record.eval_report.reasons if record.eval_report else []:
        typer.echo(f"  - {reason}")


def _show_candidates(registry, name: str, as_json: bool) -> None:
    """The refused versions of `name`, each with its parent, the gate's reasons and its flips."""
    records = [registry.get(name, v) for v in registry.candidates(name)]
    if as_json:
        typer.echo(json.dumps([r.model_dump(mode="json") for r in records], indent=2))
        return
    if not records:
        typer.echo(f"{name} has no candidates (every improvement round so far was accepted, or none ran)")
        return
    for record in records:
        typer.echo(f"{name} v{record.version} (candidate, from v{record.parent_version}, {record.created_at})")
        for reason in record.candidate_reasons:
            typer.echo(f"  - {reason}")
        for set_name, found in ((record.lineage.get("gate") or {}).get("sets") or {}).items():
            for metric, items in (found.get("flips_to_wrong") or {}).items():
                typer.echo(f"  {set_name} {metric} right -> wrong: {', '.join(items) or 'none'}")


@specialist_app.command("remove")
def remove(
    name: str = typer.Argument(..., help="Specialist to delete, all versions."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
) -> None:
    """Delete a specialist and every version of it."""
    registry = _registry()
    versions = registry.versions(name)  # also fails clearly on an unknown name
    if not yes and not typer.confirm(f"remove specialist {name!r} and its {len(versions)} version(s)?"):
        typer.echo("nothing removed")
        raise typer.Exit(1)
    registry.remove(name)
    typer.echo(f"removed specialist {name!r}")


@specialist_app.command("rollback")
def rollback(name: str = typer.Argument(..., help="Specialist whose previous version becomes active.")) -> None:
    """Make the previous version active again (the newer one is kept, `show --version` still finds it)."""
    registry = _registry()
    before = registry.current_version(name)
    record = registry.rollback(name)
    typer.echo(f"{name}: active version v{before} -> v{record.version}")


@specialist_app.command("activate")
def activate(
    name: str = typer.Argument(..., help="Specialist to switch."),
    version: int = typer.Argument(..., min=1, help="The version to make active (`specialist show NAME` lists them)."),
    force: bool = typer.Option(False, "--force", help="Activate a candidate the regression gate refused."),
) -> None:
    """Make one version active: a newer one after a rollback, or a refused candidate with --force."""
    registry = _registry()
    before = registry.current_version(name)
    record = registry.activate(name, version, force=force)
    typer.echo(f"{name}: active version v{before} -> v{record.version}" + (" (a refused candidate)" if record.candidate else ""))


def register(app: typer.Typer) -> None:
    """Mount the group on the root CLI as `atelier specialist ...`."""
    app.add_typer(specialist_app, name="specialist")
