"""The one SQLite connection helper: pragmas, forward-only migrations, damaged files (real SQLite files)."""

from __future__ import annotations

import sqlite3

import pytest

from atelier.errors import AtelierError
from atelier.sqlite import connect, connect_read_only

STEPS = [
    "CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT NOT NULL);",
    lambda db: db.execute("ALTER TABLE notes ADD COLUMN kind TEXT NOT NULL DEFAULT 'plain'"),
]


def test_migrations_run_once_in_order_and_count_in_user_version(tmp_path):
    path = tmp_path / "a.sqlite"
    db = connect(path, what="store", fix="delete it", migrations=STEPS[:1], rows=True)
    db.execute("INSERT INTO notes (text) VALUES ('kept')")
    assert db.execute("PRAGMA user_version").fetchone()[0] == 1
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()
    db = connect(path, what="store", fix="delete it", migrations=STEPS, rows=True, synchronous="FULL")
    row = db.execute("SELECT text, kind FROM notes").fetchone()
    assert (row["text"], row["kind"]) == ("kept", "plain")  # step 1 did not run again; step 2 did
    assert db.execute("PRAGMA user_version").fetchone()[0] == 2
    assert db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    db.close()


def test_a_failing_migration_leaves_the_file_at_its_last_good_version(tmp_path):
    path = tmp_path / "a.sqlite"
    connect(path, what="store", fix="delete it", migrations=STEPS[:1]).close()

    def broken(db):
        db.execute("ALTER TABLE notes ADD COLUMN half TEXT")
        raise sqlite3.OperationalError("boom")

    with pytest.raises(AtelierError, match="is not a usable store .*boom.*; delete it"):
        connect(path, what="store", fix="delete it", migrations=[*STEPS[:1], broken])
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == 1
    assert "half" not in [c[1] for c in db.execute("PRAGMA table_info(notes)")]  # rolled back


def test_a_damaged_file_is_one_clear_error(tmp_path):
    path = tmp_path / "bad.sqlite"
    path.write_bytes(b"\x00garbage" * 512)
    for opener in (connect, connect_read_only):
        with pytest.raises(AtelierError, match=r"bad.sqlite is not a usable store \(.*\); move it aside"):
            opener(path, what="store", fix="move it aside")
    assert path.read_bytes() == b"\x00garbage" * 512  # nothing written over it


def test_read_only_refuses_writes(tmp_path):
    path = tmp_path / "a.sqlite"
    connect(path, what="store", fix="delete it", migrations=STEPS[:1]).close()
    db = connect_read_only(path, what="store", fix="delete it")
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        db.execute("INSERT INTO notes (text) VALUES ('no')")
