"""The local trace store: finished spans in ATELIER_HOME/traces.sqlite, newest `keep` traces kept.

`SqliteSpanExporter` is an OpenTelemetry SpanExporter (run by a BatchSpanProcessor, off the request
path); each batch is one transaction, so a crash never leaves half a batch. `TraceStore` reads it back
for `atelier traces` and `atelier eval drift`. The schema moves forward only (PRAGMA user_version).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from atelier.errors import AtelierError
from atelier.sqlite import connect, connect_read_only

log = logging.getLogger(__name__)

FIX = "move it aside; a new one is started with the next request"
MIGRATIONS = [  # forward only (atelier.sqlite.migrate)
    """CREATE TABLE spans (
        trace_id TEXT NOT NULL, span_id TEXT NOT NULL, parent_id TEXT, name TEXT NOT NULL, kind TEXT,
        start_ns INTEGER NOT NULL, end_ns INTEGER NOT NULL, status TEXT, attributes TEXT NOT NULL,
        PRIMARY KEY (trace_id, span_id));
    CREATE INDEX roots ON spans (start_ns) WHERE parent_id IS NULL;
    CREATE INDEX starts ON spans (start_ns);""",
]


def _value(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


class SqliteSpanExporter:
    """Writes finished spans to SQLite and trims the store to the newest `keep` traces (roots). It trims after
    every keep/20 new traces, not every batch, so the store holds at most 5% more than `keep` for a while."""

    def __init__(self, path: Path, keep: int = 10_000):
        self.path, self.keep = Path(path), keep
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._warned = False
        self._roots_since_trim = keep  # the first batch trims what an earlier process left

    def export(self, spans: Sequence[Any]):
        from opentelemetry.sdk.trace.export import SpanExportResult

        rows = [
            (
                f"{s.context.trace_id:032x}",
                f"{s.context.span_id:016x}",
                f"{s.parent.span_id:016x}" if s.parent is not None else None,
                s.name,
                s.kind.name,
                s.start_time or 0,
                s.end_time or 0,
                s.status.status_code.name,
                json.dumps({k: _value(v) for k, v in (s.attributes or {}).items()}, ensure_ascii=False),
            )
            for s in spans
        ]
        try:
            with self._lock:
                if self._db is None:
                    self._db = connect(self.path, what="trace store", fix=FIX, migrations=MIGRATIONS, autocommit=False)
                with self._db:
                    self._db.executemany("INSERT OR REPLACE INTO spans VALUES (?,?,?,?,?,?,?,?,?)", rows)
                    self._roots_since_trim += sum(r[2] is None for r in rows)
                    if self._roots_since_trim >= max(1, self.keep // 20):  # trim in steps: the scan is the cost
                        self._trim()
                        self._roots_since_trim = 0
        except (sqlite3.Error, OSError, AtelierError) as exc:
            if not self._warned:  # one warning, then quiet: a broken store costs traces, never requests
                self._warned = True
                log.warning(
                    "trace store %s cannot be written (%s); traces are dropped. Move the file aside to start a new one",
                    self.path,
                    exc,
                )
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def _trim(self) -> None:
        oldest_kept = self._db.execute(
            "SELECT start_ns FROM spans WHERE parent_id IS NULL ORDER BY start_ns DESC LIMIT 1 OFFSET ?",
            (self.keep - 1,),
        ).fetchone()
        if oldest_kept is not None:
            self._db.execute("DELETE FROM spans WHERE start_ns < ?", (oldest_kept[0],))

    def shutdown(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def _row(row: sqlite3.Row) -> dict[str, Any]:
    out = dict(row)
    out["attributes"] = json.loads(out["attributes"])
    out["duration_ms"] = (out["end_ns"] - out["start_ns"]) / 1e6
    return out


class TraceStore:
    """Reads the local trace store."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise AtelierError(
                f"no trace store at {self.path}; traces are recorded as requests are answered "
                "(`atelier ask`, `atelier chat`, `atelier serve`) unless ATELIER_TRACING=off"
            )
        self.db = connect_read_only(self.path, what="trace store", fix=FIX)
        self.db.row_factory = sqlite3.Row

    def traces(
        self, last: int = 20, thread: str | None = None, route: str | None = None, since_ns: int | None = None
    ) -> list[dict[str, Any]]:
        """Root spans, newest first, filtered by conversation id, route and start time."""
        where, args = ["parent_id IS NULL"], []
        if thread is not None:
            where.append("json_extract(attributes, '$.\"gen_ai.conversation.id\"') = ?")
            args.append(thread)
        if route is not None:
            where.append("json_extract(attributes, '$.\"atelier.route.chosen\"') = ?")
            args.append(route)
        if since_ns is not None:
            where.append("start_ns >= ?")
            args.append(since_ns)
        rows = self.db.execute(
            f"SELECT * FROM spans WHERE {' AND '.join(where)} ORDER BY start_ns DESC LIMIT ?", [*args, last]
        ).fetchall()
        return [_row(r) for r in rows]

    def spans(self, trace_id: str) -> list[dict[str, Any]]:
        """Every span of one trace (an id prefix of at least 6 characters works), in start order."""
        if len(trace_id) < 6:
            raise AtelierError(f"trace id {trace_id!r} is too short; give at least 6 characters of it")
        rows = self.db.execute(
            "SELECT * FROM spans WHERE trace_id LIKE ? ORDER BY start_ns", (trace_id.lower() + "%",)
        ).fetchall()
        ids = {r["trace_id"] for r in rows}
        if len(ids) > 1:
            raise AtelierError(f"trace id {trace_id!r} matches {len(ids)} traces; give more of it")
        return [_row(r) for r in rows]

    def named(self, name: str, since_ns: int | None = None) -> list[dict[str, Any]]:
        """Every span called `name` that ended at or after `since_ns` (the route decisions, for drift), oldest first."""
        rows = self.db.execute(
            "SELECT * FROM spans WHERE name = ? AND end_ns >= ? ORDER BY start_ns", (name, since_ns or 0)
        ).fetchall()
        return [_row(r) for r in rows]

    def close(self) -> None:
        self.db.close()
