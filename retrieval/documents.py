"""Loading a folder of documents: .txt, .md, .html, .pdf and .jsonl of {"id", "title", "text"}.

A file that cannot be read, or holds no text, is reported in `LoadReport.skipped` and
never stops the load. A document's id is its path relative to the folder (for .jsonl, the
record's own id), so re-indexing the same folder updates documents in place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from atelier.errors import AtelierError

log = logging.getLogger(__name__)

SUFFIXES = (".txt", ".md", ".markdown", ".html", ".htm", ".pdf", ".jsonl")


@dataclass(frozen=True, slots=True)
class Document:
    doc_id: str
    title: str
    text: str
    source: str  # the file it came from (for .jsonl: "file.jsonl:line")

    @property
    def content_hash(self) -> str:
        digest = hashlib.sha256()
        for part in (self.title, self.text):
            digest.update(part.encode("utf-8"))
            digest.update(b"\x00")
        return digest.hexdigest()


@dataclass
class LoadReport:
    documents: list[Document] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


def _clean(text: str) -> str:
    """Normalise line endings and strip trailing spaces; keep paragraph breaks."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def _first_heading(text: str) -> str | None:
    for line in text.splitlines()[:20]:
        match = re.match(r"^\s{0,3}#{1,6}\s+(.+?)\s*#*\s*$", line)
        if match:
            return match.group(1).strip()
    return None


def _title_from_name(path: Path) -> str:
    return re.sub(r"[-_]+", " ", path.stem).strip().capitalize()


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _load_plain(path: Path) -> tuple[str, str]:
    text = _clean(_read_text(path))
    return _first_heading(text) or _title_from_name(path), text


_BLOCK_TAGS = ("p", "div", "section", "article", "li", "tr", "br", "h1", "h2", "h3", "h4", "h5", "h6",
               "pre", "blockquote", "table", "ul", "ol", "dd", "dt")


def _load_html(path: Path) -> tuple[str, str]:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(_read_text(path), "html.parser")
    for tag in soup(["script", "style", "noscript", "template", "svg"]):
        tag.decompose()
    title = soup.title.get_text(" ", strip=True) if soup.title else ""
    if soup.title:
        soup.title.decompose()
    for cell in soup.find_all(["td", "th"]):
        cell.append(" | ")
    for tag in soup.find_all(_BLOCK_TAGS):
        tag.insert_before("\n\n" if tag.name not in ("li", "tr", "br") else "\n")
    text = soup.get_text()
    text = "\n".join(re.sub(r"[ \t\xa0]+", " ", line).strip() for line in text.splitlines())
    heading = soup.find(["h1", "h2"])
    return title or (heading.get_text(" ", strip=True) if heading else _title_from_name(path)), _clean(text)


def _load_pdf(path: Path) -> tuple[str, str]:
    from pypdf import PdfReader

    reader = PdfReader(str(path))
    pages = [(page.extract_text() or "") for page in reader.pages]
    text = _clean("\n\n".join(pages))
    meta_title = (reader.metadata.title if reader.metadata else None) or ""
    return meta_title.strip() or _title_from_name(path), text


def _iter_jsonl(path: Path, rel: str, report: LoadReport) -> Iterator[Document]:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{rel}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                report.skipped.append((where, f"not valid JSON ({exc.msg})"))
                continue
            if not isinstance(record, dict) or not str(record.get("text") or "").strip():
                report.skipped.append((where, 'needs an object with a non-empty "text"'))
                continue
            doc_id = str(record.get("id") or record.get("_id") or where)
            yield Document(doc_id=doc_id, title=str(record.get("title") or "").strip(),
                           text=_clean(str(record["text"])), source=where)


_LOADERS = {".txt": _load_plain, ".md": _load_plain, ".markdown": _load_plain,
            ".html": _load_html, ".htm": _load_html, ".pdf": _load_pdf}


def iter_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def load_folder(folder: Path) -> LoadReport:
    """Every supported document under `folder` (recursively, hidden paths ignored)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AtelierError(f"{folder} is not a folder; pass a directory of .txt, .md, .html, .pdf or .jsonl files")
    report = LoadReport()
    for path in iter_files(folder):
        rel = path.relative_to(folder).as_posix()
        try:
            if path.suffix.lower() == ".jsonl":
                report.documents.extend(_iter_jsonl(path, rel, report))
                continue
            title, text = _LOADERS[path.suffix.lower()](path)
        except Exception as exc:  # a broken file is reported, never fatal
            log.debug("could not read %s", path, exc_info=True)
            report.skipped.append((rel, f"unreadable: {type(exc).__name__}: {exc}"[:200]))
            continue
        if not text:
            report.skipped.append((rel, "no text"))
            continue
        report.documents.append(Document(doc_id=rel, title=title, text=text, source=str(path)))
    seen: set[str] = set()
    unique = []
    for doc in report.documents:
        if doc.doc_id in seen:
            report.skipped.append((doc.source, f"duplicate id {doc.doc_id!r}"))
            continue
        seen.add(doc.doc_id)
        unique.append(doc)
    report.documents = unique
    return report
