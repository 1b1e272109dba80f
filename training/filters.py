"""The example records every generator produces, and the checks they must pass.

Generators (offline extraction, the teacher) write freely; this module decides what is
kept, and counts every drop under a reason so that a run can say *why* it kept so little:

* length bounds, for questions, answers and passages;
* grounding: the share of an answer's content words (no common English words) that occur
  in the text it was drawn from. Offline answers are copied from the document and score
  1.0; a teacher answer that invents facts scores lower and is dropped;
* exact duplicates, by a hash of the normalised text;
* near duplicates, by MinHash over word 3-grams with LSH (datasketch), so that the same
  fact repeated in two manuals is trained on once;
* leakage: a training example that near-duplicates a held-out one is dropped from
  training, so held-out scores measure what was *not* seen.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from retrieval.keywords import general_words

_TOKEN = re.compile(r"[a-z0-9]+(?:[.,'’-][a-z0-9]+)*")
NUM_PERM = 128  # MinHash permutations: LSH works for thresholds up to 0.96
R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class Passage:
    """A piece of domain text for continued pretraining (DAPT)."""

    text: str
    source: str  # the document id
    kind: str = "chunk"  # "chunk" (from the document) or "enriched" (rewritten by the teacher)
    context: str = ""  # for enriched passages: the chunk it was rewritten from


@dataclass(frozen=True, slots=True)
class QAPair:
    """An instruction and its answer, with the text the answer must be grounded in."""

    question: str
    answer: str
    source: str
    kind: str  # definition, procedure, cloze, fact, table, completion, summary, teacher
    context: str
    chunk: int = 0  # index of the chunk it came from, for per-chunk caps


@dataclass(frozen=True, slots=True)
class PreferencePair:
    """A question, a grounded answer (chosen) and a worse one (rejected)."""

    question: str
    chosen: str
    rejected: str
    source: str
    kind: str  # <sft kind>/<how the rejected answer was made>
    context: str
    chunk: int = 0


def normalise(text: str) -> str:
    return " ".join(_TOKEN.findall(text.lower()))


def text_hash(text: str) -> str:
    return hashlib.sha256(normalise(text).encode("utf-8")).hexdigest()


def _stem(token: str) -> str:
    return token[:-1] if len(token) > 3 and token.endswith("s") and not token.endswith("ss") else token


def content_tokens(text: str) -> list[str]:
    """Lower-cased words and numbers of `text`, without common English words, plurals folded."""
    general = general_words()
    return [_stem(t) for t in _TOKEN.findall(text.lower()) if t not in general]


def grounding(answer: str, context: str) -> float:
    """Share of the answer's distinct content tokens that occur in `context` (0.0 if none)."""
    wanted = set(content_tokens(answer))
    if not wanted:
        return 0.0
    return len(wanted & set(content_tokens(context))) / len(wanted)


def length_problem(text: str, low: int, high: int) -> str | None:
    size = len(text.strip())
    return "too_short" if size < low else "too_long" if size > high else None


def _shingles(text: str) -> list[bytes]:
    words = normalise(text).split()
    if len(words) < 3:
        return [" ".join(words).encode("utf-8")]
    return [" ".join(words[i:i + 3]).encode("utf-8") for i in range(len(words) - 2)]


def minhash(text: str):
    from datasketch import MinHash

    signature = MinHash(num_perm=NUM_PERM, seed=1)
    signature.update_batch(_shingles(text))
    return signature


class NearDuplicateIndex:
    """MinHash LSH over texts seen so far: `seen(text)` says whether one is already close.

    LSH only proposes candidates; each is confirmed by its estimated Jaccard similarity,
    so the threshold means what it says.
    """

    def __init__(self, threshold: float):
        from datasketch import MinHashLSH

        self.threshold = threshold
        self._lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
        self._signatures: list = []

    def seen(self, text: str) -> bool:
        signature = minhash(text)
        return any(signature.jaccard(self._signatures[int(key)]) >= self.threshold
                   for key in self._lsh.query(signature))

    def add(self, text: str) -> None:
        signature = minhash(text)
        self._lsh.insert(str(len(self._signatures)), signature)
        self._signatures.append(signature)


