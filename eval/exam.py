"""An exam: questions with short reference answers, optionally four options, read from JSONL.

One item a line: `{"question": str, "answer": str, "aliases": [str]?, "options": [str]?,
"correct": int?, "kind": str?, "id": str?}`. Items with `options` and a 0-based `correct` are
multiple choice; every item with an `answer` is also open question answering. A bad line is
reported with its line number and skipped; an exam with no usable item is an error. Without a
file, a specialist's own held-out split becomes the exam (`exam_from_heldout`).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from atelier.errors import AtelierError


@dataclass(frozen=True)
class ExamItem:
    id: str
    question: str
    answer: str = ""
    aliases: tuple[str, ...] = ()
    options: tuple[str, ...] = ()
    correct: int | None = None
    kind: str = ""
    prompt: tuple[dict, ...] = ()  # the conversation before the answer (held-out items); else one user turn

    @property
    def is_mcq(self) -> bool:
        return len(self.options) >= 2 and self.correct is not None

    @property
    def is_open(self) -> bool:
        return bool(self.answer.strip())

    def messages(self, passages: list[str] | None = None) -> list[dict[str, str]]:
        """The conversation that asks this question, with retrieved passages quoted before it when given."""
        if passages:
            quoted = "\n\n".join(f"[{n}] {p}" for n, p in enumerate(passages, 1))
            return [{"role": "user", "content": f"Passages from the documents:\n{quoted}\n\n"
                                                f"Answer from the passages. Question: {self.question}"}]
        return [dict(m) for m in self.prompt] or [{"role": "user", "content": self.question}]


@dataclass
class Exam:
    name: str  # the file, or "heldout"
    items: list[ExamItem]
    sha256: str
    problems: list[str] = field(default_factory=list)  # "line 7: ..." for every skipped line

    @property
    def mcq_items(self) -> list[ExamItem]:
        return [i for i in self.items if i.is_mcq]

    @property
    def open_items(self) -> list[ExamItem]:
        return [i for i in self.items if i.is_open]


def _item(row: object, line: int) -> ExamItem:
    """One exam item from a parsed line; ValueError with the reason when it is unusable."""
    if not isinstance(row, dict):
        raise ValueError("not a JSON object")
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise ValueError('no "question" (a non-empty string)')
    answer = row.get("answer", "")
    if not isinstance(answer, str):
        raise ValueError('"answer" must be a string')
    aliases = row.get("aliases") or []
    if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
        raise ValueError('"aliases" must be a list of strings')
    options, correct = row.get("options"), row.get("correct")
    if options is not None or correct is not None:
        if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) and o.strip()
                                                                         for o in options):
            raise ValueError('"options" must be a list of at least two non-empty strings')
        if not isinstance(correct, int) or isinstance(correct, bool) or not 0 <= correct < len(options):
            raise ValueError(f'"correct" must be the 0-based index of the right option (0 to {len(options) - 1})')
        if len(set(options)) != len(options):
            raise ValueError('"options" has the same option twice')
    if not answer.strip() and options is None:
        raise ValueError('neither an "answer" nor "options" with "correct": nothing to score')
    item_id = row.get("id", f"line{line}")
    if not isinstance(item_id, (str, int)) or not str(item_id).strip():
        raise ValueError('"id" must be a non-empty string')
    kind = row.get("kind") or ""
    return ExamItem(id=str(item_id), question=question.strip(), answer=answer.strip(), aliases=tuple(aliases),
                    options=tuple(options or ()), correct=correct, kind=str(kind))


def read_exam(path: Path) -> Exam:
    """Read an exam file; bad lines (and repeated ids) are reported in `Exam.problems` and skipped."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise AtelierError(f"cannot read the exam {path} ({exc.strerror or exc}); pass a JSONL file") from None
    items, problems, seen = [], [], {}
    for line, text in enumerate(raw.decode("utf-8", errors="replace").splitlines(), 1):
        if not text.strip():
            continue
        try:
            item = _item(json.loads(text), line)
        except json.JSONDecodeError as exc:
            problems.append(f"line {line}: not valid JSON ({exc.msg})")
            continue
        except ValueError as exc:
            problems.append(f"line {line}: {exc}")
            continue
        if item.id in seen:
            problems.append(f"line {line}: id {item.id!r} already used on line {seen[item.id]}")
            continue
        seen[item.id] = line
        items.append(item)
    if not items:
        detail = f" ({problems[0]}{' ...' if len(problems) > 1 else ''})" if problems else ""
        raise AtelierError(f"the exam {path} has no usable item{detail}; each line needs a JSON object with "
                           '"question" and "answer" (and optionally "options" with a 0-based "correct")')
    return Exam(name=str(path), items=items, sha256=hashlib.sha256(raw).hexdigest(), problems=problems)


def exam_from_heldout(data_dir: Path, *, max_items: int = 100, options: int = 4, seed: int = 0) -> Exam:
    """The held-out SFT pairs of a training run as an exam: open QA on every pair, and multiple
    choice with distractors from the other held-out answers (as the held-out evaluation builds them),
    the correct option at a seeded position."""
    from eval.specialist import build_mcq, qa_items, read_jsonl, sample_rows

    path = Path(data_dir) / "sft" / "heldout.jsonl"
    qa = qa_items(read_jsonl(path))
    if not qa:
        raise AtelierError(f"no held-out questions in {path}; pass --exam FILE.jsonl, or rebuild the training data")
    items = []
    for i in sample_rows(list(range(len(qa))), max_items, seed):
        opts = build_mcq(qa, i, options, seed)
        question = next((m["content"] for m in reversed(qa[i].prompt) if m.get("role") == "user"), "")
        correct = None
        if len(opts) >= 2:
            order = list(range(len(opts)))
            random.Random(f"{seed}:{i}:order").shuffle(order)
            opts, correct = [opts[j] for j in order], order.index(0)
        items.append(ExamItem(id=f"h{i:03d}", question=question, answer=qa[i].answer, options=tuple(opts),
                              correct=correct, kind=qa[i].kind, prompt=tuple(qa[i].prompt)))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return Exam(name="heldout", items=items, sha256=digest)
