"""Training data straight from the documents, with no teacher model.

Every answer is copied from the document (grounded by construction); only the question
is written from a template. A document is read as headings, prose, numbered or bulleted
items and table rows, and each usable sentence yields at most one pair, so answers do
not repeat. Kinds:

* definition  "What is a mechanical seal?"        <- "A mechanical seal is a device that ..."
* procedure   'What are the steps of "Levelling the baseplate"?' <- the numbered steps
* table       'In the table "...", what is given under "Corrective action" for "..."?' <- a cell
* fact        a sentence with its number and unit blanked    <- the value ("1 bar")
* cloze       a sentence with a domain keyword blanked        <- the keyword
* completion  "Continue the text ...: <first half>"            <- the second half
* summary     'Summarize the section "..."'                    <- the section's lead sentences

Preference pairs take such a pair as the chosen side and a corrupted copy as the rejected
side: another keyword swapped in, a number changed, another cell of the same table column,
a step left out, or the answer cut short.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from retrieval.documents import Document
from retrieval.types import Chunk
from training.filters import Passage, PreferencePair, QAPair, normalise

_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]?\s+(?=[A-Z0-9\"'(\[])")
_ABBREVIATIONS = ("e.g.", "i.e.", "etc.", "approx.", "No.", "Fig.", "vs.", "cf.", "min.", "max.")
_MD_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*$")
_NUMBERED = re.compile(r"^(\d{1,2})[.)]\s+(.+)$")
_SECTION_NUMBER = re.compile(r"^\d+(?:\.\d+)*\.?\s+")
_BULLET = re.compile(r"^[-*+•]\s+(.+)$")
_TABLE_RULE = re.compile(r"^[|:\-\s]+$")
_PAGE_MARK = re.compile(r"^(?:page\s*)?\d+(?:\s*(?:/|of)\s*\d+)?$", re.IGNORECASE)
_DEFINITION = re.compile(r"^(?:(?P<art>An?|The)\s+)?(?P<term>[A-Za-z][\w\-/]*(?:\s+[\w\-/]+){0,4}?)"
                         r"(?:\s+\([^)]{1,20}\))?\s+(?P<verb>is|are|means|refers to)\s+(?:an?|the|one)\s")
_UNITS = (r"mm²/s|m³/h|mm/m|mm/s|L/min|l/min|N·m|Nm|MΩ|kPa|MPa|mbar|bar|°C|K|rpm|kHz|Hz|kW|W|kV|V|mA|A|%|µm|mm|cm|"
          r"m|kg|g|dB|ppm|min|s|h|hours|days|weeks|months|years|minutes|seconds")  # longest first
QUANTITY = re.compile(rf"(?<![\w.,\-])(\d+(?:[.,]\d+)?)\s?({_UNITS})(?![\w/²³])")
_TERMINAL = (".", "!", "?", ":")
_FUNCTION_WORDS = frozenset(["the", "a", "an", "and", "or", "in", "on", "at", "for", "with", "to", "from", "by",
                            "this", "that", "these", "those", "it", "its", "which"])


@dataclass(frozen=True, slots=True)
class Unit:
    """A line-level piece of a document: heading, prose, item (numbered or bulleted) or table row."""

    kind: str
    text: str
    start: int
    heading: str
    number: int | None = None


def _strip_markup(text: str) -> str:
    return re.sub(r"\*\*|__|`", "", text).strip()


def _is_heading(line: str, next_line: str) -> bool:
    """A short line that does not end like a sentence and carries no bare number."""
    if len(line) > 80 or line.endswith(_TERMINAL) or not line[:1].isalnum():
        return False
    body = _SECTION_NUMBER.sub("", line)
    if body != line:
        return bool(body[:1].isupper())
    if any(t.isdigit() for t in body.split()) or len(body.split()) > 8:
        return False
    return body.isupper() or (len(line) <= 60 and bool(next_line) and body[:1].isupper())


def page_furniture(text: str) -> set[str]:
    """Lines repeated on every page of a PDF (running headers and footers): not content."""
    counts = Counter(line.strip() for line in text.split("\n"))
    return {line for line, n in counts.items() if n >= 3 and len(line) >= 20 and "|" not in line}


def parse_units(text: str) -> list[Unit]:
    """The document as units, wrapped prose lines (as in PDFs) joined, headings tracked."""
    units: list[Unit] = []
    heading, buffer, buffer_start = "", [], 0
    lines = text.split("\n")
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line) + 1)

    def flush() -> None:
        nonlocal buffer
        if buffer:
            units.append(Unit("prose", " ".join(buffer), buffer_start, heading))
            buffer = []

    skip = page_furniture(text)
    for i, raw in enumerate(lines):
        line, start = _strip_markup(raw), offsets[i] + len(raw) - len(raw.lstrip())
        if raw.strip() in skip or _PAGE_MARK.match(line):
            continue
        next_line = lines[i + 1].strip() if i + 1 < len(lines) else ""
        md, numbered, bullet = _MD_HEADING.match(line), _NUMBERED.match(line), _BULLET.match(line)
        if not line or _TABLE_RULE.match(line):
            flush()
        elif md or (not bullet and _is_heading(line, next_line)):
            flush()
            heading = _SECTION_NUMBER.sub("", md.group(1) if md else line).strip()
            units.append(Unit("heading", heading, start, heading))
        elif line.count("|") >= 2:
            flush()
            units.append(Unit("row", line, start, heading))
        elif numbered or bullet:
            flush()
            units.append(Unit("item", (numbered or bullet).groups()[-1], start, heading,
                              int(numbered.group(1)) if numbered else None))
        else:
            if buffer and len(buffer[-1]) < 60 and not buffer[-1].endswith(_TERMINAL):
                flush()  # a short unfinished line is a table row or label of a PDF, not wrapped prose
            if not buffer:
                buffer_start = start
            buffer.append(line)
    flush()
    return units


def sentences(unit: Unit) -> list[tuple[str, int]]:
    """Complete sentences of a prose unit or item, with their start offsets in the document."""
    out, cursor = [], 0
    text = unit.text
    for match in _SENTENCE_END.finditer(text):
        if not text[max(0, match.start() - 8):match.start()].endswith(_ABBREVIATIONS):
            out.append((text[cursor:match.start()], unit.start + cursor))
            cursor = match.end()
    out.append((text[cursor:], unit.start + cursor))
    return [(s.strip(), pos) for s, pos in out if _good_sentence(s.strip())]


def _good_sentence(sentence: str) -> bool:
    words = sentence.split()
    alpha = sum(any(c.isalpha() for c in w) for w in words)
    return (6 <= len(words) <= 60 and sentence[:1].isupper() and sentence.endswith((".", "!", "?"))
            and "|" not in sentence and alpha >= 0.6 * len(words))


def where_phrase(unit: Unit, doc: Document) -> str:
    if unit.heading and unit.heading != doc.title:
        return f'the section "{unit.heading}" of "{doc.title}"'
    return f'"{doc.title}"'


def _definition(sentence: str, keywords: Sequence[str]) -> str | None:
    """The question a definition sentence answers ("X is a ..." -> "What is X?"), else None.

    The term must name something of the domain: hold a domain keyword, or be a code or
    acronym ("Plan 11", "DBSE"). That rules out "The cause is a ...", where the subject
    points back to the context; a function word inside rules out "These readings" and
    "the values in this document".
    """
    match = _DEFINITION.match(sentence)
    if not match or _FUNCTION_WORDS & {w.lower() for w in match["term"].split()}:
        return None
    term = match["term"]
    coded = any(c.isupper() or c.isdigit() for c in term[1:])
    if not coded and not any(re.search(rf"\b{re.escape(k)}", term, re.IGNORECASE) for k in keywords):
        return None
    if not coded:  # "Cavitation" at the start of a sentence, but "Plan 11" and "NPSHr" as written
        term = term[0].lower() + term[1:]
    subject = f"{match['art'].lower()} {term}" if match["art"] else term
    return {"is": f"What is {subject}?", "are": f"What are {subject}?", "means": f"What does {subject} mean?",
            "refers to": f"What does {subject} refer to?"}[match["verb"]]


def _blank_keyword(sentence: str, keywords: Sequence[str]) -> tuple[str, str] | None:
    """The sentence with its most distinctive multi-word (else single) keyword blanked."""
    for multi in (True, False):
        for term in keywords:
            if (" " in term) != multi:
                continue
            found = list(re.finditer(rf"\b{re.escape(term)}s?\b", sentence, flags=re.IGNORECASE))
            if len(found) == 1 and found[0].start() > 0:
                m = found[0]
                return f"{sentence[:m.start()]}____{sentence[m.end():]}", m.group(0)
    return None


def _sentence_pair(sentence: str, unit: Unit, doc: Document, keywords: Sequence[str], turn: int):
    """(kind, question, answer) for one sentence: a definition, else a value, else cloze or completion in turn."""
    question = _definition(sentence, keywords)
    if question:
        return "definition", question, sentence
    quantity = QUANTITY.search(sentence)
    if quantity:  # values are the facts most worth learning, and the easiest to corrupt convincingly
        blanked = f"{sentence[:quantity.start()]}____{sentence[quantity.end():]}"
        return "fact", f"In {where_phrase(unit, doc)}, what value fills the blank: \"{blanked}\"?", quantity.group(0)
    options = []
    blank = _blank_keyword(sentence, keywords)
    if blank:
        options.append(("cloze", f"In {where_phrase(unit, doc)}, which term fills the blank: \"{blank[0]}\"?", blank[1]))
    words = sentence.split()
    if len(words) >= 12:
        half = len(words) // 2
        options.append(("completion", f"Continue the text from {where_phrase(unit, doc)}: \"{' '.join(words[:half])} ...\"",
                        " ".join(words[half:])))
    return options[turn % len(options)] if options else None


def _procedures(units: list[Unit], doc: Document) -> list[tuple[str, str, int, int]]:
    """(question, answer, start, end) for each run of items numbered 1, 2, 3, ..."""
    out, run = [], []
    for unit in units + [Unit("end", "", len(doc.text), "")]:
        if unit.kind == "item" and unit.number == len(run) + 1 and (not run or unit.heading == run[0].heading):
            run.append(unit)
            continue
        if len(run) >= 2 and run[0].heading:
            answer = "\n".join(f"{u.number}. {u.text}" for u in run)
            question = f'What are the steps of "{run[0].heading}" in "{doc.title}"?'
            out.append((question, answer, run[0].start, run[-1].start + len(run[-1].text)))
        run = [unit] if unit.kind == "item" and unit.number == 1 else []
    return out


def _cells(row: str) -> list[str]:
    cells = [c.strip() for c in row.strip().split("|")]
    return cells[1:-1] if row.strip().startswith("|") else cells[:-1] if not cells[-1] else cells


def table_facts(units: list[Unit], doc: Document) -> list[tuple[str, str, int, list[str]]]:
    """(question, answer, start, other cells of the column) for the cells of each table."""
    out, table = [], []
    for unit in units + [Unit("end", "", len(doc.text), "")]:
        if unit.kind == "row" and (not table or unit.heading == table[0].heading):
            table.append(unit)
            continue
        if len(table) >= 2:
            header = _cells(table[0].text)
            rows = [(u, _cells(u.text)) for u in table[1:]]
            for j in range(1, len(header)):
                column = [cells[j] for _, cells in rows if len(cells) == len(header)]
                for row_unit, cells in rows:
                    if len(cells) == len(header) and cells[0] and cells[j] and header[j]:
                        where = f' "{table[0].heading}"' if table[0].heading else ""
                        question = (f'In the table{where} of "{doc.title}", what is given under "{header[j]}" '
                                    f'for "{cells[0]}"?')
                        out.append((question, cells[j], row_unit.start, column))
        table = [unit] if unit.kind == "row" else []
    return out


def _summaries(units: list[Unit], doc: Document) -> list[tuple[str, str, int]]:
    by_heading: dict[str, list[tuple[str, int]]] = {}
    for unit in units:
        if unit.kind == "prose" and unit.heading:
            by_heading.setdefault(unit.heading, []).extend(sentences(unit))
    return [(f'Summarize the section "{heading}" of "{doc.title}".', " ".join(s for s, _ in found[:2]), found[0][1])
            for heading, found in by_heading.items() if len(found) >= 3]


def chunk_at(chunks: Sequence[Chunk], start: int, end: int) -> tuple[int, str]:
    """Index of the chunk holding `start`, and the text of the chunks covering start..end."""
    covering = [c for c in chunks if c.start < end and c.end > start] or list(chunks[:1])
    return covering[0].index, " ".join(c.text for c in covering)


def extract_pairs(doc: Document, chunks: Sequence[Chunk], keywords: Sequence[str],
                  max_pairs_per_chunk: int) -> list[QAPair]:
    """Instruction pairs drawn from one document, at most `max_pairs_per_chunk` per chunk."""
    units = parse_units(doc.text)
    raw: list[tuple[str, str, str, int, int]] = []  # kind, question, answer, start, end
    raw += [("procedure", q, a, s, e) for q, a, s, e in _procedures(units, doc)]
    raw += [("table", q, a, s, s + 1) for q, a, s, _ in table_facts(units, doc)]
    raw += [("summary", q, a, s, s + len(a)) for q, a, s in _summaries(units, doc)]
    turn = 0
    for unit in units:
        if unit.kind not in ("prose", "item"):
            continue
        for sentence, start in sentences(unit):
            made = _sentence_pair(sentence, unit, doc, keywords, turn)
            if made:
                turn += 1
                raw.append((*made, start, start + len(sentence)))
    per_chunk: Counter[int] = Counter()
    pairs = []
    for kind, question, answer, start, end in sorted(raw, key=lambda r: r[3]):
        index, context = chunk_at(chunks, start, end)
        if per_chunk[index] < max_pairs_per_chunk:
            per_chunk[index] += 1
            pairs.append(QAPair(question, answer, doc.doc_id, kind, context, index))
    return pairs


def table_columns(doc: Document) -> dict[str, list[str]]:
    """For each table cell's question, the other cells of its column (plausible wrong answers)."""
    return {q: [c for c in column if c != a] for q, a, _, column in table_facts(parse_units(doc.text), doc)}


