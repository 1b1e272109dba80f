"""The data fence: untrusted text reaches the orchestrator model only inside <data> blocks it cannot leave.

Everything a route returns — passages and their titles, specialist answers, tool results, and
the route outputs of earlier turns replayed from memory — is attacker-reachable (a document's
heading becomes a title; a passage can say "SYSTEM: ignore all previous instructions"). The
system prompt tells the model that <data> content is quoted data; this module makes sure the
content cannot end its block or open a new one:

- in the content, every character that is or normalises (NFKC) to `<` or `>` — the ASCII
  brackets and their full-width, small and other compatibility forms — is written as `&lt;` /
  `&gt;`, so no tag of any case, spacing or spelling can form inside a block;
- the source name goes into a quoted attribute with `&`, `"`, brackets and control characters
  escaped, collapsed to one line and capped in length.

Angle-bracket look-alikes that do not normalise to `<`/`>` (such as `‹` or `〈`) are left alone:
they cannot form a tag the fence's own closing `</data>` could be confused with.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

MAX_SOURCE_CHARS = 200
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")


@lru_cache(maxsize=4096)
def _bracket(char: str) -> str | None:
    folded = unicodedata.normalize("NFKC", char)
    if "<" in folded:
        return "&lt;"
    if ">" in folded:
        return "&gt;"
    return None


def escape_content(text: str) -> str:
    """`text` with every (compatibility form of) `<` and `>` written as an entity."""
    if text.isascii():
        return text.replace("<", "&lt;").replace(">", "&gt;")
    return "".join(_bracket(c) or c for c in text)


def escape_source(name: str) -> str:
    """A source name safe inside `source="..."`: one line, quotes and brackets escaped, capped."""
    line = " ".join(_CONTROL.sub(" ", name).split())
    if len(line) > MAX_SOURCE_CHARS:
        line = line[:MAX_SOURCE_CHARS - 1] + "…"
    return escape_content(line.replace("&", "&amp;").replace('"', "&quot;"))


def wrap_data(name: str, content: str) -> str:
    """Quote untrusted content as one <data> block the content cannot close or nest into."""
    return f'<data source="{escape_source(name)}">\n{escape_content(content)}\n</data>'
