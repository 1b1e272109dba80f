"""Domain keywords: the words and multi-word terms that make a corpus *this* domain.

A keyword is a term the corpus uses far more often than general English does. The
background is `wordfreq` (offline word frequencies for English), so no reference corpus
has to ship. Two things are scored the same way:

* single words, by the log-odds ratio of corpus vs. background frequency with an
  informative Dirichlet prior (Monroe, Colaresi & Quinn 2008, "Fightin' Words"), turned
  into a z-score. The prior strength is proportional to the corpus size, so a word needs
  both a large frequency ratio *and* enough occurrences: "impeller" wins, "section" (used
  a lot, but only a few times more than in general English) does not;
* multi-word terms (2-4 words that neither start nor end with a common English word, so
  they look like noun phrases: "mechanical seal", "net positive suction head"), by the same
  z-score against wordfreq's phrase frequency (an upper bound of the real one, hence a
  conservative score), on a C-value count: occurrences inside a longer term are not
  counted again for the shorter one ("positive suction head" inside "net positive
  suction head"), and longer terms get the C-value's log2 length bonus.

Numbers, and unit symbols found next to numbers ("mm", "bar", "rpm"), break terms and are
never keywords. Plural and singular forms are merged ("bearings" counts as "bearing").
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache

from retrieval.documents import Document

_WORD = re.compile(r"[A-Za-z][A-Za-z0-9'’\-]*[A-Za-z0-9]|[A-Za-z]|\d[\d.,]*")
# Punctuation that ends a term; a term never spans a comma, a bracket or a table cell.
_BREAK = re.compile(r"[.,;:!?()\[\]{}|\"“”/=+*#_<>]|\n|\s[-–—]\s")
_NUMBER_THEN_WORD = re.compile(r"\d[ \u00a0]?([A-Za-z][A-Za-z]{0,3})\b")
_INNER_WORDS = frozenset({"of"})  # allowed inside a term: "direction of rotation"
_EXTRA_GENERAL = frozenset({"per", "via", "etc", "e", "g", "i.e", "e.g", "also", "whether", "either"})
_BACKGROUND_FLOOR = 1e-8  # frequency given to words wordfreq has never seen (zipf 1)


@dataclass(frozen=True, slots=True)
class Keyword:
    """A ranked domain term: its display form, its keyness score and its corpus count."""

    term: str
    score: float
    count: int

    @property
    def n_words(self) -> int:
        return self.term.count(" ") + 1


@lru_cache(maxsize=4)
def general_words(language: str = "en", n: int = 250) -> frozenset[str]:
    """The most frequent words of general English: never a keyword, never a term's edge.

    Taken from wordfreq rather than a hand-made stoplist, so that words like "which",
    "also" or "must" are covered along with the usual function words.
    """
    import wordfreq

    words = {w for w in wordfreq.top_n_list(language, n) if not any(c.isdigit() for c in w)}
    return frozenset(words | _EXTRA_GENERAL)


def background_frequency(term: str, language: str = "en") -> float:
    """How often general English uses `term` (a word or a phrase), floored above zero."""
    import wordfreq

    return max(wordfreq.word_frequency(term, language), _BACKGROUND_FLOOR)


def _text_of(doc: Document | str) -> str:
    return doc if isinstance(doc, str) else doc.text


def _unit_symbols(texts: list[str]) -> frozenset[str]:
    """Short tokens that mostly follow a number ("mm", "bar", "kW"): units, not terms."""
    after_number: Counter[str] = Counter()
    total: Counter[str] = Counter()
    for text in texts:
        after_number.update(m.group(1).lower() for m in _NUMBER_THEN_WORD.finditer(text))
        total.update(t.lower() for t in _WORD.findall(text) if len(t) <= 4)
    return frozenset(w for w, c in after_number.items() if c >= 0.5 * total[w])


def _runs(text: str, units: frozenset[str]) -> Iterator[list[str]]:
    """Runs of surface-form words between punctuation, numbers and unit symbols."""
    for segment in _BREAK.split(text):
        run: list[str] = []
        for token in _WORD.findall(segment):
            if any(c.isdigit() for c in token) or token.lower() in units:
                if run:
                    yield run
                run = []
            else:
                run.append(token)
        if run:
            yield run


def _is_candidate(words: list[str], general: frozenset[str]) -> bool:
    if words[0] in general or words[-1] in general:
        return False
    if len(words) == 1:
        return len(words[0]) > 2
    return all(w not in general or w in _INNER_WORDS for w in words[1:-1])


def _count_terms(texts: list[str], max_words: int) -> tuple[Counter[str], dict[str, Counter[str]], int]:
    """Candidate term counts (lower-cased), their surface forms, and the corpus size in words."""
    general, units = general_words(), _unit_symbols(texts)
    counts: Counter[str] = Counter()
    surfaces: dict[str, Counter[str]] = defaultdict(Counter)
    n_words = 0
    for text in texts:
        for run in _runs(text, units):
            lowered = [w.lower() for w in run]
            n_words += len(run)
            for i in range(len(run)):
                for n in range(1, max_words + 1):
                    words = lowered[i:i + n]
                    if len(words) < n:
                        break
                    if _is_candidate(words, general):
                        term = " ".join(words)
                        counts[term] += 1
                        surfaces[term][" ".join(run[i:i + n])] += 1
    return counts, surfaces, n_words


def _singular(term: str, counts: Counter[str]) -> str:
    """The singular form of `term` when the corpus also uses it ("seals" -> "seal")."""
    for suffix, replacement in (("ies", "y"), ("es", ""), ("s", "")):
        if term.endswith(suffix) and not term.endswith("ss"):
            stem = term[: -len(suffix)] + replacement
            if stem in counts:
                return stem
    return term


def _merge_plurals(counts: Counter[str], surfaces: dict[str, Counter[str]]) -> None:
    for term in sorted(counts, key=len, reverse=True):
        target = _singular(term, counts)
        if target != term:
            counts[target] += counts.pop(term)
            surfaces[target].update(surfaces.pop(term))


def _nested_counts(counts: Counter[str], min_count: int) -> dict[str, float]:
    """C-value counts: a term's frequency minus the mean frequency of longer terms holding it."""
    kept = {t: c for t, c in counts.items() if c >= min_count}
    holders: dict[str, list[int]] = defaultdict(list)
    for term, count in kept.items():
        words = term.split()
        for n in range(1, len(words)):
            for i in range(len(words) - n + 1):
                inner = " ".join(words[i:i + n])
                if inner in kept:
                    holders[inner].append(count)
    return {t: c - (sum(holders[t]) / len(holders[t]) if holders[t] else 0.0) for t, c in kept.items()}