def dapt_passages(doc: Document, chunks: Sequence[Chunk]) -> list[Passage]:
    """The document's chunks as plain text: markdown marks and table rules removed."""
    out, skip = [], page_furniture(doc.text)
    for chunk in chunks:
        lines = [_MD_HEADING.sub(r"\1", _strip_markup(line)) for line in chunk.text.split("\n")
                 if line.strip() not in skip and not _PAGE_MARK.match(line.strip())]
        text = "\n".join(line for line in lines if not (_TABLE_RULE.match(line) and "-" in line))
        text = re.sub(r"[ \t]+", " ", re.sub(r"\n{3,}", "\n\n", text)).strip()
        if text:
            out.append(Passage(text, doc.doc_id))
    return out


_UNIT_SWAPS = {"mm": "cm", "cm": "mm", "bar": "mbar", "mbar": "bar", "°C": "°F", "kW": "W", "W": "kW", "Hz": "kHz",
               "kHz": "Hz", "V": "mV", "A": "mA", "mA": "A", "h": "min", "min": "s", "s": "min", "hours": "minutes",
               "minutes": "seconds", "days": "weeks", "weeks": "months", "months": "years", "years": "months"}


def _changed_number(text: str, rng: random.Random) -> str | None:
    """`text` with one quantity altered: a different value, or (sometimes) a different unit."""
    found = list(re.finditer(r"(?<![\w.,])(\d+(?:[.,]\d+)?)(\s?)(" + _UNITS + r")?(?![\w/²³])", text))
    if not found:
        return None
    match = rng.choice(found)
    value, space, unit = match.group(1), match.group(2), match.group(3)
    if unit in _UNIT_SWAPS and rng.random() < 0.3:
        return f"{text[:match.start()]}{value}{space}{_UNIT_SWAPS[unit]}{text[match.end():]}"
    number = float(value.replace(",", "."))
    factor = rng.choice([0.5, 2.0, 1.5, 0.25, 4.0, 10.0]) if number else 1.0
    new = number * factor if number else float(rng.choice([1, 5, 10]))
    decimals = len(value.split(".")[1]) if "." in value else 0
    shown = f"{new:.{decimals}f}" if decimals else f"{round(new)}"
    if shown == value:
        shown = str(int(number) + 1)
    return f"{text[:match.start()]}{shown}{space}{unit or ''}{text[match.end():]}"


