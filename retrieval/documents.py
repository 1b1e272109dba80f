"""Loading a folder of documents: .txt, .md, .html, .pdf and .jsonl of {"id", "title", "text"}.

A file that cannot be read, holds no text, looks binary, is over the size cap, or is a
symlink leading out of the folder is reported in `LoadReport.skipped` (with a `SkipKind`)
and never stops the load. A document's id is its path relative to the folder (for .jsonl,
the record's own id), so re-indexing the same folder updates documents in place.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from pydantic import Field

from atelier.config import StrictModel
from atelier.errors import AtelierError

log = logging.getLogger(__name__)

SUFFIXES = (".txt", ".md", ".markdown", ".html", ".htm", ".pdf", ".jsonl")


class DocumentsConfig(StrictModel):
    follow_symlinks: bool = Field(False, description="Load files and folders that symlinks lead to outside the documents folder (by default they are skipped and reported, so a link to /etc/passwd is never indexed).")
    max_file_mb: float = Field(20.0, gt=0, description="Largest document to load, in MB (10**6 bytes): a file's size on disk, or the extracted text of a .pdf or of one .jsonl record. Bigger ones are skipped and reported, since one huge file can hold tens of thousands of chunks.")


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


class SkipKind(str, Enum):
    """Why a file was left out, in a few words (the CLI counts skips by kind)."""

    outside = "symlink leading outside the folder"
    binary = "binary content"
    too_large = "over the size cap"
    empty = "no text"
    unreadable = "unreadable"
    bad_record = "bad .jsonl record"
    duplicate = "duplicate id"


@dataclass(frozen=True, slots=True)
class Skipped:
    """A file (or .jsonl line) left out of the load: where, the sentence shown to the user, and its kind."""

    path: str
    reason: str
    kind: SkipKind

    def __iter__(self) -> Iterator[str]:
        """Unpacks as the (path, reason) pair that callers used before kinds existed."""
        return iter((self.path, self.reason))


def skip_summary(skipped: Sequence[Skipped], names: int = 3) -> str:
    """One line: how many were skipped, by kind, with the first few names of each kind."""
    by_kind: dict[SkipKind, list[str]] = {}
    for skip in skipped:
        by_kind.setdefault(skip.kind, []).append(skip.path)
    parts = []
    for kind, paths in sorted(by_kind.items(), key=lambda item: (-len(item[1]), item[0].value)):
        shown = ", ".join(paths[:names]) + (", ..." if len(paths) > names else "")
        parts.append(f"{len(paths)} {kind.value} ({shown})")
    return f"skipped {len(skipped)}: " + "; ".join(parts)


@dataclass
class LoadReport:
    documents: list[Document] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    def skip(self, path: str, reason: str, kind: SkipKind) -> None:
        self.skipped.append(Skipped(path, reason, kind))


class NotLoaded(Exception):
    """A file left out on purpose (binary, too large): `kind` and a message that says what to do."""

    def __init__(self, kind: SkipKind, reason: str):
        super().__init__(reason)
        self.kind, self.reason = kind, reason


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


_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
# Control bytes no text file is made of (tab, newlines, form feed and vertical tab are text);
# in latin-1 the C1 range 0x80-0x9f is control characters too.
_C0 = bytes(c for c in range(0x20) if chr(c) not in "\t\n\r\f\v") + b"\x7f"
_C1 = bytes(range(0x80, 0xA0))
_MAX_CONTROL_SHARE = 0.10  # random bytes decoded as latin-1 are ~23% controls; real text well under 1%


def _decode(raw: bytes, name: str) -> str:
    """The text of a file's bytes: UTF-8 (or UTF-16/32 with a byte-order mark), else latin-1.

    latin-1 decodes any bytes at all, so binary content is refused first: NUL bytes in the
    first 8 KB (git's test), or more than 10% control bytes (counted on the bytes: fast).
    """
    for bom, codec in _BOMS:
        if raw.startswith(bom):
            return raw.decode(codec)
    advice = f"binary content, not text; remove {name} from the folder or convert it to text"
    if b"\x00" in raw[:8192]:
        raise NotLoaded(SkipKind.binary, f"{advice} (it has NUL bytes)")
    try:
        text, controls = raw.decode("utf-8-sig"), _C0
    except UnicodeDecodeError:
        text, controls = raw.decode("latin-1"), _C0 + _C1
    share = (len(raw) - len(raw.translate(None, controls))) / max(len(raw), 1)
    if share > _MAX_CONTROL_SHARE:
        raise NotLoaded(SkipKind.binary, f"{advice} ({share:.0%} control characters)")
    return text


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 1e5 else f"{size / 1e3:.1f} KB"


def _check_size(size: int, config: DocumentsConfig, what: str = "") -> None:
    if size > config.max_file_mb * 1e6:
        raise NotLoaded(SkipKind.too_large, f"{what}{_megabytes(size)}, over the {config.max_file_mb:g} MB cap; "
                                            f"raise it with --max-file-mb {math.ceil(size / 1e6)} "
                                            f"(documents.max_file_mb in a config file)")


def _read_text(path: Path, config: DocumentsConfig) -> str:
    _check_size(path.stat().st_size, config)
    return _decode(path.read_bytes(), path.name)


def _load_plain(path: Path, config: DocumentsConfig) -> tuple[str, str]:
    text = _clean(_read_text(path, config))
    return _first_heading(text) or _title_from_name(path), text


_BLOCK_TAGS = ("p", "div", "section", "article", "li", "tr", "br", "h1", "h2", "h3", "h4", "h5", "h6",
               "pre", "blockquote", "table", "ul", "ol", "dd", "dt")


def _load_html(path: Path, config: DocumentsConfig) -> tuple[str, str]:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(_read_text(path, config), "html.parser")
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


def _load_pdf(path: Path, config: DocumentsConfig) -> tuple[str, str]:
    from pypdf import PdfReader

    reader = PdfReader(str(path))
    pages = [(page.extract_text() or "") for page in reader.pages]
    text = _clean("\n\n".join(pages))
    _check_size(len(text.encode("utf-8")), config, "extracted text of ")  # scans are big files with little text
    meta_title = (reader.metadata.title if reader.metadata else None) or ""
    return meta_title.strip() or _title_from_name(path), text


def _iter_jsonl(path: Path, rel: str, report: LoadReport, config: DocumentsConfig) -> Iterator[Document]:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{rel}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                report.skip(where, f"not valid JSON ({exc.msg})", SkipKind.bad_record)
                continue
            if not isinstance(record, dict) or not str(record.get("text") or "").strip():
                report.skip(where, 'needs an object with a non-empty "text"', SkipKind.bad_record)
                continue
            try:
                _check_size(len(str(record["text"]).encode("utf-8")), config, "a text of ")
            except NotLoaded as skip:
                report.skip(where, skip.reason, skip.kind)
                continue
            doc_id = str(record.get("id") or record.get("_id") or where)
            yield Document(doc_id=doc_id, title=str(record.get("title") or "").strip(),
                           text=_clean(str(record["text"])), source=where)


_LOADERS = {".txt": _load_plain, ".md": _load_plain, ".markdown": _load_plain,
            ".html": _load_html, ".htm": _load_html, ".pdf": _load_pdf}


def iter_files(folder: Path, follow_symlinks: bool = False, report: LoadReport | None = None) -> list[Path]:
    """Supported files under `folder`, recursively, hidden paths ignored, sorted.

    A symlink (to a file or a folder) that leads outside `folder` is left out and recorded in
    `report` unless `follow_symlinks`; a symlinked folder leading inside is not walked twice.
    """
    root = folder.resolve()
    files: list[Path] = []
    walked: set[Path] = set()  # real folders already walked: symlink loops end here

    def outside(path: Path) -> bool:
        return not path.resolve().is_relative_to(root)

    def leave_out(path: Path, what: str) -> None:
        if report is not None:
            report.skip(path.relative_to(folder).as_posix(),
                        f"{what} leading outside the folder (to {path.resolve()}); pass --follow-symlinks to load it",
                        SkipKind.outside)

    for here, dirnames, filenames in os.walk(folder, followlinks=follow_symlinks):
        current = Path(here)
        if current.resolve() in walked:
            dirnames[:] = []
            continue
        walked.add(current.resolve())
        kept = []
        for name in sorted(dirnames):
            sub = current / name
            if name.startswith("."):
                continue
            if sub.is_symlink() and not outside(sub):
                continue  # its files are found under their own path
            if sub.is_symlink() and not follow_symlinks:
                leave_out(sub, "symlinked folder")
                continue
            kept.append(name)
        dirnames[:] = kept
        for name in filenames:
            path = current / name
            if name.startswith(".") or path.suffix.lower() not in SUFFIXES:
                continue
            if path.is_symlink() and not path.exists():
                if report is not None:
                    report.skip(path.relative_to(folder).as_posix(), "unreadable: broken symlink (its target is missing)",
                                SkipKind.unreadable)
                continue
            if not path.is_file():
                continue
            if path.is_symlink() and not follow_symlinks and outside(path):
                leave_out(path, "symlink")
                continue
            files.append(path)
    return sorted(files)


def load_folder(folder: Path, config: DocumentsConfig | None = None) -> LoadReport:
    """Every supported document under `folder` (recursively, hidden paths ignored)."""
    folder = Path(folder)
    config = config or DocumentsConfig()
    if not folder.is_dir():
        raise AtelierError(f"{folder} is not a folder; pass a directory of .txt, .md, .html, .pdf or .jsonl files")
    report = LoadReport()
    for path in iter_files(folder, config.follow_symlinks, report):
        rel = path.relative_to(folder).as_posix()
        try:
            if path.suffix.lower() == ".jsonl":
                report.documents.extend(_iter_jsonl(path, rel, report, config))
                continue
            title, text = _LOADERS[path.suffix.lower()](path, config)
        except NotLoaded as skip:
            report.skip(rel, skip.reason, skip.kind)
            continue
        except Exception as exc:  # a broken file is reported, never fatal
            log.debug("could not read %s", path, exc_info=True)
            report.skip(rel, f"unreadable: {type(exc).__name__}: {exc}"[:200], SkipKind.unreadable)
            continue
        if not text:
            report.skip(rel, "no text", SkipKind.empty)
            continue
        report.documents.append(Document(doc_id=rel, title=title, text=text, source=str(path)))
    seen: set[str] = set()
    unique = []
    for doc in report.documents:
        if doc.doc_id in seen:
            report.skip(doc.source, f"duplicate id {doc.doc_id!r}", SkipKind.duplicate)
            continue
        seen.add(doc.doc_id)
        unique.append(doc)
    report.documents = unique
    return report
