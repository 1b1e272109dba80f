"""Opening Atelier's SQLite files (index, memory, feedback, teacher cache): one connect, WAL, forward-only
migrations counted in `PRAGMA user_version` (as simonw/llm's are), one error naming the file and the fix."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

from atelier.errors import AtelierError

Migration = str | Callable[[sqlite3.Connection], None]
"""One schema step: an SQL script, or a function that runs its statements on the connection."""


def connect(
    path: Path | str,
    *,
    what: str,
    fix: str,
    migrations: Sequence[Migration] = (),
    synchronous: Literal["NORMAL", "FULL"] = "NORMAL",
    autocommit: bool = True,
    rows: bool = False,
    timeout: float = 5.0,
    probe: str | None = None,
) -> sqlite3.Connection:
    """A connection to the SQLite file at `path` (created when missing), shareable between threads.

    what / fix:  name the file and the way out in the error ("index", "rebuild it with ...").
    migrations:  run in order from the file's user_version, each in its own transaction; step N leaves N.
    synchronous: NORMAL survives a process crash (with WAL); FULL a power cut too, at an fsync per commit.
    autocommit:  the caller writes BEGIN/COMMIT; False keeps Python's implicit transactions.
    rows / probe: rows as `sqlite3.Row`; a query run once, so a damaged table shows here, not mid-request.
    """
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    try:
        db = sqlite3.connect(
            path, check_same_thread=False, timeout=timeout, **({"isolation_level": None} if autocommit else {})
        )
    except sqlite3.Error as exc:
        raise unusable(path, what, fix, exc) from None
    try:
        if rows:
            db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={synchronous}")
        migrate(db, migrations)
        if probe:
            db.execute(probe).fetchall()
    except sqlite3.DatabaseError as exc:
        db.close()
        raise unusable(path, what, fix, exc) from None
    except BaseException:
        db.close()
        raise
    return db


def connect_read_only(path: Path | str, *, what: str, fix: str) -> sqlite3.Connection:
    """A read-only connection (no file is created, nothing is migrated); a damaged file is an AtelierError."""
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        db.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.DatabaseError as exc:
        raise unusable(path, what, fix, exc) from None
    return db


def migrate(db: sqlite3.Connection, migrations: Sequence[Migration]) -> None:
    """Run the steps after the file's user_version, each with its version bump in one transaction."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    for number, step in enumerate(migrations[version:], start=version + 1):
        try:
            if isinstance(step, str):
                db.executescript(f"BEGIN IMMEDIATE;\n{step}\nPRAGMA user_version={number};\nCOMMIT;")
            else:
                db.execute("BEGIN IMMEDIATE")
                step(db)
                db.execute(f"PRAGMA user_version={number}")
                db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.rollback()
            raise


def unusable(path: Path | str, what: str, fix: str, exc: Exception) -> AtelierError:
    """The one error for an SQLite file that cannot be read: which file, why, what to do."""
    return AtelierError(f"{path} is not a usable {what} ({exc}); {fix}")
