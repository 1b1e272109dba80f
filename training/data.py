"""Training datasets from documents: DAPT text, SFT pairs and DPO preference pairs.

`build_datasets` reads top to bottom: split the documents, find the domain keywords,
generate (offline extraction, plus the teacher when there is one), filter, write. The
files are the TRL standard formats, so the training stages load them as they are:

    dapt/{train,heldout}.jsonl  {"text", "source"}                          language modelling
    sft/{train,heldout}.jsonl   {"messages": [user, assistant], "source", "kind"}
    dpo/{train,heldout}.jsonl   {"prompt": [user], "chosen": [assistant], "rejected": [assistant],
                                 "source", "kind"}                           conversational preference
    keywords.json, manifest.json

The split is by source document, so no held-out document is ever trained on, and a
training example that near-duplicates a held-out one (the same fact repeated in two
manuals) is dropped from training too. Held-out SFT answers are all different from each
other, so any of them can serve as a distractor for another question.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field, computed_field, model_validator

from atelier.config import StrictModel, retire_key
from atelier.errors import AtelierError
from atelier.home import atomic_write_text
from retrieval.chunking import ChunkConfig, chunk_document
from retrieval.documents import Document
from retrieval.keywords import Keyword, extract_keywords
from training import facts, filters, offline
from training.filters import Passage, PreferencePair, QAPair

if TYPE_CHECKING:
    from training.teacher import Teacher

log = logging.getLogger(__name__)
Progress = Callable[[str, int, int], None]
SPLITS = ("train", "heldout")
GENERATOR_VERSION = 2  # bump when the same inputs would now give different datasets
# No overlap: chunks are DAPT text as they are, and overlapping text would be trained on twice.
DEFAULT_CHUNKING = ChunkConfig(max_chars=1200, overlap_chars=0)


class DataConfig(StrictModel):
    heldout_fraction: float = Field(0.2, gt=0, lt=1, description="Share of the documents' text held out for evaluation "
                                    "(whole documents; at least one document, never all).")
    seed: int = Field(0, description="Seed of the held-out choice and of the corruptions; same seed, same datasets.")
    keywords_top_k: int = Field(200, ge=10, description="How many domain keywords to extract and use as guidance.")
    max_sft_pairs_per_chunk: int = Field(12, ge=1, description="Most offline instruction pairs drawn from one chunk.")
    max_dpo_pairs_per_chunk: int = Field(6, ge=0, description="Most preference pairs drawn from one chunk.")
    fact_questions: int = Field(2, ge=0, le=4, description="Question forms asked of each fact (a value with its "
                                "unit, a code, a table cell) besides the fill-in-the-blank one; 0: none.")
    max_fact_pairs_per_chunk: int = Field(6, ge=0, description="Most fact questions drawn from one chunk.")
    fact_restatements: int = Field(1, ge=0, le=4, description="Extra DAPT texts restating each section's facts in "
                                   "other shapes (a fact sheet, question-and-answer notes); 0: none.")
    teacher_pairs_per_chunk: int = Field(4, ge=1, description="Question/answer pairs the teacher writes per chunk.")
    teacher_keywords_per_chunk: int = Field(8, ge=0, description="Keywords named in each teacher prompt.")
    teacher_concurrency: int = Field(2, ge=1, description="Teacher requests in flight at once.")
    offline_with_teacher: bool = Field(True, description="With a teacher, also keep the offline pairs (cheap, and "
                                       "grounded by construction).")
    min_question_chars: int = Field(10, ge=1, description="Shortest question kept.")
    max_question_chars: int = Field(1000, ge=10, description="Longest question kept.")
    min_answer_chars: int = Field(1, ge=1, description="Shortest answer kept (a table value can be one character).")
    max_answer_chars: int = Field(1200, ge=10, description="Longest answer kept.")
    min_passage_chars: int = Field(80, ge=1, description="Shortest DAPT passage kept.")
    max_passage_chars: int = Field(8000, ge=100, description="Longest DAPT passage kept.")
    near_duplicate_threshold: float = Field(0.85, ge=0.5, le=0.95, description="MinHash Jaccard similarity above "
                                            "which two examples count as near duplicates.")
    grounding_threshold: float = Field(0.8, ge=0, le=1, description="Least share of an answer's content words that "
                                       "must occur in its source chunk.")
    enrichment_grounding_threshold: float = Field(0.6, ge=0, le=1, description="The same for a teacher's rewritten "
                                                  "passage, which may add connecting words.")

    @model_validator(mode="before")
    @classmethod
    def _drop_self_play(cls, data: Any) -> Any:
        """`self_play_fraction` (older configs and manifests) never took effect: no run gave the data step a base model."""
        return retire_key(data, "self_play_fraction",
                          "data.self_play_fraction is ignored and can be deleted: it never took effect")

    def bounds(self) -> filters.Bounds:
        return filters.Bounds(**{f: getattr(self, f) for f in filters.Bounds.__dataclass_fields__})


class DataFile(BaseModel):
    rows: int
    sha256: str


class DataManifest(BaseModel):
    """What was built, from what, and why examples were dropped; `content_hash` covers every file."""

    generator: str = Field(description='"offline" or "teacher:<provider:model>".')
    inputs_hash: str = Field(description="inputs_fingerprint() of the build: same value, same datasets.")
    teacher: str | None
    files: dict[str, DataFile] = Field(description="Relative path -> row count and sha256.")
    kinds: dict[str, dict[str, int]] = Field(description="Relative path -> example count per kind.")
    rejected: dict[str, int] = Field(description="Dropped examples and teacher answers, by stage.reason.")
    train_sources: list[str]
    heldout_sources: list[str]
    keywords: list[str]
    coverage: dict[str, float | int] = Field(default_factory=dict, description="How often the training data states "
                                             "the training documents' facts (training.facts.coverage).")
    config: DataConfig
    chunking: ChunkConfig

    @computed_field
    @property
    def content_hash(self) -> str:
        digest = hashlib.sha256()
        for path in sorted(self.files):
            digest.update(f"{path}\t{self.files[path].sha256}\n".encode())
        return digest.hexdigest()


def inputs_fingerprint(docs: Sequence[Document], config: DataConfig, chunking: ChunkConfig | None = None,
                       teacher_name: str | None = None) -> str:
    """A hash of everything that decides the datasets, so a pipeline can skip an unchanged build."""
    digest = hashlib.sha256(f"v{GENERATOR_VERSION}\n{teacher_name}\n".encode())
    digest.update(config.model_dump_json().encode())
    digest.update((chunking or DEFAULT_CHUNKING).model_dump_json().encode())
    for doc in sorted(docs, key=lambda d: d.doc_id):
        digest.update(f"{doc.doc_id}\t{doc.content_hash}\n".encode())
    return digest.hexdigest()


def load_manifest(out_dir: Path) -> DataManifest | None:
    """The manifest of a previous build in `out_dir`, or None when there is none (or it is unreadable)."""
    path = Path(out_dir) / "manifest.json"
    try:
        return DataManifest.model_validate_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _doc_order(doc: Document, seed: int) -> str:
    """A per-document random key: adding a document never moves the others between splits."""
    return hashlib.sha256(f"{seed}:{doc.doc_id}".encode()).hexdigest()


def split_documents(docs: Sequence[Document], fraction: float, seed: int) -> tuple[list[Document], list[Document]]:
    """(train, held-out) by whole documents, the held-out ones holding about `fraction` of the text.

    Counting text rather than documents keeps the held-out share steady when document
    sizes differ a lot (a 1 kB service bulletin next to a 17 kB manual).
    """
    if len(docs) < 2:
        raise AtelierError(f"{len(docs)} document(s) given; training data needs at least 2, so that one can be held "
                           f"out for evaluation: add documents to the folder")
    target = fraction * sum(len(d.text) for d in docs)
    heldout: list[Document] = []
    size = 0
    for doc in sorted(docs, key=lambda d: _doc_order(d, seed)):
        if size >= target or len(heldout) == len(docs) - 1:
            break
        if size + len(doc.text) <= 1.5 * target:  # a document that would overshoot is skipped
            heldout.append(doc)
            size += len(doc.text)
    if not heldout:  # every document is too big to hold out alone: hold out the smallest
        heldout = [min(docs, key=lambda d: (len(d.text), _doc_order(d, seed)))]
    held = {d.doc_id for d in heldout}
    return [d for d in docs if d.doc_id not in held], [d for d in docs if d.doc_id in held]


def _headings(doc: Document, chunks: Sequence) -> list[str]:
    """The section heading in force at the start of each chunk."""
    marks = [(u.start, u.text) for u in offline.parse_units(doc.text) if u.kind == "heading"]
    return [next((text for start, text in reversed(marks) if start <= c.start), "") for c in chunks]


def _offline(docs: Sequence[Document], chunks: dict[str, list], keywords: list[str], config: DataConfig,
             progress: Progress, stage: str) -> tuple[list[Passage], list[QAPair], list[PreferencePair]]:
    passages, pairs, preferences = [], [], []
    for n, doc in enumerate(docs, 1):
        passages += offline.dapt_passages(doc, chunks[doc.doc_id])
        passages += facts.restatements(doc, keywords, config.fact_restatements)
        found = offline.extract_pairs(doc, chunks[doc.doc_id], keywords, config.max_sft_pairs_per_chunk)
        if config.fact_questions:  # first, so that the per-chunk cap of preference pairs favours wrong facts
            found = facts.fact_pairs(doc, chunks[doc.doc_id], keywords, config.fact_questions,
                                     config.max_fact_pairs_per_chunk) + found
        pairs += found
        preferences += offline.preference_pairs(found, keywords, offline.table_columns(doc), config.seed,
                                                config.max_dpo_pairs_per_chunk)
        progress(stage, n, len(docs))
    return passages, pairs, preferences


def _guided(teacher: Teacher, docs: Sequence[Document], chunks: dict[str, list], keywords: list[str],
            config: DataConfig, progress: Progress):
    from training.prompts import ChunkTask, chunk_keywords, guided_generation

    tasks = [ChunkTask(d.doc_id, c.index, d.title, heading, c.text,
                       chunk_keywords(c.text, keywords, config.teacher_keywords_per_chunk))
             for d in docs for c, heading in zip(chunks[d.doc_id], _headings(d, chunks[d.doc_id]))]
    return guided_generation(teacher, tasks, pairs_per_chunk=config.teacher_pairs_per_chunk,
                             preferences_per_chunk=config.max_dpo_pairs_per_chunk,
                             grounding_threshold=config.grounding_threshold,
                             concurrency=config.teacher_concurrency, progress=progress)


def _counts(rejected: Counter[str], prefix: str = "") -> str:
    found = {k: v for k, v in sorted(rejected.items()) if k.startswith(prefix)}
    return ", ".join(f"{k}: {v}" for k, v in found.items()) or "none rejected"


def _filter(split: dict[str, list], config: DataConfig, rejected: Counter[str]) -> dict[str, list]:
    bounds = config.bounds()
    return {"dapt": filters.filter_passages(split["dapt"], bounds, rejected),
            "sft": filters.filter_sft(split["sft"], bounds, rejected),
            "dpo": filters.filter_dpo(split["dpo"], bounds, rejected)}


def _rows(stage: str, items: list) -> list[dict[str, Any]]:
    if stage == "dapt":
        return [{"text": p.text, "source": p.source} for p in items]
    if stage == "sft":
        return [{"messages": [{"role": "user", "content": p.question}, {"role": "assistant", "content": p.answer}],
                 "source": p.source, "kind": p.kind} for p in items]
    return [{"prompt": [{"role": "user", "content": p.question}],
             "chosen": [{"role": "assistant", "content": p.chosen}],
             "rejected": [{"role": "assistant", "content": p.rejected}], "source": p.source, "kind": p.kind}
            for p in items]


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> DataFile:
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    atomic_write_text(path, text)
    return DataFile(rows=len(rows), sha256=hashlib.sha256(text.encode("utf-8")).hexdigest())


def _check_teacher_output(teacher: Teacher, kept: dict[str, dict[str, list]], rejected: Counter[str]) -> None:
    made = sum(1 for split in kept.values() for items in split.values() for item in items
               if item.kind in ("enriched", "teacher") or item.kind.startswith("teacher/"))
    if made == 0:
        raise AtelierError(f"teacher {teacher.name} produced no usable output (rejected: {_counts(rejected)}); "
                           f"try a stronger teacher model or run without --teacher")


def _check_nonempty(kept: dict[str, dict[str, list]], rejected: Counter[str]) -> None:
    empty = [f"{stage}/{split}" for split in SPLITS for stage in ("dapt", "sft", "dpo") if not kept[split][stage]]
    if empty:
        raise AtelierError(f"no examples survived for {', '.join(empty)} (rejected: {_counts(rejected)}); add "
                           f"documents with more prose, or change heldout_fraction so each split has enough text")


def _generate(train_docs: Sequence[Document], heldout_docs: Sequence[Document], chunks: dict[str, list],
              terms: list[str], config: DataConfig, teacher: Teacher | None, rejected: Counter[str],
              progress: Progress) -> dict[str, dict[str, list]]:
    """Unfiltered examples per split and stage: offline ones, then the teacher's."""
    made: dict[str, dict[str, list]] = {}
    for name, split_docs in zip(SPLITS, (train_docs, heldout_docs)):
        passages, pairs, preferences = _offline(split_docs, chunks, terms, config, progress, f"offline.{name}")
        if teacher is not None and not config.offline_with_teacher:
            pairs, preferences = [], []
        made[name] = {"dapt": passages, "sft": pairs, "dpo": preferences}
    if teacher is not None:
        guided = _guided(teacher, [*train_docs, *heldout_docs], chunks, terms, config, progress)
        rejected.update(guided.rejected)
        held = {d.doc_id for d in heldout_docs}
        for stage, items in (("dapt", guided.passages), ("sft", guided.pairs), ("dpo", guided.preferences)):
            for item in items:
                made["heldout" if item.source in held else "train"][stage].append(item)
    return made


