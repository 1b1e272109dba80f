"""Preference pairs for an improvement round: from the feedback on a specialist's answers, and from files.

What becomes a pair (prompt, chosen, rejected):

* a thumbs-down with a correction: chosen = the correction, rejected = the specialist's answer;
* a thumbs-down without one: chosen = a grounded answer from the passages the search index returns
  for the question (skipped when there is no index): the teacher's, when the round has one (asked to
  answer from those passages only, or UNKNOWN; `training/prompts/answer.j2`), else the passage
  sentence that covers the most of the question's content words; rejected = the specialist's answer.
  Either way the passages are the pair's context, so the grounding filter below keeps the chosen
  answer only when it is drawn from them;
* a thumbs-up: chosen = the approved answer, rejected = the base model's answer to the same
  prompt (written later by the round, which holds the base: `with_rejected`);
* `--pairs FILE`: rows in TRL's {"prompt", "chosen", "rejected"} format, strings or conversations.

Every pair then goes through the pipeline's own filters (training/filters.py): length bounds,
grounding of the chosen answer in its context, rejected != chosen, exact and near duplicates.
Pairs whose prompt matches an exam item (exact or near) are dropped, so the exam stays unseen.
Only feedback on the specialist's own route counts (`FeedbackStore.for_route`).
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from atelier.errors import AtelierError
from atelier.jsonl import iter_jsonl
from training.filters import Bounds, PreferencePair, drop_overlap, filter_dpo, grounding
from training.prompts import answers_from_passages
from training.teacher import Teacher

APPROVED = "approved"  # kind of a thumbs-up pair until the base's answer fills `rejected`


@dataclass
class PairSet:
    """The pairs of one round, where they came from, and why others were dropped."""

    train: list[PreferencePair] = field(default_factory=list)
    heldout: list[PreferencePair] = field(default_factory=list)  # feedback pairs kept out of training
    feedback_ids: list[int] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)  # pair file -> sha256
    rejected: Counter[str] = field(default_factory=Counter)
    teacher: str | None = None  # the round's teacher (provider:model), if it had one

    @property
    def feedback(self) -> list[PreferencePair]:
        """Every feedback pair, trained or held out (the round's "feedback items")."""
        return [p for p in self.train + self.heldout if p.source.startswith("feedback:")]


def feedback_id(pair: PreferencePair) -> int | None:
    return int(pair.source.split(":", 1)[1]) if pair.source.startswith("feedback:") else None


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- feedback


def grounded_answer(question: str, passages: Sequence[str]) -> tuple[str, str] | None:
    """(answer, context): the passage sentence that covers most of the question's content words."""
    import re

    context = "\n".join(passages)
    sentences = [s.strip() for p in passages for s in re.split(r"(?<=[.!?])\s+", p) if len(s.strip()) > 20]
    if not sentences:
        return None
    best = max(sentences, key=lambda s: grounding(question, s))
    return (best, context) if grounding(question, best) > 0 else None


def pairs_from_feedback(
    rows: list[dict],
    search,
    k: int = 3,
    *,
    teacher: Teacher | None = None,
    concurrency: int = 2,
    progress: Callable[[str, int, int], None] | None = None,
) -> tuple[list[PreferencePair], Counter[str]]:
    """Pairs from `FeedbackStore.for_route` rows, in row order; `search(question, k)` gives passages ([] without
    an index). With a `teacher`, it writes the chosen answers of the thumbs-down without a correction, in one
    batch (`progress(what, done, total)` follows it); without one, the best-grounded passage sentence does."""
    pairs: list[PreferencePair | None] = []
    dropped: Counter[str] = Counter()
    asks: list[tuple[int, list[str]]] = []  # (slot in pairs, passages): chosen answers the teacher writes
    for row in rows:
        source, question, answer = f"feedback:{row['id']}", row["question"], row["answer"]
        if row["rating"] == "up":
            pairs.append(PreferencePair(question, answer, "", source, APPROVED, answer))
        elif row.get("correction"):
            pairs.append(PreferencePair(question, row["correction"], answer, source, "correction", row["correction"]))
        elif not (passages := search(question, k)):
            dropped["feedback.down_without_correction_or_index"] += 1
        elif teacher is not None:  # the passages are the context: the grounding filter checks the teacher
            asks.append((len(pairs), passages))
            pairs.append(PreferencePair(question, "", answer, source, "teacher", "\n".join(passages)))
        elif (found := grounded_answer(question, passages)) is None:
            dropped["feedback.no_grounded_answer"] += 1
        else:
            pairs.append(PreferencePair(question, found[0], answer, source, "grounded", found[1]))
    if asks:
        questions = [(pairs[slot].question, passages) for slot, passages in asks]
        answers = answers_from_passages(
            teacher, questions, concurrency=concurrency, rejected=dropped, progress=progress
        )
        for (slot, _), chosen in zip(asks, answers):  # UNKNOWN or unusable: counted as teacher.answer.<reason>
            pairs[slot] = replace(pairs[slot], chosen=chosen) if chosen is not None else None
    return [p for p in pairs if p is not None], dropped


# ----------------------------------------------------------------------------- pair files


def _text(value, key: str, role: str) -> str:
    """The text of a TRL column: a string, or a conversation whose last turn has `role`."""
    if isinstance(value, str) and value.strip():
        return value.strip()
    turns = (
        isinstance(value, list)
        and value
        and all(isinstance(t, dict) and isinstance(t.get("content"), str) for t in value)
    )
    if turns and value[-1].get("role") == role and value[-1]["content"].strip():
        return value[-1]["content"].strip()
    raise ValueError(f'"{key}" must be a non-empty string or a list of messages ending with a {role} turn')


def read_pair_file(path: Path) -> list[PreferencePair]:
    """Pairs from a JSONL file of TRL preference rows; every bad line is named (file:line) in one error."""
    path = Path(path)
    if not path.is_file():
        raise AtelierError(f'--pairs {path} not found; pass a JSONL file of {{"prompt", "chosen", "rejected"}} rows')
    fix = 'each line needs {"prompt": ..., "chosen": ..., "rejected": ...} (strings or lists of messages)'
    pairs, problems = [], []
    for line, row in iter_jsonl(path, fix=fix):
        try:
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
            missing = [k for k in ("prompt", "chosen", "rejected") if k not in row]
            if missing:
                raise ValueError(f"no {', '.join(missing)}")
            prompt = _text(row["prompt"], "prompt", "user")
            chosen, rejected = (
                _text(row["chosen"], "chosen", "assistant"),
                _text(row["rejected"], "rejected", "assistant"),
            )
        except ValueError as exc:
            problems.append(f"{path}:{line}: {exc}")
            continue
        pairs.append(PreferencePair(prompt, chosen, rejected, f"file:{path.name}:{line}", "file", chosen))
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise AtelierError("; ".join(problems[:3]) + more + f"; {fix}")
    if not pairs:
        raise AtelierError(f"--pairs {path} holds no pairs; {fix}")
    return pairs


# ----------------------------------------------------------------------------- hygiene and split


def clean(
    pairs: list[PreferencePair], bounds: Bounds, exam_questions: Sequence[str], rejected: Counter[str]
) -> list[PreferencePair]:
    """The pipeline's DPO filters, then no prompt that (near-)duplicates an exam question."""
    kept = filter_dpo(pairs, bounds, rejected)
    if exam_questions:
        exam = [PreferencePair(q, "", "", "exam", "exam", "") for q in exam_questions]
        kept = drop_overlap(kept, exam, lambda p: p.question, bounds.near_duplicate_threshold, rejected, "exam")
    return kept


def split_heldout(pairs: list[PreferencePair], fraction: float, seed: int) -> tuple[list, list]:
    """(train, heldout): a seeded `fraction` of the feedback pairs is held out (none below 5 feedback pairs)."""
    feedback = [p for p in pairs if p.source.startswith("feedback:")]
    count = int(len(feedback) * fraction) if len(feedback) >= 5 else 0
    held = {id(p) for p in random.Random(seed).sample(feedback, count)}
    return [p for p in pairs if id(p) not in held], [p for p in pairs if id(p) in held]


def with_rejected(pair: PreferencePair, rejected: str) -> PreferencePair:
    return replace(pair, rejected=rejected, kind="approved-vs-base")


def trl_row(pair: PreferencePair) -> dict:
    """The conversational TRL row the DPO stage reads (source and kind kept for the record)."""
    return {
        "prompt": [{"role": "user", "content": pair.question}],
        "chosen": [{"role": "assistant", "content": pair.chosen}],
        "rejected": [{"role": "assistant", "content": pair.rejected}],
        "source": pair.source,
        "kind": pair.kind,
    }
