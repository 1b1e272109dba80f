"""Where Atelier keeps its state, and how it writes files that must never be half-written."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
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
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def fsync_dir(path: Path) -> None:
    """Make the entries of folder `path` (a rename into it, a new file) survive a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """A folder that appears at `target` complete, or not at all.

    Yields a new hidden folder beside `target` to build in. When the block ends without an
    error, everything in it gets the usual permissions (mkdtemp/mkstemp make 0700/0600, which a
    server running as another user could not read) and is fsynced, an existing `target` is
    renamed aside, the new folder is renamed into place, the parent is fsynced and the old
    folder deleted; on an error the temporary folder is removed and `target` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        yield tmp
        mask = umask()
        for path in sorted([tmp, *tmp.rglob("*")], key=lambda p: len(p.parts), reverse=True):  # deepest first
            path.chmod(path.stat().st_mode & 0o7777 | (0o777 if path.is_dir() else 0o666) & ~mask)
            if path.is_dir():
                fsync_dir(path)
            else:
                with path.open("rb") as handle:
                    os.fsync(handle.fileno())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}") if target.exists() else None
    if old is not None:
        os.rename(target, old)
    os.rename(tmp, target)
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def umask() -> int:
    """The process umask, read without os.umask(), which would briefly change it for every thread."""
    try:
        status = Path("/proc/self/status").read_text(encoding="utf-8")
        return int(re.search(r"^Umask:\s*([0-7]+)", status, re.MULTILINE).group(1), 8)
    except (OSError, AttributeError):
        return 0o022
