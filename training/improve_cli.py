"""`atelier specialist improve NAME`: one improvement round from feedback and pair files (training/improve.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def improve(
    name: Annotated[str, typer.Argument(help="Specialist to improve (its active version is the starting point).")],
    from_feedback: Annotated[
        bool, typer.Option("--from-feedback", help="Use the ratings of this specialist's answers (feedback.sqlite).")
    ] = False,
    pairs: Annotated[
        list[Path] | None,
        typer.Option(
            "--pairs", help='Extra preference pairs: JSONL of {"prompt","chosen","rejected"} (TRL format); repeatable.'
        ),
    ] = None,
    exam: Annotated[
        Path | None,
        typer.Option("--exam", help="An exam the candidate must not be worse on; its questions stay out of training."),
    ] = None,
    since: Annotated[
        str | None, typer.Option("--since", help="Only feedback given on or after this date (YYYY-MM-DD, UTC).")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the pairs that would be trained on; train nothing.")
    ] = False,
    preference: Annotated[str | None, typer.Option("--preference", help="dpo (default), simpo, orpo or kto.")] = None,
    min_pairs: Annotated[
        int | None, typer.Option("--min-pairs", help="Fewest training pairs a round runs on (default 8).")
    ] = None,
    teacher: Annotated[
        str | None,
        typer.Option(
            "--teacher",
            help="Teacher (provider:model, as for `specialist add`) that writes the chosen answer of a "
            "thumbs-down without a correction from the retrieved passages. Default: --config's (teacher, or "
            "teacher_from_specialist: true for the one the specialist was built with); none: passage sentences.",
        ),
    ] = None,
    no_teacher: Annotated[
        bool,
        typer.Option(
            "--no-teacher",
            help="No teacher this round, not even the specialist's own or --config's: a thumbs-down without a "
            "correction gets the best-grounded passage sentence as its chosen answer.",
        ),
    ] = False,
    replay: Annotated[
        float | None,
        typer.Option("--replay", help="Pairs from the specialist's own DPO data mixed in per feedback pair "
                     "(rehearsal against forgetting; default 0)."),
    ] = None,
    config_file: Annotated[
        Path | None, typer.Option("--config", help="YAML file with an ImproveConfig (flags override it).")
    ] = None,
) -> None:
    """Train the next version on feedback (DPO round), activate it only if the regression gate accepts it."""
    from datetime import date

    from atelier.config import load_config
    from atelier.errors import AtelierError
    from training.cli import Display
    from training.improve import ImproveConfig
    from training.improve import improve as run_round

    if since is not None:
        try:
            date.fromisoformat(since[:10])
        except ValueError:
            raise AtelierError(f"--since {since!r} is not a date; use YYYY-MM-DD (e.g. 2026-11-30)") from None
    if teacher is not None and no_teacher:
        raise AtelierError("--teacher and --no-teacher contradict each other; pass one of them")
    overrides = {"dpo.preference": preference, "min_pairs": min_pairs, "teacher.name": teacher, "replay": replay}
    config = load_config(ImproveConfig, config_file, overrides)
    if no_teacher:
        config = config.model_copy(update={"teacher": None, "teacher_from_specialist": False})
    with Display() as display:
        result = run_round(
            name,
            config,
            from_feedback=from_feedback,
            pair_files=list(pairs or []),
            exam=exam,
            since=since,
            dry_run=dry_run,
            hooks=display.hooks(),
        )
    if dry_run:
        _print_pairs(result.pairs)
        return
    _print_verdict(result)


def _print_pairs(pairs) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"would train on {len(pairs.train)} pairs ({len(pairs.heldout)} feedback pairs held out)")
    for column in ("split", "from", "prompt", "chosen", "rejected"):
        table.add_column(column, overflow="fold")
    cut = lambda text: text if len(text) <= 80 else text[:79] + "…"
    for split, rows in (("train", pairs.train), ("heldout", pairs.heldout)):
        for pair in rows:
            table.add_row(
                split, f"{pair.source} ({pair.kind})", cut(pair.question), cut(pair.chosen), cut(pair.rejected)
            )
    console = Console()
    console.print(table)
    if pairs.teacher:
        console.print(f"chosen answers of thumbs-down without a correction: teacher {pairs.teacher}")
    if pairs.rejected:
        console.print("dropped: " + ", ".join(f"{k} {v}" for k, v in sorted(pairs.rejected.items())))


def _print_verdict(result) -> None:
    verdict, record = result.verdict, result.record
    for name, found in verdict.sets.items():
        for test in found.tests.values():
            typer.echo(
                f"  {name}: {test.metric} {test.base:.4g} -> {test.specialist:.4g}"
                + (f" (p = {test.p_value:.3g}, n = {test.n})" if test.p_value is not None else "")
            )
        for metric, items in found.flips_to_wrong.items():
            typer.echo(f"  {name} {metric}: right -> wrong: {', '.join(items) or 'none'}")
        for metric, items in found.flips_to_right.items():
            typer.echo(f"  {name} {metric}: wrong -> right: {', '.join(items) or 'none'}")
    if result.activated:
        typer.echo(
            f"{result.name} v{record.version} (from v{result.parent_version}) is active: the gate accepts it. "
            f"`atelier specialist rollback {result.name}` goes back."
        )
        return
    typer.echo(f"{result.name} v{record.version} is kept as a candidate; v{result.parent_version} stays active:")
    for reason in verdict.reasons:
        typer.echo(f"  - {reason}")


def register(specialist_app: typer.Typer) -> None:
    """`atelier specialist improve` (mounted by the root command, beside `add`)."""
    specialist_app.command("improve")(improve)
