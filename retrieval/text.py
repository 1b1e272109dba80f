"""Text analysis for the lexical (BM25) leg: the same on the index side and the query side.

Words are lower-cased, English stopwords dropped and the rest stemmed with the Snowball
English stemmer, exactly as bm25s (the reference BM25 of our benchmark) tokenizes.
"""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def _stemmer():
    import Stemmer

    return Stemmer.Stemmer("english")


def analyze(texts: list[str]) -> list[list[str]]:
    """Each text as its list of BM25 terms."""
    import bm25s

    if not texts:
        return []
    return bm25s.tokenize(texts, lower=True, stopwords="en", stemmer=_stemmer(), return_ids=False,
                          show_progress=False)
