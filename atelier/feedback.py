"""Thumbs up / down on answers, kept with the exchange they rate, for preference training.

One SQLite file, ATELIER_HOME/feedback.sqlite, three tables:

    exchanges  every answer the API gave: completion_id -> thread, model, question, answer, route, owner,
               and the specialist version that answered (specialist routes only)
    feedback   ratings of those answers (several per answer allowed; the newest counts), each with an
               optional comment and, for a thumbs-down, an optional correction ("what it should have said"),
               and the owner (API key name) that gave it
    threads    which API key (owner, agents/auth.py) started each thread; only it may continue it

It lives in the shared kernel because two sides use it: the API writes it (agents/) and
`atelier specialist improve` reads it (training/improve.py), which may not import agents/.

The API records each exchange when it answers, so a rating can later be joined to the exact
question and answer (DPO wants prompt, chosen, rejected). Exchanges, ratings and threads belong
to the key that made them: another key sees none of them. Schema changes are forward-only
migrations numbered by SQLite's `user_version`.

A file SQLite cannot read (corrupt, not a database) does not stop the server: one warning names
it and the fix, and the store runs in memory until restart.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from datetime import UTC, datetime
from pathlib import Path

from atelier.errors import AtelierError
from atelier.home import atelier_home
from atelier.sqlite import connect

MIGRATIONS = [
    """CREATE TABLE exchanges (
           completion_id TEXT PRIMARY KEY, thread_id TEXT NOT NULL, model TEXT NOT NULL,
           question TEXT NOT NULL, answer TEXT NOT NULL, route TEXT NOT NULL, created_at TEXT NOT NULL);
       CREATE TABLE feedback (
           id INTEGER PRIMARY KEY AUTOINCREMENT,
           completion_id TEXT NOT NULL REFERENCES exchanges(completion_id),
           rating TEXT NOT NULL CHECK (rating IN ('up', 'down')), comment TEXT, created_at TEXT NOT NULL);
       CREATE INDEX feedback_completion ON feedback(completion_id);""",
    """ALTER TABLE exchanges ADD COLUMN owner TEXT NOT NULL DEFAULT '';
       CREATE TABLE threads (thread_id TEXT PRIMARY KEY, owner TEXT NOT NULL, created_at TEXT NOT NULL);""",
    """ALTER TABLE exchanges ADD COLUMN specialist_version INTEGER;
       ALTER TABLE feedback ADD COLUMN correction TEXT;
       ALTER TABLE feedback ADD COLUMN owner TEXT NOT NULL DEFAULT '';
       CREATE INDEX exchanges_route ON exchanges(route);""",
]
log = logging.getLogger(__name__)


class UnknownCompletion(AtelierError):
    """The rated completion id was never answered here (or belongs to another thread or key)."""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _connect(path: Path | str) -> sqlite3.Connection:
    """The store's connection (WAL, synchronous=NORMAL: survives a process crash with no fsync per answer);
    a damaged table shows here, not mid-request."""
    return connect(path, what="feedback store", fix=f"move it aside (mv {path} {path}.broken) and restart",
                   migrations=MIGRATIONS, rows=True, probe="SELECT 1 FROM exchanges LIMIT 1")


class FeedbackStore:
    """Exchanges and their ratings; safe to call from any thread."""

    def __init__(self, path: Path | None = None):
        self.path = Path(path) if path is not None else atelier_home() / "feedback.sqlite"
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self.in_memory = False  # the file was unreadable: nothing is kept past a restart
        with self._lock:
            self._open()

    def _open(self) -> sqlite3.Connection:
        """The connection (call with the lock held); opened again after `close()` (an app restarted in-process)."""
        if self._conn is None:
            try:
                self._conn = _connect(self.path)
            except AtelierError as exc:
                log.warning("%s; until then answers, ratings and thread owners are kept in memory", exc)
                self.in_memory = True
                self._conn = _connect(":memory:")
        return self._conn

    def claim_thread(self, thread_id: str, owner: str, *, unowned_ok: bool = True) -> bool:
        """Whether `owner` may use `thread_id`: it owns it, or it is new and now theirs. A thread that exists
        without an owner (`unowned_ok` False: it already has history) is nobody's to claim."""
        with self._lock:
            db = self._open()
            row = db.execute("SELECT owner FROM threads WHERE thread_id = ?", (thread_id,)).fetchone()
            if row is not None:
                return row["owner"] == owner
            if not unowned_ok:
                return False
            db.execute("INSERT OR IGNORE INTO threads VALUES (?, ?, ?)", (thread_id, owner, _now()))
            row = db.execute("SELECT owner FROM threads WHERE thread_id = ?", (thread_id,)).fetchone()
            return row["owner"] == owner

    def thread_owner(self, thread_id: str) -> str | None:
        with self._lock:
            row = self._open().execute("SELECT owner FROM threads WHERE thread_id = ?", (thread_id,)).fetchone()
        return None if row is None else row["owner"]

    def record_exchange(self, completion_id: str, thread_id: str, model: str, question: str, answer: str,
                        route: str, owner: str = "", specialist_version: int | None = None) -> None:
        """Keep one answer; `specialist_version` is the registry version that wrote it (specialist routes)."""
        with self._lock:
            self._open().execute("INSERT OR REPLACE INTO exchanges (completion_id, thread_id, model, question, "
                                 "answer, route, created_at, owner, specialist_version) "
                                 "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                 (completion_id, thread_id, model, question, answer, route, _now(), owner,
                                  specialist_version))

    def add(self, completion_id: str, rating: str, comment: str | None = None, thread_id: str | None = None,
            owner: str = "", correction: str | None = None) -> int:
        """Store a rating of `completion_id`; its id. UnknownCompletion when that answer is not on record
        (for this owner, in this thread). A correction goes with a thumbs-down only (ValueError otherwise)."""
        if correction is not None and (rating != "down" or not correction.strip()):
            raise ValueError("a correction goes with rating 'down' and must not be blank")
        with self._lock:
            row = self._open().execute("SELECT thread_id, owner FROM exchanges WHERE completion_id = ?",
                                       (completion_id,)).fetchone()
            if row is None or row["owner"] != owner or (thread_id is not None and row["thread_id"] != thread_id):
                raise UnknownCompletion(f"no answer with completion_id {completion_id!r}"
                                        f"{'' if thread_id is None else f' in thread {thread_id!r}'}; rate the `id` "
                                        "of a chat.completion this server returned")
            cursor = self._open().execute(
                "INSERT INTO feedback (completion_id, rating, comment, created_at, correction, owner) "
                "VALUES (?, ?, ?, ?, ?, ?)", (completion_id, rating, comment, _now(), correction, owner))
            return int(cursor.lastrowid)

    def list(self, limit: int = 100, owner: str = "") -> list[dict]:
        """The newest ratings of `owner`'s answers first, each with its exchange."""
        with self._lock:
            rows = self._open().execute(
                "SELECT f.id, f.completion_id, e.thread_id, f.rating, f.comment, f.correction, e.question, e.answer, "
                "e.route, e.specialist_version, e.model, f.created_at FROM feedback f JOIN exchanges e "
                "USING (completion_id) WHERE e.owner = ? ORDER BY f.id DESC LIMIT ?", (owner, limit)).fetchall()
        return [dict(row) for row in rows]

    def for_route(self, route: str, since: str | None = None) -> list[dict]:
        """The newest rating of every answer given on `route` (of any owner), oldest first, for training.

        Only exchanges recorded on exactly that route count: feedback on the search route or on
        another specialist never trains this one. `since` is an ISO date or time (UTC); older
        ratings are left out.
        """
        query = ("SELECT f.id, f.completion_id, f.rating, f.comment, f.correction, f.owner, f.created_at, "
                 "e.question, e.answer, e.route, e.specialist_version FROM feedback f JOIN exchanges e "
                 "USING (completion_id) WHERE e.route = ? AND f.id = (SELECT MAX(g.id) FROM feedback g "
                 "WHERE g.completion_id = f.completion_id)")
        args: list = [route]
        if since:
            query += " AND f.created_at >= ?"
            args.append(since)
        with self._lock:
            rows = self._open().execute(query + " ORDER BY f.id", args).fetchall()
        return [dict(row) for row in rows]

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
