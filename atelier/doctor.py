"""`atelier doctor`: check everything under ATELIER_HOME and say what to repair.

Each check reads only (SQLite files are opened read-only) and reports one line per problem with
the file and the fix. The orchestrator itself skips what cannot be read, with one warning; the
doctor is where those warnings lead.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import asdict, dataclass
from pathlib import Path

import typer

from atelier.errors import AtelierError


@dataclass(frozen=True)
class Finding:
    area: str  # "specialists" | "indexes" | "memory" | "feedback"
    path: str
    ok: bool
    message: str


def check_sqlite(path: Path, area: str, fix: str) -> Finding:
    """An SQLite file that opens read-only and passes `PRAGMA quick_check`."""
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            result = [row[0] for row in db.execute("PRAGMA quick_check").fetchall()]
        finally:
            db.close()
    except sqlite3.Error as exc:
        return Finding(area, str(path), False, f"cannot be read ({exc}); {fix}")
    if result != ["ok"]:
        return Finding(area, str(path), False, f"is damaged ({'; '.join(result[:3])}); {fix}")
    return Finding(area, str(path), True, "ok")


def check_specialists(home: Path) -> list[Finding]:
    """Every version of every specialist: its record reads and its weights match the recorded hash."""
    from specialists.registry import Registry, check_adapter_files, check_model_files

    registry = Registry(home)
    findings = []
    for name in registry.names():
        try:
            active = registry.current_version(name)
            versions = registry.versions(name)
        except AtelierError as exc:
            findings.append(Finding("specialists", str(registry.root / name), False, str(exc)))
            continue
        for version in versions:
            folder = registry.root / name / f"v{version}"
            try:
                record = registry.get(name, version)
                (check_model_files if record.full_model else check_adapter_files)(record)
            except AtelierError as exc:
                findings.append(Finding("specialists", str(folder), False, str(exc)))
                continue
            label = f"{name} v{version}" + (" (active)" if version == active else "")
            findings.append(Finding("specialists", str(folder), True, f"{label}: record and weights ok"))
    return findings


def check_indexes(home: Path) -> list[Finding]:
    from retrieval.embedded import read_summary

    findings = []
    for path in sorted((home / "indexes").glob("*/index.sqlite")):
        fix = f"rebuild it: delete {path.parent} and run `atelier index DIR --index {path.parent.name}`"
        finding = check_sqlite(path, "indexes", fix)
        if finding.ok:
            try:
                summary = read_summary(path)
            except AtelierError as exc:
                finding = Finding("indexes", str(path), False, str(exc))
            else:
                documents = len(summary.documents) if summary else 0
                chunks = len(summary.chunk_texts) if summary else 0
                finding = Finding("indexes", str(path), True, f"{documents} documents, {chunks} chunks")
        findings.append(finding)
    return findings


def run_checks(home: Path) -> list[Finding]:
    findings = check_specialists(home) + check_indexes(home)
    for name, area in (("memory.sqlite", "memory"), ("feedback.sqlite", "feedback")):
        path = home / name
        if path.exists():
            what = "conversation memory" if area == "memory" else "the stored ratings"
            findings.append(check_sqlite(path, area, f"move it aside (this loses {what}); a new one is "
                                                      "created on the next request"))
    return findings


def doctor(as_json: bool = typer.Option(False, "--json", help="Print every finding as JSON.")) -> None:
    """Check ATELIER_HOME: every specialist record and its weights' hash, the search indexes, memory and feedback."""
    from atelier.home import atelier_home

    home = atelier_home()
    findings = run_checks(home)
    problems = [f for f in findings if not f.ok]
    if as_json:
        typer.echo(json.dumps({"home": str(home), "ok": not problems, "findings": [asdict(f) for f in findings]},
                              indent=2))
    else:
        typer.echo(f"checked {home}: {len(findings)} item(s), {len(problems)} problem(s)")
        for finding in findings:
            mark = "ok     " if finding.ok else "PROBLEM"
            typer.echo(f"  {mark} {finding.area:<11} {finding.message if finding.ok else finding.path}")
            if not finding.ok:
                typer.echo(f"          {finding.message}")
    if problems:
        raise typer.Exit(1)