def _filter_all(made: dict[str, dict[str, list]], config: DataConfig, rejected: Counter[str]) -> dict[str, dict]:
    """Filtered examples; training ones that repeat a held-out one are dropped, held-out answers made unique."""
    kept = {name: _filter(made[name], config, rejected) for name in SPLITS}
    keys: dict[str, Callable[[Any], str]] = {"dapt": lambda p: p.text, "sft": lambda p: f"{p.question}\n{p.answer}",
                                             "dpo": lambda p: f"{p.question}\n{p.chosen}"}
    for stage, key in keys.items():
        kept["train"][stage] = filters.drop_overlap(kept["train"][stage], kept["heldout"][stage], key,
                                                    config.near_duplicate_threshold, rejected, stage)
    kept["heldout"]["sft"] = filters.unique_answers(kept["heldout"]["sft"], rejected, "sft.heldout")
    return kept


def build_datasets(docs: list[Document], out_dir: Path, config: DataConfig, *, chunking: ChunkConfig | None = None,
                   teacher: Teacher | None = None, progress: Progress | None = None) -> DataManifest:
    """Write DAPT, SFT and DPO datasets (train and held-out) for `docs` to `out_dir`, and their manifest.

    `progress(stage, done, total)` is called as work advances.
    """
    if not docs:
        raise AtelierError("no documents to build training data from; point the command at a folder of "
                           ".md, .txt, .html, .pdf or .jsonl files")
    report = progress or (lambda stage, done, total: None)
    chunking = chunking or DEFAULT_CHUNKING
    if teacher is not None:
        teacher.check()
    train_docs, heldout_docs = split_documents(docs, config.heldout_fraction, config.seed)
    report("split", 1, 1)
    keywords = extract_keywords(train_docs, top_k=config.keywords_top_k)
    report("keywords", 1, 1)
    chunks = {d.doc_id: chunk_document(d, chunking) for d in docs}
    rejected: Counter[str] = Counter()
    made = _generate(train_docs, heldout_docs, chunks, [k.term for k in keywords], config, teacher, rejected, report)
    kept = _filter_all(made, config, rejected)
    report("filter", 1, 1)
    if teacher is not None:
        _check_teacher_output(teacher, kept, rejected)
    _check_nonempty(kept, rejected)
    fingerprint = inputs_fingerprint(docs, config, chunking, teacher.name if teacher else None)
    return _write(Path(out_dir), kept, keywords, rejected, config, chunking, teacher, train_docs, heldout_docs,
                  fingerprint, report)


