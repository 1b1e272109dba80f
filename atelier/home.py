"""Where Atelier keeps its state, and how it writes files that must never be half-written."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

HOME_ENV = "ATELIER_HOME"


def atelier_home() -> Path:
    """The state directory: `$ATELIER_HOME`, else `./.atelier` (created on first use)."""
    home = Path(os.environ.get(HOME_ENV) or ".atelier").expanduser()
    home.mkdir(parents=True, exist_ok=True)
    return home


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a mix.

    Write to a temporary file in the same directory, fsync it, rename it over the target,
    then fsync the directory so the rename itself survives a crash.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
