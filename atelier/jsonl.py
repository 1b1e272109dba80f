"""Reading JSON Lines files: one parse loop, one error message naming the file and line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from atelier.errors import AtelierError


def iter_jsonl(path: Path, *, fix: str) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for each non-blank line; a bad line is an AtelierError ending in `fix`."""
    with Path(path).open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as exc:
                raise AtelierError(f"{path}:{number} is not valid JSON ({exc.msg}); {fix}") from None
