"""Query text for the lexical leg: words, minus English stopwords."""

from __future__ import annotations

import re
from functools import lru_cache

_WORD = re.compile(r"\w+", re.UNICODE)


@lru_cache(maxsize=1)
def stopwords() -> frozenset[str]:
    from bm25s.stopwords import STOPWORDS_EN

    return frozenset(STOPWORDS_EN)


def query_terms(query: str) -> list[str]:
    """Distinct lower-cased words of `query` without stopwords (all words if only stopwords)."""
    words = list(dict.fromkeys(w.lower() for w in _WORD.findall(query)))
    kept = [w for w in words if w not in stopwords()]
    return kept or words


def fts5_match(query: str) -> str | None:
    """An FTS5 MATCH expression OR-ing the query's terms, each quoted (no FTS syntax injection)."""
    terms = query_terms(query)
    if not terms:
        return None
    return " OR ".join('"' + t.replace('"', '""') + '"' for t in terms)
