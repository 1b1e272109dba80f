"""What leaves the server: no absolute server paths in bodies, only safe bytes in headers.

A source indexed from /srv/manuals/pumps/hx65.md is shown as the path inside its indexed folder
(its doc_id, `pumps/hx65.md`); other absolute paths become relative to the working directory when
inside it, else their file name. Messages (errors, answers) have ATELIER_HOME, the working
directory and the user's home replaced by names. A header value that came from a client (the
thread id) is sent as is when it is printable ASCII, else percent-encoded UTF-8 (RFC 3986), so
an emoji or a CR/LF can never break the response.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote

_HEADER_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) != "%")


def header_value(text: str) -> str:
    """`text` if it is printable ASCII without surrounding spaces, else its UTF-8 percent-encoding."""
    if text and all(0x20 <= ord(c) < 0x7F for c in text) and text == text.strip():
        return text
    return quote(text, safe=_HEADER_SAFE, errors="backslashreplace")


def _roots() -> list[tuple[str, str]]:
    from atelier.home import atelier_home

    roots = [(str(atelier_home()), "ATELIER_HOME"), (os.getcwd(), "."), (str(Path.home()), "~")]
    return sorted(((p.rstrip("/"), name) for p, name in roots if len(p) > 1), key=lambda r: -len(r[0]))


def redact_paths(text: str) -> str:
    """`text` with ATELIER_HOME, the working directory and the home directory named instead of spelled out."""
    for path, name in _roots():
        text = text.replace(path + "/", name + "/").replace(path, name)
    return text


def public_path(path: str, doc_id: str = "") -> str:
    """A path fit for a client: relative ones (and URLs) as they are; absolute ones shortened."""
    if not path or not os.path.isabs(path):
        return path
    if doc_id and PurePosixPath(path).as_posix().endswith("/" + doc_id.lstrip("/")):
        return doc_id  # the path inside the folder that was indexed
    cwd = os.getcwd()
    if path.startswith(cwd.rstrip("/") + "/"):
        return os.path.relpath(path, cwd)
    return PurePosixPath(path).name


def public_model_name(name: str | None) -> str | None:
    """provider:model with a local model path shortened (llamacpp:/models/x.gguf -> llamacpp:x.gguf)."""
    if not name:
        return name
    provider, sep, model = name.partition(":")
    return f"{provider}{sep}{public_path(model)}" if sep else public_path(name)


def public_sources(sources: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**s, "source": public_path(str(s["source"]), str(s.get("doc_id") or ""))} if s.get("source") else s
            for s in sources]


def public_text(text: str, sources: list[dict[str, Any]]) -> str:
    for s in sources:
        path = str(s.get("source") or "")
        if os.path.isabs(path):
            text = text.replace(path, public_path(path, str(s.get("doc_id") or "")))
    return redact_paths(text)


def public_answer(answer: Any) -> Any:
    """The orchestrator's Answer as a client may see it: paths in its sources and texts shortened."""
    return dataclasses.replace(answer, text=public_text(answer.text, answer.sources),
                               route_output=public_text(getattr(answer, "route_output", "") or "", answer.sources),
                               sources=public_sources(answer.sources),
                               model=public_model_name(getattr(answer, "model", None)))
