"""The facts of a domain's documents, each restated several ways, and how often training sees them.

A small model learns a fact from a few thousand words only if it meets it several times in
varied forms (the finding behind "synthetic continued pretraining", which rephrases a small
corpus many ways before continued pretraining). Offline, without a teacher, the variation
comes from the documents' own structure:

* a **fact** is a value a technician looks up: a number with its unit ("80 N·m", "0.05 mm"),
  a code ("E14", "HX-65"), or a table cell; it is kept with its sentence (or row), the topic
  it is about (the longest domain keyword next to it) and where it stands;
* **questions** ask for it the ways people ask ("What is the tightening torque of the
  impeller nut for HX-65?", "What torque does the maintenance schedule give for the drain
  plug?"), some answered with the bare value, some with the whole sentence;
* **restatements** put the same facts into short DAPT texts of other shapes (a fact sheet
  per section, question-and-answer notes), so continued pretraining sees each fact again
  in other words;
* **coverage** counts, for every fact of the training documents, how often its value occurs
  in the training data next to its topic — the number the data report shows.

Preference pairs with the wrong value (a changed number, another cell of the same column)
are made from these questions by the same corruptions as the other pairs (offline.corrupt).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from retrieval.documents import Document
from retrieval.types import Chunk
from training import offline
from training.filters import Passage, QAPair

_CODE = re.compile(r"(?<![\w-])([A-Z]{1,4}-?\d{1,4}[A-Z]?\d*)(?![\w-])")
# the quantity a unit measures, for questions that name it ("what torque ...")
_QUANTITY_NAMES = {
    "N·m": "torque", "Nm": "torque", "bar": "pressure", "mbar": "pressure", "kPa": "pressure", "MPa": "pressure",
    "°C": "temperature", "K": "temperature rise", "mm": "dimension", "µm": "dimension", "cm": "dimension",
    "m": "length", "Hz": "frequency", "kHz": "frequency", "rpm": "speed", "kW": "power", "W": "power",
    "V": "voltage", "kV": "voltage", "A": "current", "mA": "current", "%": "percentage", "mm/s": "vibration velocity",
    "L/min": "flow", "l/min": "flow", "m³/h": "flow", "MΩ": "insulation resistance", "dB": "noise level",
    "h": "interval", "hours": "interval", "days": "interval", "weeks": "interval", "months": "interval",
    "years": "interval", "min": "time", "minutes": "time", "s": "time", "seconds": "time", "kg": "mass",
    "g": "mass", "mm²/s": "viscosity", "mm/m": "tolerance", "ppm": "concentration",
}


@dataclass(frozen=True, slots=True)
class Fact:
    value: str  # "80 N·m", "E14", or a table cell
    kind: str  # "quantity", "code" or "cell"
    topic: str  # what the value is about: a domain keyword, or a table's row label
    statement: str  # the sentence (or "row label — column: cell") that states it
    where: str  # 'the section "..." of "..."'
    source: str
    start: int  # offset in the document, for the chunk it belongs to
    quantity: str = ""  # "torque", "pressure", ... for quantities
    column: str = ""  # for cells: the column header
    table: str = ""  # for cells: the table's heading


def _topic(sentence: str, position: int, keywords: Sequence[str]) -> str:
    """The domain keyword the value at `position` is most likely about: the longest keyword in
    the sentence, ties broken by nearness to the value."""
    best, best_key = "", (0, 0.0)
    lowered = sentence.lower()
    for term in keywords:
        for match in re.finditer(rf"\b{re.escape(term.lower())}s?\b", lowered):
            key = (len(term.split()), -abs(match.start() - position) / 100)
            if key > best_key:
                best, best_key = sentence[match.start():match.end()], key
    return best


def find_facts(doc: Document, keywords: Sequence[str]) -> list[Fact]:
    """Every quantity, code and table cell of `doc`, with its topic and statement."""
    units = offline.parse_units(doc.text)
    facts: list[Fact] = []
    # A code stated in many sentences is a model name (HX-65), not a fact to look up (E14).
    code_counts = {code: len(re.findall(rf"(?<![\w-]){re.escape(code)}(?![\w-])", doc.text))
                   for code in set(_CODE.findall(doc.text))}
    for unit in units:
        if unit.kind not in ("prose", "item"):
            continue
        where = offline.where_phrase(unit, doc)  # the same wording the other pairs use
        for sentence, start in offline.sentences(unit):
            for match in offline.QUANTITY.finditer(sentence):
                topic = _topic(sentence, match.start(), keywords)
                if topic:
                    facts.append(Fact(match.group(0), "quantity", topic, sentence, where, doc.doc_id, start,
                                      quantity=_QUANTITY_NAMES.get(match.group(2), "value")))
            for match in _CODE.finditer(sentence):
                code = match.group(1)
                if any(c.isdigit() for c in code) and len(code) >= 2 and code_counts.get(code, 0) <= MAX_CODE_MENTIONS:
                    facts.append(Fact(match.group(1), "code", match.group(1), sentence, where, doc.doc_id, start))
    for question, answer, start, _column in offline.table_facts(units, doc):
        found = re.match(r'In the table(?: "(?P<table>[^"]*)")? of "[^"]*", what is given under "(?P<col>[^"]*)" '
                         r'for "(?P<row>[^"]*)"\?', question)
        if found:
            row, column, table = found["row"], found["col"], found["table"] or ""
            facts.append(Fact(answer, "cell", row, f"{row} — {column}: {answer}", f'"{doc.title}"', doc.doc_id,
                              start, column=column, table=table))
    unique: dict[tuple[str, str], Fact] = {}
    for fact in facts:
        unique.setdefault((fact.value, fact.topic.lower()), fact)
    return list(unique.values())


MAX_CODE_MENTIONS = 3


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:] if text[:2] != text[:2].upper() else text


def questions(fact: Fact, title: str, count: int) -> list[tuple[str, str]]:
    """Up to `count` (question, answer) forms asking for `fact`, short answers and whole sentences mixed."""
    topic = _lower_first(fact.topic)
    if fact.kind == "quantity":
        forms = [
            (f"What is the {fact.quantity} for the {topic}?", fact.value),
            (f"What {fact.quantity} does \"{title}\" give for the {topic}?", fact.statement),
            (f"{fact.topic[:1].upper() + fact.topic[1:]}: which {fact.quantity} is specified?", fact.value),
            (f"How is the {topic} specified in {fact.where}?", fact.statement),
        ]
    elif fact.kind == "code":
        forms = [
            (f"What does {fact.value} refer to in \"{title}\"?", fact.statement),
            (f"What is said about {fact.value}?", fact.statement),
        ]
    else:
        table = _lower_first(fact.table) if fact.table else "value"
        forms = [
            (f"For {fact.column}, what is the {table} of the {topic}?", fact.value),
            (f"What is the {_lower_first(fact.column)} for {fact.topic}?", fact.value),
            (f"{fact.topic} ({fact.column}): what does \"{title}\" give?", fact.value),
        ]
    return forms[:count]


def fact_pairs(doc: Document, chunks: Sequence[Chunk], keywords: Sequence[str], per_fact: int,
               max_per_chunk: int) -> list[QAPair]:
    """Question forms for the facts of `doc` (quantities and table cells first, then codes), at
    most `max_per_chunk` per chunk, grounded in the chunk the fact stands in."""
    pairs, seen, per_chunk = [], set(), {}
    order = {"quantity": 0, "cell": 1, "code": 2}
    for fact in sorted(find_facts(doc, keywords), key=lambda f: (order[f.kind], f.start)):
        index, context = offline.chunk_at(chunks, fact.start, fact.start + len(fact.statement))
        for question, answer in questions(fact, doc.title, per_fact):
            if question not in seen and per_chunk.get(index, 0) < max_per_chunk:
                seen.add(question)
                per_chunk[index] = per_chunk.get(index, 0) + 1
                pairs.append(QAPair(question, answer, doc.doc_id, f"fact_{fact.kind}", context, index))
    return sorted(pairs, key=lambda p: p.chunk)


def restatements(doc: Document, keywords: Sequence[str], rounds: int) -> list[Passage]:
    """Short DAPT texts that restate the facts of `doc` in other shapes, one text per section and round:
    round 1 a fact sheet ("Impeller nut, HX-65: M20, 80 N·m"), round 2 question-and-answer notes."""
    by_where: dict[str, list[Fact]] = {}
    for fact in find_facts(doc, keywords):
        by_where.setdefault(fact.where if fact.kind != "cell" else f'{fact.table or "table"} in "{doc.title}"',
                            []).append(fact)
    out = []
    for where, facts in by_where.items():
        for shape in range(rounds):
            if shape % 2 == 0:
                lines = [f"Key values from {where}:"]
                lines += [f"- {f.topic} ({f.column}): {f.value}" if f.kind == "cell" else
                          f"- {f.topic}: {f.value}" if f.kind == "quantity" else f"- {f.statement}" for f in facts]
            else:
                lines = [f"Questions and answers on {where}."]
                for fact in facts:
                    question, _ = questions(fact, doc.title, 1)[0]
                    lines.append(f"Q: {question}\nA: {fact.value}. {fact.statement if fact.kind != 'cell' else ''}"
                                 .rstrip())
            text = "\n".join(dict.fromkeys(lines))  # a value stated twice in a section is listed once
            if len(lines) > 2:
                out.append(Passage(text, doc.doc_id, kind="restated"))
    return out


# ---------------------------------------------------------------- coverage


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("Nm", "N·m").lower()).strip()


def coverage(docs: Sequence[Document], keywords: Sequence[str], texts: Sequence[str]) -> dict[str, float | int]:
    """How much of the documents' facts the training `texts` carry, and how often.

    A fact counts as seen once per training text that holds both its value and its topic.
    Returns the number of facts, the share seen at least once and at least three times, and
    the mean and median number of times a fact is seen.
    """
    facts = {(f.value, f.topic.lower()) for doc in docs for f in find_facts(doc, keywords)}
    if not facts:
        return {"facts": 0, "seen_share": 0.0, "seen_3x_share": 0.0, "mean_times": 0.0, "median_times": 0.0}
    normalised = [_norm(t) for t in texts]
    counts = []
    for value, topic in sorted(facts):
        v, t = _norm(value), _norm(topic)
        counts.append(sum(1 for text in normalised if v in text and t in text))
    counts.sort()
    return {"facts": len(counts), "seen_share": round(sum(c > 0 for c in counts) / len(counts), 3),
            "seen_3x_share": round(sum(c >= 3 for c in counts) / len(counts), 3),
            "mean_times": round(sum(counts) / len(counts), 2), "median_times": float(counts[len(counts) // 2])}