def dedupe(items: Iterable[R], key: Callable[[R], str], threshold: float, rejected: Counter[str],
           prefix: str) -> list[R]:
    """Items in order, without exact (`duplicate`) or near (`near_duplicate`) repeats of `key`."""
    hashes: set[str] = set()
    index = NearDuplicateIndex(threshold)
    kept = []
    for item in items:
        text = key(item)
        digest = text_hash(text)
        if digest in hashes:
            rejected[f"{prefix}.duplicate"] += 1
            continue
        if index.seen(text):
            rejected[f"{prefix}.near_duplicate"] += 1
            continue
        hashes.add(digest)
        index.add(text)
        kept.append(item)
    return kept


def drop_overlap(train: Sequence[R], heldout: Sequence[R], key: Callable[[R], str], threshold: float,
                 rejected: Counter[str], prefix: str) -> list[R]:
    """Training items that do not (near-)duplicate any held-out item."""
    index = NearDuplicateIndex(threshold)
    hashes = set()
    for item in heldout:
        index.add(key(item))
        hashes.add(text_hash(key(item)))
    kept = []
    for item in train:
        if text_hash(key(item)) in hashes or index.seen(key(item)):
            rejected[f"{prefix}.overlaps_heldout"] += 1
        else:
            kept.append(item)
    return kept


@dataclass(frozen=True)
class Bounds:
    """The limits `filter_*` apply; built from DataConfig."""

    min_question_chars: int
    max_question_chars: int
    min_answer_chars: int
    max_answer_chars: int
    min_passage_chars: int
    max_passage_chars: int
    grounding_threshold: float
    enrichment_grounding_threshold: float
    near_duplicate_threshold: float


def _qa_problem(question: str, answer: str, context: str, bounds: Bounds) -> str | None:
    problem = length_problem(question, bounds.min_question_chars, bounds.max_question_chars)
    if problem:
        return f"question_{problem}"
    problem = length_problem(answer, bounds.min_answer_chars, bounds.max_answer_chars)
    if problem:
        return f"answer_{problem}"
    if grounding(answer, context) < bounds.grounding_threshold:
        return "ungrounded"
    return None


def filter_sft(pairs: Iterable[QAPair], bounds: Bounds, rejected: Counter[str]) -> list[QAPair]:
    kept = []
    for pair in pairs:
        problem = _qa_problem(pair.question, pair.answer, pair.context, bounds)
        if problem:
            rejected[f"sft.{problem}"] += 1
        else:
            kept.append(pair)
    return dedupe(kept, lambda p: f"{p.question}\n{p.answer}", bounds.near_duplicate_threshold, rejected, "sft")


def filter_dpo(pairs: Iterable[PreferencePair], bounds: Bounds, rejected: Counter[str]) -> list[PreferencePair]:
    kept = []
    for pair in pairs:
        problem = _qa_problem(pair.question, pair.chosen, pair.context, bounds)
        if not problem and normalise(pair.rejected) == normalise(pair.chosen):
            problem = "rejected_equals_chosen"
        if not problem and not pair.rejected.strip():
            problem = "rejected_empty"
        if problem:
            rejected[f"dpo.{problem}"] += 1
        else:
            kept.append(pair)
    return dedupe(kept, lambda p: f"{p.question}\n{p.chosen}", bounds.near_duplicate_threshold, rejected, "dpo")


def filter_passages(passages: Iterable[Passage], bounds: Bounds, rejected: Counter[str]) -> list[Passage]:
    kept = []
    for passage in passages:
        problem = length_problem(passage.text, bounds.min_passage_chars, bounds.max_passage_chars)
        if not problem and passage.kind == "enriched" and \
                grounding(passage.text, passage.context) < bounds.enrichment_grounding_threshold:
            problem = "ungrounded"
        if problem:
            rejected[f"dapt.{problem}"] += 1
        else:
            kept.append(passage)
    return dedupe(kept, lambda p: p.text, bounds.near_duplicate_threshold, rejected, "dapt")


def unique_answers(pairs: Iterable[QAPair], rejected: Counter[str], prefix: str) -> list[QAPair]:
    """Pairs whose answers all differ, so any answer can serve as another question's distractor."""
    seen: set[str] = set()
    kept = []
    for pair in pairs:
        digest = text_hash(pair.answer)
        if digest in seen:
            rejected[f"{prefix}.repeated_answer"] += 1
            continue
        seen.add(digest)
        kept.append(pair)
    return kept