def _training_texts(train: dict[str, list]) -> list[str]:
    """Every text the training stages read: DAPT passages and each SFT question with its answer."""
    return [p.text for p in train["dapt"]] + [f"{p.question}\n{p.answer}" for p in train["sft"]]


def _write(out_dir: Path, kept: dict[str, dict[str, list]], keywords: list[Keyword], rejected: Counter[str],
           config: DataConfig, chunking: ChunkConfig, teacher: Teacher | None, train_docs: Sequence[Document],
           heldout_docs: Sequence[Document], fingerprint: str, progress: Progress) -> DataManifest:
    files, kinds = {}, {}
    jobs = [(stage, split) for stage in ("dapt", "sft", "dpo") for split in SPLITS]
    for n, (stage, split) in enumerate(jobs, 1):
        rel = f"{stage}/{split}.jsonl"
        files[rel] = _write_jsonl(out_dir / rel, _rows(stage, kept[split][stage]))
        kinds[rel] = dict(sorted(Counter(item.kind for item in kept[split][stage]).items()))
        progress("write", n, len(jobs) + 1)
    keyword_text = json.dumps([{"term": k.term, "score": k.score, "count": k.count} for k in keywords], indent=1,
                              ensure_ascii=False) + "\n"
    atomic_write_text(out_dir / "keywords.json", keyword_text)
    files["keywords.json"] = DataFile(rows=len(keywords), sha256=hashlib.sha256(keyword_text.encode()).hexdigest())
    manifest = DataManifest(
        generator=f"teacher:{teacher.name}" if teacher else "offline", inputs_hash=fingerprint,
        teacher=teacher.name if teacher else None,
        files=files, kinds=kinds, rejected=dict(sorted(rejected.items())),
        train_sources=[d.doc_id for d in train_docs], heldout_sources=[d.doc_id for d in heldout_docs],
        keywords=[k.term for k in keywords], config=config, chunking=chunking,
        coverage=facts.coverage(train_docs, [k.term for k in keywords], _training_texts(kept["train"])))
    atomic_write_text(out_dir / "manifest.json", manifest.model_dump_json(indent=2) + "\n")
    progress("write", len(jobs) + 1, len(jobs) + 1)
    log.info("wrote datasets to %s: %s", out_dir, {k: v.rows for k, v in files.items()})
    return manifest
