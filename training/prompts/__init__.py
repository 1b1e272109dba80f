"""Guided data generation: what the teacher is asked, and how its answers are checked.

The prompts are the Jinja2 templates beside this file, rendered with StrictUndefined so a
missing variable fails loudly instead of sending the teacher a prompt with a hole in it.
Each request is guided by the chunk's own domain keywords (from `retrieval.keywords`):

* `enrich.j2`   rewrites a chunk as clean domain prose (tables and lists as sentences)
                for continued pretraining;
* `qa.j2`       asks for question/answer pairs grounded in the chunk, as JSON;
* `rejected.j2` asks for a plausible but flawed answer to a grounded question: the
                rejected side of a preference pair;
* `answer.j2`   asks for a short answer to a user's question from retrieved passages only,
                or UNKNOWN: the chosen side of an improvement round's pair (training/improve_pairs.py).

A parser turns each answer into data or raises `Rejected(reason)`; the teacher counts
those reasons. The filters (`training.filters`) then check grounding, lengths and
duplicates like for any other example.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training.filters import Passage, PreferencePair, QAPair, grounding
from training.teacher import Rejected, Teacher

PROMPTS_DIR = Path(__file__).parent
_FENCE = re.compile(r"^```[a-zA-Z]*\s*|\s*```$")
_PREAMBLE = re.compile(r"^(here is|here's|sure|certainly|rewritten)[^\n]*:\s*\n", re.IGNORECASE)
_REFUSAL = re.compile(r"\b(as an ai|i cannot|i can't|i am unable|i'm unable)\b", re.IGNORECASE)
# A question that needs the chunk in front of it to make sense is useless once trained on.
_SELF_REFERENCE = re.compile(r"\b(the|this|above|given) (passage|text|excerpt|section)\b", re.IGNORECASE)


def render_prompt(template: str, **variables: Any) -> str:
    """A prompt from `<template>.j2` beside this file; a missing variable is an error, not ""."""
    from jinja2 import Environment, FileSystemLoader, StrictUndefined

    env = Environment(loader=FileSystemLoader(PROMPTS_DIR), undefined=StrictUndefined, autoescape=False,
                      trim_blocks=True, lstrip_blocks=True)
    return env.get_template(f"{template}.j2").render(**variables).strip()


@dataclass(frozen=True, slots=True)
class ChunkTask:
    """One chunk to generate from, with what the prompts need to know about it."""

    source: str
    index: int
    title: str
    heading: str
    text: str
    keywords: tuple[str, ...]


@dataclass
class GuidedData:
    passages: list[Passage] = field(default_factory=list)
    pairs: list[QAPair] = field(default_factory=list)
    preferences: list[PreferencePair] = field(default_factory=list)
    rejected: Counter[str] = field(default_factory=Counter)


def chunk_keywords(text: str, keywords: Sequence[str], limit: int) -> tuple[str, ...]:
    """The corpus keywords that occur in `text`, most distinctive first."""
    lowered = text.lower()
    found = [k for k in keywords if re.search(rf"\b{re.escape(k.lower())}", lowered)]
    return tuple(found[:limit])


def _clean_text(answer: str) -> str:
    text = _PREAMBLE.sub("", _FENCE.sub("", answer.strip())).strip()
    if not text:
        raise Rejected("empty_answer")
    if _REFUSAL.search(text[:200]):
        raise Rejected("refusal")
    return text


def parse_passage(answer: str) -> str:
    return _clean_text(answer)


def _json_in(text: str) -> Any:
    """The JSON object (else array) in `text`, tolerating code fences and chatter around it."""
    text = _FENCE.sub("", text.strip())
    for opening, closing in (("{", "}"), ("[", "]")):
        start, end = text.find(opening), text.rfind(closing)
        if 0 <= start < end:
            try:
                return json.loads(text[start:end + 1])
            except json.JSONDecodeError:
                continue
    raise Rejected("malformed_json")


def _usable(item: Any) -> bool:
    """A pair with a question and an answer, whose question stands on its own."""
    return (isinstance(item, dict) and isinstance(item.get("question"), str) and isinstance(item.get("answer"), str)
            and bool(item["question"].strip()) and bool(item["answer"].strip())
            and not _SELF_REFERENCE.search(item["question"]))


def parse_pairs(answer: str) -> tuple[list[tuple[str, str]], int]:
    """(question, answer) pairs from the teacher's JSON, and how many items were unusable."""
    data = _json_in(answer)
    items = data.get("pairs") if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise Rejected("wrong_schema")
    pairs = [(i["question"].strip(), i["answer"].strip()) for i in items if _usable(i)]
    if not pairs:
        raise Rejected("no_valid_pairs")
    return pairs, len(items) - len(pairs)


