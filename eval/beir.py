"""Reading a BEIR-layout dataset: corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from atelier.errors import AtelierError
from atelier.jsonl import iter_jsonl
from retrieval.documents import Document


@dataclass
class BeirData:
    corpus: list[Document]
    queries: dict[str, str]  # only queries that have judgements in the split
    qrels: dict[str, dict[str, int]]


def _jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise AtelierError(f"{path} not found; a BEIR folder holds corpus.jsonl, queries.jsonl and qrels/SPLIT.tsv")
    return [row for _, row in iter_jsonl(path, fix="a BEIR file holds one JSON object per line")]


def load_beir(folder: Path, split: str) -> BeirData:
    folder = Path(folder)
    qrels_path = folder / "qrels" / f"{split}.tsv"
    if not qrels_path.is_file():
        have = sorted(p.stem for p in (folder / "qrels").glob("*.tsv")) if (folder / "qrels").is_dir() else []
        raise AtelierError(f"no judgements for split {split!r} at {qrels_path}; splits here: {', '.join(have) or 'none'}")
    qrels: dict[str, dict[str, int]] = {}
    with qrels_path.open(encoding="utf-8") as handle:
        for row in csv.reader(handle, delimiter="\t"):
            if len(row) < 3 or row[0] == "query-id":
                continue
            qrels.setdefault(row[0], {})[row[1]] = int(row[2])
    corpus = [Document(doc_id=str(r["_id"]), title=str(r.get("title") or ""), text=str(r.get("text") or ""),
                       source=f"corpus.jsonl:{r['_id']}") for r in _jsonl(folder / "corpus.jsonl")]
    corpus = [d for d in corpus if d.text.strip() or d.title.strip()]
    queries = {str(r["_id"]): str(r["text"]) for r in _jsonl(folder / "queries.jsonl") if str(r["_id"]) in qrels}
    if not queries:
        raise AtelierError(f"none of the queries in {folder / 'queries.jsonl'} has judgements in split {split!r}")
    return BeirData(corpus=corpus, queries=queries, qrels={q: qrels[q] for q in queries})
