"""A short extractive answer from retrieved passages: the sentences that best answer the question.

No model writes anything: the passages are split into sentences, each sentence is scored by
its embedding's cosine with the question's (the search index's own encoder) plus a BM25 score
of the question's terms over the sentences, and the best one to three come back, each with the
`[n]` of the passage it came from. A sentence is kept beyond the first only when it scores
close to the best, so a clear answer stays one line.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass

_SENTENCE = re.compile(r"(?<=[.!?;])\s+(?=[A-Z0-9(\"'])|\n\s*\n|\n(?=\s*(?:[-*•|#]|\d+[.)]))")
_TERM = re.compile(r"[\w·/.-]+", re.UNICODE)
_STOP = frozenset(["a", "an", "the", "of", "for", "to", "in", "on", "at", "is", "are", "was", "be", "what", "which", "how", "who", "when", "where", "why", "do", "does", "did", "i", "it", "its", "this", "that", "with", "and", "or", "by", "from", "as", "can", "should"])


@dataclass(frozen=True)
class Sentence:
    n: int  # the passage's citation number
    text: str
    score: float = 0.0


def split_sentences(text: str) -> list[str]:
    """Sentences, list items and table rows of a passage, whitespace collapsed, markup trimmed."""
    pieces = []
    for piece in _SENTENCE.split(text):
        piece = " ".join(piece.split()).strip(" |#*-•")
        if len(piece) >= 12 and any(ch.isalpha() for ch in piece):
            pieces.append(piece)
    return pieces


def terms(text: str) -> list[str]:
    return [t.strip(".-/").lower() for t in _TERM.findall(text) if t.strip(".-/").lower() not in _STOP]


def bm25(query: list[str], docs: list[list[str]], k1: float = 1.2, b: float = 0.75) -> list[float]:
    if not docs:
        return []
    avg = sum(len(d) for d in docs) / len(docs) or 1.0
    df = Counter(t for d in docs for t in set(d))
    scores = []
    for doc in docs:
        tf = Counter(doc)
        score = 0.0
        for t in set(query):
            if tf[t]:
                idf = math.log(1 + (len(docs) - df[t] + 0.5) / (df[t] + 0.5))
                score += idf * tf[t] * (k1 + 1) / (tf[t] + k1 * (1 - b + b * len(doc) / avg))
        scores.append(score)
    return scores


def best_sentences(question: str, sources: list[dict], encoder=None, *, most: int = 3,
                   within: float = 0.85) -> list[Sentence]:
    """The one to `most` sentences of `sources` (dicts with "n" and "text") that best answer `question`."""
    candidates = [(s["n"], text) for s in sources for text in split_sentences(s.get("text") or "")]
    if not candidates:
        return []
    lexical = bm25(terms(question), [terms(text) for _, text in candidates])
    top = max(lexical) or 1.0
    lexical = [x / top for x in lexical]
    if encoder is not None:
        vectors = encoder.encode([question] + [text for _, text in candidates])
        semantic = [float(v) for v in vectors[1:] @ vectors[0]]
    else:
        semantic = [0.0] * len(candidates)
    # a passage ranked higher by the search gets a small prior: ties go to the better hit
    prior = [0.05 / n for n, _ in candidates]
    scored = sorted((Sentence(n, text, 0.5 * lex + 0.5 * sem + p)
                     for (n, text), lex, sem, p in zip(candidates, lexical, semantic, prior)),
                    key=lambda s: -s.score)
    best = scored[0].score
    chosen = [s for s in scored[:most] if s.score >= within * best]
    return chosen


def extractive_answer(question: str, sources: list[dict], encoder=None) -> str:
    """One line per chosen sentence, each ending in its [n] citation; empty when nothing fits."""
    return "\n".join(f"{s.text} [{s.n}]" for s in best_sentences(question, sources, encoder))