def _swapped_term(text: str, keywords: Sequence[str], rng: random.Random, skip: int = 0) -> str | None:
    """`text` with one of its keywords (longest first) replaced by another keyword as long in words."""
    for term in sorted(keywords, key=lambda k: -k.count(" ")):
        match = re.search(rf"\b{re.escape(term)}\b", text[skip:], flags=re.IGNORECASE)
        if match:
            others = [k for k in keywords if k.count(" ") == term.count(" ") and k.lower() not in text.lower()]
            if others:
                other = rng.choice(others[:50])
                return f"{text[:skip + match.start()]}{other}{text[skip + match.end():]}"
    return None


def _truncated(text: str) -> str | None:
    words = text.split()
    return " ".join(words[: max(1, len(words) * 2 // 5)]) if len(words) >= 5 else None


def _missing_step(text: str, rng: random.Random) -> str | None:
    steps = text.split("\n")
    if len(steps) < 3:
        return None
    drop = rng.randrange(1, len(steps))
    return "\n".join(re.sub(r"^\d+", str(n), s) for n, s in enumerate(steps[:drop] + steps[drop + 1:], 1))


def corrupt(pair: QAPair, keywords: Sequence[str], rng: random.Random,
            columns: dict[str, list[str]]) -> tuple[str, str] | None:
    """(rejected answer, how it was made) for a pair, trying the corruptions that suit its kind."""
    subject_end = pair.answer.find(" is ") if pair.kind == "definition" else 0  # keep the defined term
    attempts: dict[str, Callable[[], str | None]] = {
        "swapped_cell": lambda: rng.choice(columns[pair.question]) if columns.get(pair.question) else None,
        "changed_number": lambda: _changed_number(pair.answer, rng),
        "swapped_term": lambda: _swapped_term(pair.answer, keywords, rng, max(subject_end, 0)),
        "missing_step": lambda: _missing_step(pair.answer, rng),
        "truncated": lambda: _truncated(pair.answer),
    }
    order = {"table": ["swapped_cell", "changed_number", "swapped_term"], "fact": ["changed_number"],
             "cloze": ["swapped_term"], "procedure": ["missing_step", "truncated"]}.get(
        pair.kind, ["changed_number", "swapped_term", "truncated"])
    for how in order:
        rejected = attempts[how]()
        if rejected and normalise(rejected) != normalise(pair.answer):
            return rejected, how
    return None


def preference_pairs(pairs: Sequence[QAPair], keywords: Sequence[str], columns: dict[str, list[str]], seed: int,
                     max_per_chunk: int) -> list[PreferencePair]:
    """One corrupted preference pair per instruction pair, at most `max_per_chunk` per chunk."""
    per_chunk: Counter[tuple[str, int]] = Counter()
    out = []
    for pair in pairs:
        where = (pair.source, pair.chunk)
        if per_chunk[where] >= max_per_chunk:
            continue
        made = corrupt(pair, keywords, random.Random(f"{seed}:{pair.question}"), columns)
        if made:
            per_chunk[where] += 1
            out.append(PreferencePair(pair.question, pair.answer, made[0], pair.source, f"{pair.kind}/{made[1]}",
                                      pair.context, pair.chunk))
    return out
