"""One place that keeps credentials out of what Atelier prints: URLs in logs, warnings and errors.

A server URL may carry `user:password@` (OPENAI_BASE_URL, ELASTICSEARCH_URL, OLLAMA_HOST) or a
key in its query string. `redact_url` gives the form fit for a log line; `scrub` removes the
user-info part of every URL inside a free text (an exception message, a log record), and
`RedactingFilter` applies `scrub` to every record a logging handler emits.
"""

from __future__ import annotations

import logging
import re
from urllib.parse import urlsplit, urlunsplit

_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s@]+@")


def redact_url(url: str) -> str:
    """The URL without user:password and query string, fit for a log line."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
    except ValueError:  # a malformed port or bracket: keep only what cannot hold a secret
        return scrub(url.split("?", 1)[0])
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def scrub(text: str) -> str:
    """`text` with the user:password part of every URL in it removed."""
    return _USERINFO.sub(r"\g<scheme>", text)


class RedactingFilter(logging.Filter):
    """A handler filter that scrubs credentials from each record's final message."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = scrub(message)
        if cleaned != message:
            record.msg, record.args = cleaned, ()
        return True


def install(logger: logging.Logger | None = None) -> None:
    """Add the filter to every handler of `logger` (the root logger by default), once."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