# Asked for as structured output (a JSON schema for llama.cpp and OpenAI-compatible servers, `format`
# for Ollama), so even a small teacher's replies parse; the parser still checks every item.
parse_pairs.json_schema = {  # type: ignore[attr-defined]
    "type": "object", "required": ["pairs"], "additionalProperties": False,
    "properties": {"pairs": {"type": "array", "minItems": 1, "maxItems": 5, "items": {  # bounded: a small
        "type": "object", "required": ["question", "answer"], "additionalProperties": False,  # model loops
        "properties": {"question": {"type": "string", "minLength": 8, "maxLength": 200},
                       "answer": {"type": "string", "minLength": 1, "maxLength": 300}}}}}}


def parse_rejected(answer: str) -> str:
    return _clean_text(answer).strip('"')


def _batch(teacher: Teacher, stage: str, prompts: list[str], parse: Callable[[str], Any], concurrency: int,
           rejected: Counter[str], progress: Callable[[str, int, int], None] | None) -> list[Any]:
    report = (lambda done, total: progress(stage, done, total)) if progress else None
    batch = teacher.complete_many(prompts, parse, concurrency=concurrency, progress=report)
    rejected.update({f"{stage}.{reason}": n for reason, n in batch.rejected.items()})
    return batch.results


def guided_generation(teacher: Teacher, tasks: Sequence[ChunkTask], *, pairs_per_chunk: int,
                      preferences_per_chunk: int, grounding_threshold: float, concurrency: int,
                      progress: Callable[[str, int, int], None] | None = None) -> GuidedData:
    """Enriched passages, grounded pairs and preference pairs for every chunk, from the teacher."""
    out = GuidedData()
    enrich = [render_prompt("enrich", title=t.title, heading=t.heading, passage=t.text, keywords=t.keywords)
              for t in tasks]
    for task, text in zip(tasks, _batch(teacher, "teacher.enrich", enrich, parse_passage, concurrency,
                                        out.rejected, progress)):
        if text:
            out.passages.append(Passage(text, task.source, "enriched", task.text))
    asks = [render_prompt("qa", title=t.title, passage=t.text, keywords=t.keywords, n_pairs=pairs_per_chunk)
            for t in tasks]
    for task, parsed in zip(tasks, _batch(teacher, "teacher.qa", asks, parse_pairs, concurrency, out.rejected,
                                          progress)):
        if parsed:
            pairs, unusable = parsed
            out.rejected["teacher.qa.unusable_item"] += unusable
            out.pairs += [QAPair(q, a, task.source, "teacher", task.text, task.index)
                          for q, a in pairs[:pairs_per_chunk]]
    chosen, per_chunk = [], Counter()
    for pair in out.pairs:  # worse answers only for questions whose answer is grounded
        if per_chunk[(pair.source, pair.chunk)] < preferences_per_chunk and \
                grounding(pair.answer, pair.context) >= grounding_threshold:
            per_chunk[(pair.source, pair.chunk)] += 1
            chosen.append(pair)
    titles = {t.source: t.title for t in tasks}
    worse = [render_prompt("rejected", title=titles[p.source], question=p.question, answer=p.answer) for p in chosen]
    for pair, bad in zip(chosen, _batch(teacher, "teacher.dpo", worse, parse_rejected, concurrency, out.rejected,
                                        progress)):
        if bad:
            out.preferences.append(PreferencePair(pair.question, pair.answer, bad, pair.source,
                                                  "teacher/teacher_rejected", pair.context, pair.chunk))
    out.rejected = +out.rejected  # drop zero counts
    return out


UNKNOWN = "UNKNOWN"  # what the teacher answers when the passages do not say


def parse_answer(answer: str) -> str:
    """The teacher's answer from passages; UNKNOWN (the passages do not say) is a rejection, not an answer."""
    data = _json_in(answer)
    if not isinstance(data, dict) or not isinstance(data.get("answer"), str):
        raise Rejected("wrong_schema")
    text = _clean_text(data["answer"])
    if text.strip(" .\"'").upper() == UNKNOWN:
        raise Rejected("unknown")
    return text


parse_answer.json_schema = {  # type: ignore[attr-defined]
    "type": "object", "required": ["answer"], "additionalProperties": False,
    "properties": {"answer": {"type": "string", "minLength": 1, "maxLength": 400}}}  # bounded: a small model loops


def answers_from_passages(teacher: Teacher, asks: Sequence[tuple[str, Sequence[str]]], *, concurrency: int,
                          rejected: Counter[str], progress: Callable[[str, int, int], None] | None = None
                          ) -> list[str | None]:
    """The teacher's short answer to each (question, passages) from those passages only, in order; None where
    it said UNKNOWN or its reply was unusable (counted in `rejected` as `teacher.answer.<reason>`)."""
    prompts = [render_prompt("answer", question=q, passages=list(p), unknown=UNKNOWN) for q, p in asks]
    return _batch(teacher, "teacher.answer", prompts, parse_answer, concurrency, rejected, progress)