def log_odds_z(count: float, corpus_size: int, background: float, prior_strength: float) -> float:
    """Log-odds ratio (corpus vs. background) with an informative Dirichlet prior, as a z-score."""
    prior = prior_strength * background
    delta = math.log((count + prior) / (corpus_size + prior_strength - count - prior))
    delta -= math.log(background / (1.0 - background))
    return delta / math.sqrt(1.0 / (count + prior))


def _display(term: str, surfaces: Counter[str]) -> str:
    """Lower case, except words the corpus writes with inner capitals (acronyms: "NPSH", "NPSHr")."""
    surface = surfaces.most_common(1)[0][0].split() if surfaces else term.split()
    words = term.split()
    if len(surface) != len(words):
        return term
    return " ".join(s if any(c.isupper() for c in s[1:]) else w for s, w in zip(surface, words))


def extract_keywords(docs: Iterable[Document | str], top_k: int = 200, *, max_words: int = 4,
                     min_count: int = 2, prior_scale: float = 2.0, language: str = "en") -> list[Keyword]:
    """The `top_k` most distinctive single words and multi-word terms of `docs`, best first.

    `prior_scale` sets the prior strength as a multiple of the corpus size: larger values
    favour rare-in-English words over frequent ones.
    """
    texts = [_text_of(d) for d in docs]
    counts, surfaces, corpus_size = _count_terms(texts, max_words)
    if corpus_size == 0:
        return []
    _merge_plurals(counts, surfaces)
    prior_strength = prior_scale * corpus_size
    ranked = []
    for term, effective in _nested_counts(counts, min_count).items():
        if effective < min_count or (term.count(" ") >= 2 and counts[term] <= min_count):
            continue  # a long term seen only twice is more often a phrase than a term
        z = log_odds_z(effective, corpus_size, background_frequency(term, language), prior_strength)
        if z <= 0:
            continue
        score = z * math.log2(term.count(" ") + 2)  # C-value's length weight, 1 for a single word
        ranked.append(Keyword(_display(term, surfaces[term]), round(score, 3), counts[term]))
    ranked.sort(key=lambda k: (-k.score, k.term))
    return ranked[:top_k]
