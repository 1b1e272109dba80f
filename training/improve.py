"""`atelier specialist improve NAME`: feedback becomes preference pairs, a DPO round trains the next
version, and a regression gate decides whether it replaces the current one.

The round, top to bottom:

1. pairs: from the feedback on this specialist's own route (training/improve_pairs.py; the round's
   teacher, when it has one, writes the chosen answers of thumbs-down without a correction from the
   retrieved passages) and from `--pairs` files; filtered and deduplicated as the pipeline does; exam
   questions excluded; a seeded share of the feedback pairs held out; refused below `min_pairs`.
   `--dry-run` stops here.
2. train: one preference round (dpo, or simpo / orpo / kto) continuing the current adapter; the
   current version is the reference model (training/dpo.py explains why that is TRL's default).
3. gate: current and candidate on the held-out split, the held-out feedback pairs, the exam, and
   all feedback pairs (training/improve_gate.py).
4. register: a new version with its lineage (parent, feedback ids, pair files with SHA-256, the
   gate's result): active when the gate accepts it, else kept as a candidate with the reasons.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import Field

from atelier.config import StrictModel
from atelier.errors import AtelierError
from atelier.home import atelier_home, atomic_write_text
from eval.specialist import SpecialistEvalConfig
from training.dpo import DpoConfig
from training.improve_gate import ImproveVerdict, compare_set, decide
from training.improve_pairs import (
    APPROVED,
    PairSet,
    clean,
    feedback_id,
    pairs_from_feedback,
    read_pair_file,
    sha256_of,
    split_heldout,
    trl_row,
    with_rejected,
)
from training.pipeline import PipelineHooks
from training.teacher import Teacher, TeacherConfig


class ImproveConfig(StrictModel):
    """Settings of one improvement round (`--config` YAML under the key `improve`, or these flags)."""

    min_pairs: int = Field(
        8,
        ge=1,
        description="Fewest training pairs a round runs on; below it the round is "
        "refused (collect more feedback, or pass --pairs).",
    )
    heldout_fraction: float = Field(
        0.2,
        ge=0,
        lt=1,
        description="Share of the feedback pairs kept out of "
        "training and used by the gate (none below 5 feedback pairs).",
    )
    tolerance: float = Field(
        0.05,
        ge=0,
        description="Largest drop the gate lets pass on any set even when the "
        "paired test cannot call it significant: absolute for scores, relative for perplexity.",
    )
    search_k: int = Field(
        3,
        ge=1,
        le=20,
        description="Passages retrieved for a thumbs-down without a correction "
        "(the teacher answers from them; without a teacher its chosen answer is their best-grounded sentence).",
    )
    index: str | None = Field(None, description="Search index for grounded answers; unset: the default index.")
    teacher: TeacherConfig | None = Field(
        None,
        description="Teacher that writes the chosen answer of a thumbs-down without a correction, from the "
        "retrieved passages only (kept when the grounding filter finds it in them); unset: the teacher the "
        "specialist was built with when teacher_from_specialist is true.",
    )
    teacher_from_specialist: bool = Field(
        False,
        description="With `teacher` unset, use the teacher the specialist was built with (its record's config; "
        "checked before the round starts). Off by default: a round sends the users' chat questions to the "
        "teacher, not only the documents `specialist add` sent; without a teacher, chosen answers are passage "
        "sentences.",
    )
    replay: float = Field(
        0.0,
        ge=0,
        le=10,
        description="Rehearsal: pairs drawn from the specialist's own DPO training data and mixed into the round, "
        "per pair of feedback trained on (1: as many; 0: none). The round keeps practising what the specialist "
        "already knew, which limits what it forgets; each epoch costs that much more.",
    )
    seed: int = Field(0, description="Seed of the held-out split of the feedback pairs and of the replayed pairs.")
    eval: SpecialistEvalConfig | None = Field(
        None,
        description="How the gate scores both versions (caps, batch sizes, the paired test's alpha); "
        "unset: the specialist's own evaluation settings, as it was registered with.",
    )
    dpo: DpoConfig = Field(
        default_factory=lambda: DpoConfig(eval_heldout=False),
        description="The preference stage of the round; unset steps and learning rate follow the recipe for the base.",
    )


@dataclass
class ImproveResult:
    name: str
    parent_version: int
    pairs: PairSet
    run_dir: Path | None = None
    verdict: ImproveVerdict | None = None
    record: Any = None  # the new SpecialistRecord (active or candidate); None on a dry run
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def activated(self) -> bool:
        return self.record is not None and not self.record.candidate


def _specialist_config(record):
    from training.config import SpecialistConfig

    return SpecialistConfig.model_validate(record.config) if record.config else SpecialistConfig()


def _artifacts(record, spec) -> tuple[Path, Path | None, Any]:
    """(model folder, adapter or None, LoraSettings) of a registered version, as training continues it."""
    if record.full_model:
        return Path(record.model_path), None, spec.lora.model_copy(update={"method": "full"})
    return Path(record.base_model), Path(record.adapter_path), spec.lora


def heldout_dir(record) -> Path:
    """The held-out split of the run the specialist was built in (the gate's first set)."""
    data = Path(record.run_dir or "") / "data"
    if not record.run_dir or not (data / "sft" / "heldout.jsonl").is_file():
        raise AtelierError(
            f"the held-out split of {record.name!r} v{record.version} is gone ({data}); the "
            "regression gate needs it: rebuild the specialist with `atelier specialist add`"
        )
    return data


# ----------------------------------------------------------------------------- 1. pairs


def collect_pairs(
    record,
    config: ImproveConfig,
    *,
    from_feedback: bool,
    pair_files: list[Path],
    exam_questions: list[str],
    since: str | None,
    home: Path,
    base_answers,
    progress=None,
    spec=None,
) -> PairSet:
    """Every pair of the round, cleaned and split; `base_answers(prompts)` writes the base's answers and
    `progress(what, done, total)` follows the teacher's answers; `spec` is the record's SpecialistConfig."""
    from atelier.feedback import FeedbackStore

    spec = spec or _specialist_config(record)
    found = PairSet()
    raw = []
    if from_feedback:
        path = home / "feedback.sqlite"
        if not path.is_file():
            raise AtelierError(
                f"no feedback recorded yet ({path} does not exist); rate answers of "
                f"specialist/{record.name} in the web chat or with POST /v1/feedback, or pass --pairs"
            )
        store = FeedbackStore(path)
        try:
            rows = store.for_route(f"specialist:{record.name}", since)
        finally:
            store.close()
        if not rows and not pair_files:
            raise AtelierError(
                f"no feedback on specialist {record.name!r}{f' since {since}' if since else ''}: "
                "only ratings of its own answers count; rate some, or pass --pairs FILE"
            )
        teacher = open_teacher(record.name, spec, config)  # before the search encoder or any model loads
        found.teacher = teacher.name if teacher else None
        try:
            pairs, dropped = pairs_from_feedback(
                rows,
                _searcher(config),
                config.search_k,
                teacher=teacher,
                concurrency=spec.data.teacher_concurrency,
                progress=progress,
            )
        finally:
            if teacher is not None:
                teacher.close()
        found.rejected.update(dropped)
        raw += pairs
    for path in pair_files:
        raw += read_pair_file(path)
        found.files[str(Path(path).resolve())] = sha256_of(path)
    approved = [p for p in raw if p.kind == APPROVED]
    if approved:
        answers = base_answers([p.question for p in approved])
        by_id = {id(p): a for p, a in zip(approved, answers)}
        raw = [with_rejected(p, by_id[id(p)]) if id(p) in by_id else p for p in raw]
    bounds = spec.data.bounds()
    kept = clean(raw, bounds, exam_questions, found.rejected)
    found.train, found.heldout = split_heldout(kept, config.heldout_fraction, config.seed)
    found.feedback_ids = sorted(i for p in kept if (i := feedback_id(p)) is not None)
    return found


def open_teacher(name: str, spec, config: ImproveConfig) -> Teacher | None:
    """The round's teacher, reached once: `config.teacher`, else the one the specialist was built with (when
    `teacher_from_specialist`), else None. One that does not answer is a one-line error naming the way out.

    Falling back to the specialist's own teacher keeps a round's chosen answers as good as the data it
    was built from; it is opt-in because it sends the users' questions, not only the documents, to
    that teacher (which may be a hosted API the operator approved for documents only)."""
    settings = config.teacher
    if settings is None and config.teacher_from_specialist:
        settings = spec.teacher
    if settings is None:
        return None
    teacher = None
    try:
        teacher = Teacher(settings)
        teacher.check()
    except AtelierError as exc:
        if teacher is not None:
            teacher.close()
        if config.teacher is not None:
            raise
        raise AtelierError(
            f"{exc} ({name!r} was built with teacher {settings.name}, which teacher_from_specialist makes the "
            "round use; pass --teacher provider:model for another, or --no-teacher to take passage sentences)"
        ) from None
    return teacher


def _searcher(config: ImproveConfig):
    """search(question, k) -> passage texts; [] when there is no index. Opened on first use (loads the encoder)."""
    opened: list = []

    def search(question: str, k: int) -> list[str]:
        if not opened:
            from retrieval.config import RetrievalConfig, Searcher

            try:
                opened.append(Searcher.open(RetrievalConfig(**({"index": config.index} if config.index else {}))))
            except AtelierError:
                opened.append(None)
        return [] if opened[0] is None else [hit.text for hit in opened[0].search(question, k=k)]

    return search


def check_enough(pairs: PairSet, config: ImproveConfig, name: str) -> None:
    if len(pairs.train) < config.min_pairs:
        why = ", ".join(f"{k} {v}" for k, v in sorted(pairs.rejected.items())) or "none dropped"
        raise AtelierError(
            f"only {len(pairs.train)} training pair(s) for {name!r} (min_pairs is "
            f"{config.min_pairs}; dropped: {why}); collect more feedback, add --pairs FILE, "
            "or lower --min-pairs"
        )


# ----------------------------------------------------------------------------- 3. the gate


def _feedback_items(pairs: list) -> list:
    """Feedback pairs as QA items (the chosen answer is the reference): multiple choice among the chosen answers."""
    from eval.specialist import QAItem

    return [QAItem([{"role": "user", "content": p.question}], p.chosen, p.kind) for p in pairs]


def _side(model_dir: Path, adapters: list[Path], data_dir: Path, pairs: PairSet, exam, eval_config) -> dict:
    """Per-item outcomes of one version on every gate set."""
    from eval.specialist import evaluate_loaded, load_for_eval, mcq_accuracy, preference_accuracy

    model, tokenizer = load_for_eval(model_dir, adapters or None, eval_config.device)
    scoring = eval_config.model_copy(update={"max_generation_items": 0, "max_preference_items": 0})  # not gated on
    heldout = evaluate_loaded(model, tokenizer, data_dir, scoring)["outcomes"]
    every = eval_config.model_copy(update={"max_preference_items": 10**6, "max_mcq_items": 10**6})  # all, in order
    outcomes = {"heldout": {m: v for m, v in heldout.items() if m in eval_config.gate.required}}
    for name, rows in (("feedback", pairs.feedback), ("feedback_heldout", pairs.heldout)):
        outcomes[name] = {}
        if rows:
            for scored in (
                mcq_accuracy(model, tokenizer, _feedback_items(rows), every),
                preference_accuracy(model, tokenizer, [trl_row(p) for p in rows], every),
            ):
                outcomes[name] |= scored.get("outcomes", {})
    del model
    if exam is not None:
        from eval.exam_eval import run_system
        from eval.systems import LocalModel

        run = run_system(LocalModel("version", model_dir, adapters, config=eval_config), exam)
        outcomes["exam"] = {
            m: [getattr(run, k)[i.id] for i in exam.items if i.id in getattr(run, k)]
            for m, k in (("mcq_accuracy", "mcq"), ("contains", "contains"))
            if m in eval_config.gate.required_exam and getattr(run, k)
        }
    return outcomes


def gate(current: dict, candidate: dict, pairs: PairSet, exam, eval_config, tolerance: float) -> ImproveVerdict:
    """Compare the two versions' outcomes set by set (see training/improve_gate.py)."""
    feedback_ids = {"preference_accuracy": [p.source for p in pairs.feedback]}
    ids = {
        "heldout": {
            "mcq_accuracy": [f"heldout-mcq-{i}" for i in range(len(current["heldout"].get("mcq_accuracy", [])))]
        },
        "feedback": feedback_ids,
        "feedback_heldout": {"preference_accuracy": [p.source for p in pairs.heldout]},
    }
    if exam is not None:
        ids["exam"] = {
            m: [i.id for i in exam.items if (m != "mcq_accuracy" or i.is_mcq) and (m != "contains" or i.is_open)]
            for m in ("mcq_accuracy", "contains")
        }
    sets = {
        name: compare_set(name, current[name], candidate[name], eval_config.gate, tolerance, ids.get(name))
        for name in current
        if name in candidate
    }
    return decide(sets, tolerance)


# ----------------------------------------------------------------------------- the round


def improve(
    name: str,
    config: ImproveConfig | None = None,
    *,
    from_feedback: bool = True,
    pair_files: list[Path] | None = None,
    exam: Path | None = None,
    since: str | None = None,
    dry_run: bool = False,
    hooks: PipelineHooks | None = None,
    home: Path | None = None,
) -> ImproveResult:
    """One improvement round of specialist `name` (see the module docstring)."""
    from eval.exam import read_exam
    from specialists.registry import Registry
    from training.trainer_common import fingerprint

    config, hooks, home = config or ImproveConfig(), hooks or PipelineHooks(), Path(home or atelier_home())
    pair_files = [Path(p) for p in pair_files or []]
    if not from_feedback and not pair_files:
        raise AtelierError("nothing to train on: pass --from-feedback, --pairs FILE, or both")
    registry = Registry(home)
    record = registry.get(name)
    spec = _specialist_config(record)
    if config.eval is not None:
        spec = spec.model_copy(update={"eval": config.eval})
    model_dir, adapter, lora = _artifacts(record, spec)
    data_dir = heldout_dir(record)
    the_exam = read_exam(exam) if exam is not None else None
    result = ImproveResult(name=name, parent_version=record.version, pairs=PairSet())

    hooks.step("pairs", f"feedback on specialist:{name}" if from_feedback else "pair files")
    started = time.perf_counter()
    result.pairs = pairs = collect_pairs(
        record,
        config,
        from_feedback=from_feedback,
        pair_files=pair_files,
        exam_questions=[i.question for i in the_exam.items] if the_exam else [],
        since=since,
        home=home,
        base_answers=lambda prompts: _base_answers(model_dir, record, prompts, spec.eval),
        progress=hooks.data_progress,
        spec=spec,
    )
    result.timings["pairs"] = time.perf_counter() - started
    hooks.done(
        "pairs",
        result.timings["pairs"],
        f"{len(pairs.train)} to train, {len(pairs.heldout)} held out, {sum(pairs.rejected.values())} dropped",
    )
    check_enough(pairs, config, name)
    if dry_run:
        return result

    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    run_dir = result.run_dir = home / "runs" / name / f"improve-v{record.version}-{stamp}"
    replayed = replay_rows(data_dir, round(config.replay * len(pairs.train)), config.seed)
    write_pairs(run_dir / "data", pairs, replayed)
    hooks.step("dpo", f"{config.dpo.preference} on {len(pairs.train)} pairs, from v{record.version}")
    started = time.perf_counter()
    from training.dpo import train_dpo

    key = fingerprint(parent=record.adapter_sha256 or record.model_sha256, config=config.dpo)[:12]
    stage = train_dpo(
        model_dir,
        run_dir / "data",
        run_dir / f"dpo-{key}",
        config.dpo,
        lora,
        adapter=adapter,
        progress=hooks.train_progress,
    )
    result.timings["dpo"] = time.perf_counter() - started
    hooks.done("dpo", result.timings["dpo"], f"{stage.steps} steps, {stage.tokens_per_s:.0f} tokens/s")

    hooks.step("gate", "current and candidate on held-out, feedback" + (" and exam" if the_exam else ""))
    started = time.perf_counter()
    current = _side(model_dir, [adapter] if adapter else [], data_dir, pairs, the_exam, spec.eval)
    cand_model = Path(stage.model_path)
    cand_adapters = [Path(stage.adapter_path)] if stage.adapter_path else []
    candidate = _side(cand_model, cand_adapters, data_dir, pairs, the_exam, spec.eval)
    result.verdict = verdict = gate(current, candidate, pairs, the_exam, spec.eval, config.tolerance)
    result.timings["gate"] = time.perf_counter() - started
    atomic_write_text(run_dir / "gate.json", json.dumps(verdict.to_dict(), indent=2) + "\n")
    hooks.done(
        "gate",
        result.timings["gate"],
        "accepted" if verdict.accepted else "refused: " + "; ".join(verdict.reasons)[:200],
    )

    lineage = {
        "parent_version": record.version,
        "feedback_ids": pairs.feedback_ids,
        "pair_files": pairs.files,
        "teacher": pairs.teacher,
        "pairs": {"train": len(pairs.train), "heldout": len(pairs.heldout), "replay": len(replayed),
                  "dropped": dict(pairs.rejected)},
        "data_sha256": {
            f"dpo/{s}.jsonl": sha256_of(run_dir / "data" / "dpo" / f"{s}.jsonl") for s in ("train", "heldout")
        },
        "improve_run": str(run_dir),
        "exam": str(exam) if exam else None,
        "exam_sha256": the_exam.sha256 if the_exam else None,
        "gate": verdict.to_dict(),
        "config": config.model_dump(mode="json"),
        "stage": stage.model_dump(mode="json"),
    }
    result.record = registry.register_from(
        record,
        weights=cand_adapters[0] if cand_adapters else cand_model,
        parent_version=record.version,
        lineage=lineage,
        candidate=not verdict.accepted,
        candidate_reasons=[] if verdict.accepted else verdict.reasons,
    )
    return result


def write_pairs(data_dir: Path, pairs: PairSet, replayed: list[dict] | None = None) -> None:
    """dpo/train.jsonl (the round's pairs, then the replayed rows) and dpo/heldout.jsonl (atomic writes)."""
    for split, rows in (("train", [trl_row(p) for p in pairs.train] + list(replayed or [])),
                        ("heldout", [trl_row(p) for p in pairs.heldout])):
        atomic_write_text(data_dir / "dpo" / f"{split}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))


def replay_rows(data_dir: Path, count: int, seed: int) -> list[dict]:
    """A seeded sample of `count` rows of the specialist's own DPO training data (its build's data_dir)."""
    if count <= 0:
        return []
    import random

    path = data_dir / "dpo" / "train.jsonl"
    if not path.is_file():
        raise AtelierError(f"replay needs the specialist's DPO training data ({path}), which is not there (built "
                           "without the dpo stage?); set replay: 0, or rebuild it with dpo in --stages")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    picked = random.Random(seed).sample(rows, min(count, len(rows)))
    return [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"], "source": "replay",
             "kind": r.get("kind", "replay")} for r in picked]


def _base_answers(model_dir: Path, record, prompts: list[str], eval_config) -> list[str]:
    """The base model's greedy answers (the rejected side of a thumbs-up pair).

    The base is the model the specialist's adapter applies to; a full-model specialist has no
    separate base here, so its thumbs-up pairs are dropped (rejected empty).
    """
    if record.full_model:
        return [""] * len(prompts)
    from eval.specialist import generate_answers, load_for_eval

    model, tokenizer = load_for_eval(model_dir, None, eval_config.device)
    return generate_answers(model, tokenizer, [[{"role": "user", "content": q}] for q in prompts], eval_config)
