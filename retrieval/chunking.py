"""Splitting documents into citable chunks that respect paragraphs and sentences.

Text is cut into sentence spans (paragraph breaks and list lines are hard boundaries),
then spans are packed greedily up to `max_chars`; a chunk prefers to end at a paragraph
break once it is half full, and the next chunk repeats the last sentences of the previous
one up to `overlap_chars`. Every chunk keeps exact character offsets into its document
(`doc.text[chunk.start:chunk.end] == chunk.text`), so a hit can always be cited.

The default size fits all-MiniLM-L6-v2's 256-token window (about 1,000 characters of
English) with the title prepended.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydantic import Field, model_validator

from atelier.config import StrictModel
from retrieval.documents import Document
from retrieval.types import Chunk


class ChunkConfig(StrictModel):
    max_chars: int = Field(900, ge=50, description="Longest chunk, in characters (a sentence longer than this is cut at a word boundary).")
    overlap_chars: int = Field(150, ge=0, description="How much trailing text of a chunk (whole sentences) the next chunk repeats.")

    @model_validator(mode="after")
    def _overlap_smaller(self) -> ChunkConfig:
        if self.overlap_chars >= self.max_chars:
            raise ValueError("overlap_chars must be smaller than max_chars")
        return self


@dataclass(frozen=True, slots=True)
class _Span:
    start: int
    end: int
    opens_paragraph: bool
    is_heading: bool


# A sentence ends at ., ! or ? (optionally followed by a closing quote/bracket) before
# whitespace and an upper-case letter, digit or opening bracket; common abbreviations excepted.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]?\s+(?=[A-Z0-9\"'(\[])")
_ABBREVIATIONS = ("e.g.", "i.e.", "etc.", "approx.", "No.", "Fig.", "Mr.", "Dr.", "vs.", "cf.", "min.", "max.")
_PARAGRAPH = re.compile(r"\n[ \t]*\n+")
_HEADING = re.compile(r"^(#{1,6}\s|[A-Z0-9][^.!?]{0,80}$)")


def _sentences(text: str, start: int, end: int) -> list[tuple[int, int]]:
    spans, cursor = [], start
    for match in _SENTENCE_END.finditer(text, start, end):
        if text[max(start, match.start() - 8):match.start()].endswith(_ABBREVIATIONS):
            continue
        spans.append((cursor, match.start()))
        cursor = match.end()
    spans.append((cursor, end))
    return [(s, e) for s, e in spans if text[s:e].strip()]


def _lines(text: str, start: int, end: int) -> list[tuple[int, int]]:
    """A paragraph's lines stay together unless they are list items, table rows or headings."""
    out, cursor = [], start
    for match in re.finditer(r"\n", text[start:end]):
        pos = start + match.start()
        nxt = text[pos + 1:pos + 4].lstrip()
        if nxt[:1] in "-*|#+" or re.match(r"\d+[.)]", nxt) or text[cursor:pos].lstrip().startswith("#"):
            out.append((cursor, pos))
            cursor = pos + 1
    out.append((cursor, end))
    return out


def _spans(text: str) -> list[_Span]:
    spans: list[_Span] = []
    cursor = 0
    boundaries = [(m.start(), m.end()) for m in _PARAGRAPH.finditer(text)] + [(len(text), len(text))]
    for para_end, next_start in boundaries:
        first = True
        for line_start, line_end in _lines(text, cursor, para_end):
            for s, e in _sentences(text, line_start, line_end):
                s += len(text[s:e]) - len(text[s:e].lstrip())
                e -= len(text[s:e]) - len(text[s:e].rstrip())
                if e > s:
                    heading = bool(_HEADING.match(text[s:e])) and "\n" not in text[s:e] and e - s < 100
                    spans.append(_Span(s, e, first, heading and first))
                    first = False
        cursor = next_start
    return spans


def _split_long(span: _Span, text: str, max_chars: int) -> list[_Span]:
    out, start = [], span.start
    while span.end - start > max_chars:
        cut = text.rfind(" ", start + max_chars // 2, start + max_chars)
        cut = cut if cut > start else start + max_chars
        out.append(_Span(start, cut, start == span.start and span.opens_paragraph, False))
        start = cut + (1 if text[cut:cut + 1] == " " else 0)
    out.append(_Span(start, span.end, start == span.start and span.opens_paragraph, False))
    return out


def _pack(spans: list[_Span], config: ChunkConfig) -> list[tuple[int, int]]:
    """Greedy packing of spans into (start, end) windows with sentence overlap."""
    windows: list[tuple[int, int]] = []
    i = 0
    while i < len(spans):
        j = i
        while j + 1 < len(spans) and spans[j + 1].end - spans[i].start <= config.max_chars:
            nxt = spans[j + 1]
            half_full = spans[j].end - spans[i].start >= config.max_chars // 2
            if nxt.opens_paragraph and half_full and _paragraph_end(spans, j + 1) - spans[i].start > config.max_chars:
                break
            j += 1
        while j > i and spans[j].is_heading:  # never end a chunk on a dangling heading
            j -= 1
        windows.append((spans[i].start, spans[j].end))
        if j + 1 >= len(spans):
            break
        k = j + 1  # next chunk starts after j, stepping back over sentences that fit the overlap
        while k - 1 > i and spans[j].end - spans[k - 1].start <= config.overlap_chars and not spans[k].opens_paragraph:
            k -= 1
        i = k
    return windows


def _paragraph_end(spans: list[_Span], first: int) -> int:
    end = spans[first].end
    for k in range(first + 1, len(spans)):  # by index: slicing the tail made chunking quadratic in a document's length
        if spans[k].opens_paragraph:
            break
        end = spans[k].end
    return end


def chunk_document(doc: Document, config: ChunkConfig | None = None) -> list[Chunk]:
    """The document's chunks, in order, with exact character offsets."""
    config = config or ChunkConfig()
    spans: list[_Span] = []
    for span in _spans(doc.text):
        spans.extend(_split_long(span, doc.text, config.max_chars) if span.end - span.start > config.max_chars else [span])
    return [Chunk(doc_id=doc.doc_id, index=n, text=doc.text[s:e], start=s, end=e, title=doc.title, source=doc.source)
            for n, (s, e) in enumerate(_pack(spans, config))]
