"""Thumbs up / down on answers, kept with the exchange they rate, for later preference training.

One SQLite file, ATELIER_HOME/feedback.sqlite, two tables:

    exchanges  every answer the API gave: completion_id -> thread, model, question, answer, route
    feedback   ratings of those answers (several per answer allowed; the newest counts)

The API records each exchange when it answers, so a rating can later be joined to the exact
question and answer (DPO wants prompt, chosen, rejected). Schema changes are forward-only
migrations numbered by SQLite's `user_version`.
"""

from __future__ import annotations

import sqlite3
import threading
from datetime import UTC, datetime
from pathlib import Path

from atelier.errors import AtelierError
from atelier.home import atelier_home

MIGRATIONS = [
    """CREATE TABLE exchanges (
           completion_id TEXT PRIMARY KEY, thread_id TEXT NOT NULL, model TEXT NOT NULL,
           question TEXT NOT NULL, answer TEXT NOT NULL, route TEXT NOT NULL, created_at TEXT NOT NULL);
       CREATE TABLE feedback (
           id INTEGER PRIMARY KEY AUTOINCREMENT,
           completion_id TEXT NOT NULL REFERENCES exchanges(completion_id),
           rating TEXT NOT NULL CHECK (rating IN ('up', 'down')), comment TEXT, created_at TEXT NOT NULL);
       CREATE INDEX feedback_completion ON feedback(completion_id);""",
]


class UnknownCompletion(AtelierError):
    """The rated completion id was never answered here (or belongs to another thread)."""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class FeedbackStore:
    """Exchanges and their ratings; safe to call from any thread."""

    def __init__(self, path: Path | None = None):
        self.path = Path(path) if path is not None else atelier_home() / "feedback.sqlite"
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        with self._lock:
            self._open()

    def _open(self) -> sqlite3.Connection:
        """The connection (call with the lock held); opened again after `close()` (an app restarted in-process)."""
        if self._conn is None:
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")  # with synchronous=NORMAL: survives a process crash, no fsync
            db.execute("PRAGMA synchronous=NORMAL")  # per answer
            version = db.execute("PRAGMA user_version").fetchone()[0]
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                db.executescript(f"BEGIN; {script} PRAGMA user_version={number}; COMMIT;")
            self._conn = db
        return self._conn

    def record_exchange(self, completion_id: str, thread_id: str, model: str, question: str, answer: str,
                        route: str) -> None:
        with self._lock:
            self._open().execute("INSERT OR REPLACE INTO exchanges VALUES (?, ?, ?, ?, ?, ?, ?)",
                             (completion_id, thread_id, model, question, answer, route, _now()))

    def add(self, completion_id: str, rating: str, comment: str | None = None, thread_id: str | None = None) -> int:
        """Store a rating of `completion_id`; its id. UnknownCompletion when that answer is not on record."""
        with self._lock:
            row = self._open().execute("SELECT thread_id FROM exchanges WHERE completion_id = ?",
                                   (completion_id,)).fetchone()
            if row is None or (thread_id is not None and row["thread_id"] != thread_id):
                raise UnknownCompletion(f"no answer with completion_id {completion_id!r}"
                                        f"{'' if thread_id is None else f' in thread {thread_id!r}'}; rate the `id` "
                                        "of a chat.completion this server returned")
            cursor = self._open().execute("INSERT INTO feedback (completion_id, rating, comment, created_at) "
                                      "VALUES (?, ?, ?, ?)", (completion_id, rating, comment, _now()))
            return int(cursor.lastrowid)

    def list(self, limit: int = 100) -> list[dict]:
        """The newest ratings first, each with its exchange."""
        with self._lock:
            rows = self._open().execute(
                "SELECT f.id, f.completion_id, e.thread_id, f.rating, f.comment, e.question, e.answer, e.route, "
                "e.model, f.created_at FROM feedback f JOIN exchanges e USING (completion_id) "
                "ORDER BY f.id DESC LIMIT ?", (limit,)).fetchall()
        return [dict(row) for row in rows]

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
