"""`atelier specialist add`: documents -> generated data -> DAPT -> SFT -> DPO -> evaluation -> registry.

Reads top to bottom in `run_pipeline`. Every step is resumable:

* a run lives in ATELIER_HOME/runs/NAME/RUN_ID/; re-running `add` works in the newest run
  of NAME (`--new-run` starts another);
* generated data is rebuilt only when the documents, the data config or the teacher
  changed (the manifest records a fingerprint of its inputs);
* each training stage works in a folder named by a hash of its inputs (the model it starts
  from, the adapter, the data, its config), `dapt-1f2e...`: unchanged inputs find their
  finished result and skip, an interrupted stage resumes from its newest checkpoint, and
  changed inputs get a fresh folder — and so does every stage after it;
* evaluations are cached by the same keys.

One LoRA adapter is carried from stage to stage. For `scratch:*` bases DAPT trains the whole
model (it is pretraining from scratch on the domain) and its output becomes the
specialist's base model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from atelier.errors import AtelierError
from atelier.home import atelier_home, atomic_dir, atomic_write_text
from atelier.reports import EvalReport
from retrieval.documents import Document, DocumentsConfig, load_folder
from training.config import SpecialistConfig
from training.recipe import MIN_STEPS

DONE_FILE = "summary.json"


@dataclass
class PipelineHooks:
    """How the pipeline reports to its caller (the CLI draws progress bars with these)."""

    step: Callable[[str, str], None] = lambda name, detail: None  # a step starts: ("dapt", "training 250 steps")
    data_progress: Callable[[str, int, int], None] | None = None  # (what, done, total)
    train_progress: Callable[..., None] | None = None  # (step, max_steps, loss, tokens_seen=...)
    skipped: Callable[[str, str], None] = lambda path, reason: None  # an unreadable document
    done: Callable[[str, float, str], None] = lambda name, seconds, note: None  # a step finished


@dataclass
class PipelineResult:
    name: str
    run_dir: Path
    report: EvalReport | None
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    record: Any = None  # the SpecialistRecord when registered
    data_counts: dict[str, int] = field(default_factory=dict)
    exam_report: dict[str, Any] | None = None  # base vs specialist on the user's exam (--exam)


def _digest(*parts: Any) -> str:
    payload = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def choose_run(name: str, *, new_run: bool = False) -> Path:
    """The newest run of `name` (its unchanged steps skip themselves), or a new one."""
    runs = atelier_home() / "runs" / name
    existing = sorted(p for p in runs.glob("*") if p.is_dir() and not p.name.startswith("."))
    if existing and not new_run:
        return existing[-1]
    run_dir = runs / datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    while run_dir.exists():
        time.sleep(1)
        run_dir = runs / datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True)
    return run_dir


def model_identity(path: Path) -> list:
    """What identifies a model folder's contents cheaply: file names, sizes and modification times."""
    path = Path(path)
    if not path.is_dir():
        return [str(path)]
    return [(p.relative_to(path).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(path.rglob("*")) if p.is_file() and "checkpoint" not in p.as_posix()]


def load_documents(docs_dir: Path, hooks: PipelineHooks, config: DocumentsConfig | None = None) -> list[Document]:
    loaded = load_folder(docs_dir, config)
    for path, reason in loaded.skipped:
        hooks.skipped(path, reason)
    if not loaded.documents:
        raise AtelierError(f"no readable documents in {docs_dir}; add .md, .txt, .html, .pdf or .jsonl files "
                           "(an empty or unreadable folder cannot teach a specialist anything)")
    return loaded.documents


def check_teacher(config) -> None:
    """Raise the teacher's one-line error now unless its server answers."""
    from training.teacher import Teacher

    teacher = Teacher(config)
    try:
        teacher.check()
    finally:
        teacher.close()


def generate_data(docs: list[Document], data_dir: Path, config: SpecialistConfig, hooks: PipelineHooks):
    """Build (or reuse) the DAPT/SFT/DPO datasets; returns the DataManifest."""
    from training.data import build_datasets, inputs_fingerprint, load_manifest
    from training.teacher import Teacher

    fingerprint = inputs_fingerprint(docs, config.data, config.chunking,
                                     teacher_name=config.teacher.name if config.teacher else None)
    manifest = load_manifest(data_dir)
    if manifest is not None and manifest.inputs_hash == fingerprint:
        return manifest, True
    teacher = Teacher(config.teacher) if config.teacher else None
    try:
        manifest = build_datasets(docs, data_dir, config.data, chunking=config.chunking, teacher=teacher,
                                  progress=hooks.data_progress)
    finally:
        if teacher is not None:
            teacher.close()
    return manifest, False


def evaluate_cached(label: str, model: Path, adapter: Path | None, data_dir: Path, manifest_hash: str,
                    config: SpecialistConfig, eval_dir: Path, stage_stamp: str = "") -> dict[str, float]:
    """Held-out metrics of model (+ adapter), cached under eval_dir/<label>.json by their inputs.

    A bare model (the base) is also cached in ATELIER_HOME/cache/eval by its contents, the data's and
    the evaluation settings: another run on the same documents and base (a new budget, other LoRA
    settings, `--new-run`) reuses its score, minutes on a real base, instead of paying them again.
    """
    from eval.specialist import evaluate_model

    key = _digest(str(model), str(adapter), manifest_hash, config.eval.model_dump(mode="json"), stage_stamp)
    cached = eval_dir / f"{label}.json"
    if (metrics := _saved_metrics(cached, key)) is not None:
        return metrics
    shared = None
    if adapter is None:
        shared_key = _digest(model_identity(model), manifest_hash, config.eval.model_dump(mode="json"))
        shared = atelier_home() / "cache" / "eval" / f"{shared_key[:32]}.json"
        metrics = _saved_metrics(shared, shared_key)
    if metrics is None:
        metrics = evaluate_model(model, adapter, data_dir, config.eval)
        if shared is not None:
            atomic_write_text(shared, json.dumps({"key": shared_key, "model": str(model), "metrics": metrics},
                                                 indent=2) + "\n")
    atomic_write_text(cached, json.dumps({"key": key, "metrics": metrics}, indent=2) + "\n")
    return metrics


def _saved_metrics(path: Path, key: str) -> dict | None:
    """The metrics a cache file holds for `key`; None when it is absent, damaged or for other inputs."""
    with contextlib.suppress(OSError, ValueError):
        saved = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(saved, dict) and saved.get("key") == key:
            return saved.get("metrics")
    return None


def train_stage(stage: str, model: Path, adapter: Path | None, data_dir: Path, manifest_hash: str, run_dir: Path,
                config: SpecialistConfig, hooks: PipelineHooks, time_limit_s: float | None = None):
    from training.dapt import train_dapt
    from training.dpo import train_dpo
    from training.sft import train_sft

    trainers = {"dapt": (train_dapt, config.dapt), "sft": (train_sft, config.sft), "dpo": (train_dpo, config.dpo)}
    train, stage_config = trainers[stage]
    key = _digest(model_identity(model), model_identity(adapter) if adapter else None, manifest_hash,
                  stage_config.model_dump(mode="json"), config.lora.model_dump(mode="json"))
    return train(model, data_dir, run_dir / f"{stage}-{key[:12]}", stage_config, config.lora, adapter=adapter,
                 progress=hooks.train_progress, time_limit_s=time_limit_s)


def keep_base(model: Path, run_dir: Path) -> Path:
    """A base model trained inside this run (scratch DAPT) moves to ATELIER_HOME/bases/<sha256>/,
    content-addressed, so the registered specialist outlives its run folder; other bases stay put."""
    model = Path(model).resolve()
    if not model.is_relative_to(Path(run_dir).resolve()):
        return model
    digest = hashlib.sha256()
    for path in sorted(p for p in model.rglob("*") if p.is_file()):
        digest.update(path.relative_to(model).as_posix().encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    target = atelier_home() / "bases" / digest.hexdigest()[:16]
    if not target.exists():
        with atomic_dir(target) as tmp:
            shutil.copytree(model, tmp, ignore=shutil.ignore_patterns("checkpoint-*"), dirs_exist_ok=True)
    return target


def route_exemplars(data_dir: Path, count: int, seed: int) -> list[str]:
    """A sample of the specialist's training instructions: what the router matches requests against.

    The templated fact look-ups (`fact_*` kinds: "What is the torque for the impeller nut?") are
    left out: they are the questions search answers best, with the passage cited, and as
    exemplars they pulled document look-ups away from the search route."""
    path = data_dir / "sft" / "train.jsonl"
    if count <= 0 or not path.exists():
        return []
    questions = []
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if str(row.get("kind", "")).startswith("fact_"):
            continue
        first = next((m["content"] for m in row.get("messages", []) if m.get("role") == "user"), None)
        if first:
            questions.append(first)
    questions = sorted(set(questions))
    random.Random(seed).shuffle(questions)
    return questions[:count]


def run_pipeline(name: str, docs_dir: Path, config: SpecialistConfig, *, force: bool = False,
                 new_run: bool = False, hooks: PipelineHooks | None = None, exam: Path | None = None) -> PipelineResult:
    """The whole recipe for one specialist; see the module docstring."""
    from eval.report import compare, write_report
    from specialists.registry import Registry, validate_name
    from training.models import resolve_base

    hooks = hooks or PipelineHooks()
    run_started = time.perf_counter()
    validate_name(name)
    config.lora.check_available()
    docs = load_documents(Path(docs_dir), hooks, config.documents)
    if config.teacher is not None:
        check_teacher(config.teacher)  # a probe of milliseconds, before minutes of base conversion and data
    run_dir = choose_run(name, new_run=new_run)
    atomic_write_text(run_dir / "config.json", config.model_dump_json(indent=2) + "\n")
    result = PipelineResult(name=name, run_dir=run_dir, report={})

    started = time.perf_counter()
    hooks.step("base", config.base)
    base = resolve_base(config.base, work_dir=run_dir / "base", corpus_texts=[d.text for d in docs], seed=config.seed)
    result.timings["base"] = time.perf_counter() - started
    hooks.done("base", result.timings["base"], str(base))

    started = time.perf_counter()
    hooks.step("data", f"{len(docs)} documents, {'teacher ' + config.teacher.name if config.teacher else 'offline'}")
    data_dir = run_dir / "data"
    manifest, reused = generate_data(docs, data_dir, config, hooks)
    result.data_counts = {path: f.rows for path, f in manifest.files.items() if path.endswith(".jsonl")}
    result.timings["data"] = time.perf_counter() - started
    hooks.done("data", result.timings["data"], ("reused: " if reused else "") + ", ".join(
        f"{k} {v}" for k, v in result.data_counts.items()))

    hooks.step("check", "base, chat template, data and memory")
    started = time.perf_counter()
    check_run(base, data_dir, config)
    result.timings["check"] = time.perf_counter() - started
    hooks.done("check", result.timings["check"], "base loads, template renders, data and memory fit")

    throughput = None
    if config.budget_minutes is not None:
        hooks.step("budget", f"{config.budget_minutes:g} min: measuring training throughput on the base")
        started = time.perf_counter()
        throughput = budget_throughput(base, data_dir, run_dir, config)
        config = config.model_copy(update={"eval": scale_eval(config.eval, config.budget_minutes * 60, throughput)})
        result.timings["budget"] = time.perf_counter() - started
        hooks.done("budget", result.timings["budget"], f"{throughput:.0f} training tokens/s; evaluation sized to "
                   f"{config.eval.max_mcq_items} multiple-choice items")

    eval_dir = run_dir / "eval"
    started = time.perf_counter()
    hooks.step("eval", "base model on the held-out split")
    metrics = {"base": evaluate_cached("base", base, None, data_dir, manifest.content_hash, config, eval_dir)}
    result.timings["eval:base"] = time.perf_counter() - started
    hooks.done("eval", result.timings["eval:base"], _brief(metrics["base"]))

    plans = {}
    if throughput is not None:
        hooks.step("plan", f"stages for the {config.budget_minutes:g} min budget")
        # the specialist's evaluation costs what the base's did: its own time, or what a cached one took
        final_eval_s = max(result.timings["eval:base"], float(metrics["base"].get("eval_seconds", 0)) + LOAD_S)
        plans = plan_stages(base, data_dir, run_dir, config, throughput, spent_s=time.perf_counter() - run_started,
                            final_eval_s=final_eval_s)
        left_out = [s for s in config.stages if s not in plans]
        hooks.done("plan", 0.0, ", ".join(
            f"{p.stage} {p.max_steps} steps ({p.epochs:g} epoch, {p.seconds / 60:.1f} min)" for p in plans.values())
            + (f"; left out (fewer than {MIN_STEPS} steps each): {', '.join(left_out)}" if left_out else ""))
        # a budgeted stage never scores the held-out split itself (minutes on a real base):
        # the run's evaluation of base and specialist is what the budget pays for
        config = config.model_copy(update={"stages": [s for s in config.stages if s in plans], **{
            s: getattr(config, s).model_copy(update={"max_steps": p.max_steps, "eval_heldout": False})
            for s, p in plans.items()}})

    if exam is not None:
        from eval.exam import read_exam

        read_exam(Path(exam))  # a bad exam file fails here, before any training
    model, adapter = base, None
    for position, stage in enumerate(config.stages):
        started = time.perf_counter()
        stage_config = getattr(config, stage)
        hooks.step(stage, f"{stage_config.max_steps} steps" if stage_config.max_steps
                   else f"{stage_config.epochs or 'recipe'} epoch(s)")
        limit = plans[stage].seconds * BUDGET_SLACK if stage in plans else None
        outcome = train_stage(stage, model, adapter, data_dir, manifest.content_hash, run_dir, config, hooks, limit)
        model, adapter = Path(outcome.model_path), (Path(outcome.adapter_path) if outcome.adapter_path else None)
        result.stages[stage] = outcome.model_dump(mode="json")
        result.timings[stage] = time.perf_counter() - started
        note = f"{outcome.steps} steps, {outcome.tokens_per_s:.0f} tokens/s"
        if outcome.resumed_from_step:
            note += f", resumed from step {outcome.resumed_from_step}"
        if config.evaluate_stages or position == len(config.stages) - 1:
            metrics[stage] = evaluate_cached(stage, model, adapter, data_dir, manifest.content_hash, config,
                                             eval_dir, stage_stamp=json.dumps(model_identity(adapter or model)))
            result.timings[f"eval:{stage}"] = time.perf_counter() - started - result.timings[stage]
            note += f"; {_brief(metrics[stage])}"
        hooks.done(stage, result.timings[stage], note)

    report = compare(metrics["base"], {s: metrics[s] for s in config.stages if s in metrics}, config.eval.gate)
    write_report(report, eval_dir)
    result.report = report

    exam_report = None
    if exam is not None:
        from eval.side_by_side import exam_gate

        hooks.step("exam", f"base and specialist on {exam}")
        started = time.perf_counter()
        exam_report = exam_gate(base, model, adapter, Path(exam), config.eval)
        atomic_write_text(eval_dir / "exam.json", json.dumps(exam_report, indent=2, default=str) + "\n")
        result.timings["exam"] = time.perf_counter() - started
        verdict = (exam_report.get("gate") or {}).get("accepted")
        hooks.done("exam", result.timings["exam"], "passes" if verdict else "refused by the exam gate")
    result.exam_report = exam_report

    hooks.step("register", name)
    started = time.perf_counter()
    registry = Registry()
    try:
        if adapter is not None:
            model = keep_base(model, run_dir)
        result.record = _already_registered(registry, name, adapter or model, str(model))
        if result.record is not None:
            hooks.done("register", 0.0, f"unchanged: {name} v{result.record.version} is this very model")
            return result
        result.record = registry.register(
            name, base_model=str(model), eval_report=result.report, keywords=manifest.keywords[:20],
            adapter_dir=adapter, model_dir=None if adapter else model,
            data_manifest_hashes={"data": manifest.content_hash,
                                  **{path: f.sha256 for path, f in manifest.files.items()}},
            config=config.model_dump(mode="json"), route_exemplars=route_exemplars(
                data_dir, config.route_exemplars, config.seed), run_dir=run_dir, force=force,
            exam_report=exam_report)
    except AtelierError as exc:
        raise AtelierError(f"{exc} (report: {eval_dir / 'eval.md'})") from None
    else:
        hooks.done("register", time.perf_counter() - started, f"{name} v{result.record.version}")
    finally:
        atomic_write_text(run_dir / DONE_FILE, json.dumps({"report": result.report and result.report.to_dict(), "timings": result.timings,
                                                           "stages": result.stages}, indent=2, default=str) + "\n")
    return result


BUDGET_SLACK = 1.05  # a budgeted stage may run this much past its share before it is stopped
LOAD_S = 15.0  # loading a small real model for evaluation, beside the scoring itself (eval_seconds)


def check_run(base: Path, data_dir: Path, config: SpecialistConfig) -> None:
    """Everything that can fail cheaply, checked before the first expensive step: the base's
    tokenizer and chat template (as SFT will render them), non-empty data for every stage,
    and a training micro-batch that fits in memory at each stage's sequence length."""
    from specialists.loading import load_tokenizer
    from training.models import uses_scratch_recipe
    from training.recipe import micro_batch, training_length
    from training.sft import check_chat_template

    try:
        tokenizer = load_tokenizer(base)
    except Exception as exc:
        raise AtelierError(f"the base in {base} has no loadable tokenizer ({exc}); pass another --base") from None
    if "sft" in config.stages or "dpo" in config.stages:
        check_chat_template(tokenizer, base)
    for stage in config.stages:
        path = data_dir / stage / "train.jsonl"
        if not path.is_file() or not path.read_text(encoding="utf-8").strip():
            raise AtelierError(f"no {stage} training data was generated ({path}); the documents gave nothing "
                               f"for this stage: add documents, or leave {stage} out of --stages")
    if not uses_scratch_recipe(base):
        for stage in config.stages:
            micro_batch(base, training_length(stage, getattr(config, stage).seq_len),
                        full=config.lora.method == "full")


def budget_throughput(base: Path, data_dir: Path, run_dir: Path, config: SpecialistConfig) -> float:
    """Training tokens/s of this base on this machine, measured once per run (run_dir/throughput.json)."""
    from specialists.loading import load_tokenizer
    from training.dapt import PadCollator, to_blocks
    from training.recipe import measure_throughput
    from training.trainer_common import read_rows

    cached = run_dir / "throughput.json"
    key = _digest(model_identity(base), config.lora.model_dump(mode="json"), config.dapt.seq_len)
    if cached.is_file():
        saved = json.loads(cached.read_text(encoding="utf-8"))
        if saved.get("key") == key:
            return float(saved["tokens_per_s"])
    tokenizer = load_tokenizer(base)
    dapt_file = data_dir / "dapt" / "train.jsonl"
    texts = [row["text"] for row in read_rows(dapt_file, ("text",))] if dapt_file.is_file() else []
    blocks = to_blocks(texts[:64] or ["calibration text " * 400], tokenizer, config.dapt.seq_len, packing=True)
    tokens_per_s = measure_throughput(base, blocks, config.lora, full=config.lora.method == "full",
                                      batch_size=min(2, len(blocks)), collate=PadCollator(pad_token_id=0))
    atomic_write_text(cached, json.dumps({"key": key, "tokens_per_s": tokens_per_s}) + "\n")
    return tokens_per_s


EVAL_SHARE = 0.12  # of a budget, for each of the two evaluations (base and specialist)
# Floors keep the gate's required metrics meaningful (40 multiple-choice items); the metrics the
# gate does not require (generated answers, preference pairs) may drop to nothing.
_EVAL_FLOORS = {"max_mcq_items": 40, "max_perplexity_texts": 20, "max_generation_items": 0, "max_preference_items": 0}
_TOKENS_PER_ITEM = {"max_mcq_items": 100, "max_perplexity_texts": 300, "max_preference_items": 240}


def scale_eval(eval_config, budget_s: float, train_tokens_per_s: float):
    """The held-out evaluation cut down to about EVAL_SHARE of the budget, from the measured speed.

    Scoring runs forward only, measured here at about 1.5x the training throughput (the
    vocabulary projection dominates a small model's forward); a generated token costs a forward
    of its own. Item caps shrink together down to their floors: the required metrics keep
    enough items, the others go first."""
    forward = 1.5 * train_tokens_per_s
    caps = {name: getattr(eval_config, name) for name in _EVAL_FLOORS if hasattr(eval_config, name)}
    options = getattr(eval_config, "mcq_options", 4)

    def cost(values: dict[str, int]) -> float:
        tokens = sum(values.get(name, 0) * per * (options if name == "max_mcq_items" else 1)
                     for name, per in _TOKENS_PER_ITEM.items())
        generated = values.get("max_generation_items", 0) * getattr(eval_config, "max_new_tokens", 48)
        return tokens / forward + generated * 12 / forward

    target = EVAL_SHARE * budget_s
    if cost(caps) <= target:
        return eval_config
    factor = target / cost(caps)
    scaled = {name: max(min(_EVAL_FLOORS[name], value), round(value * factor)) for name, value in caps.items()}
    for name in ("max_generation_items", "max_preference_items"):  # not required by the gate: dropped first
        if cost(scaled) > target and name in scaled:
            scaled[name] = 0
    return eval_config.model_copy(update=scaled)


def plan_stages(base: Path, data_dir: Path, run_dir: Path, config: SpecialistConfig, tokens_per_s: float, *,
                spent_s: float, final_eval_s: float):
    """Step counts that fit the run into `config.budget_minutes` (training/recipe.py), kept in
    run_dir/budget.json so that a resumed run trains the same plan."""
    from specialists.loading import load_tokenizer
    from training.recipe import EFFECTIVE_BATCH, StagePlan, plan_budget
    from training.trainer_common import read_rows

    entered = time.perf_counter()
    plan_file = run_dir / "budget.json"
    key = _digest(config.model_dump(mode="json"), model_identity(base),
                  [model_identity(data_dir / s / "train.jsonl") for s in config.stages])
    if plan_file.is_file():
        saved = json.loads(plan_file.read_text(encoding="utf-8"))
        if saved.get("key") == key:
            return {s: StagePlan(**p) for s, p in saved["plans"].items()}
    tokenizer = load_tokenizer(base)
    texts = {"dapt": ["text"], "sft": ["messages"], "dpo": ["prompt", "chosen", "rejected"]}
    tokens, rows, batches = {}, {}, {}
    for stage in config.stages:
        data = read_rows(data_dir / stage / "train.jsonl", tuple(texts[stage]))
        flat = [" ".join(t["content"] for t in row[k]) if isinstance(row[k], list) else row[k]
                for row in data for k in texts[stage]]
        count = sum(len(ids) for ids in tokenizer(flat, add_special_tokens=False)["input_ids"])
        count += len(data) * (24 if stage != "dapt" else 1)  # chat template scaffolding per conversation
        stage_config = getattr(config, stage)
        packed = stage == "dapt" or (stage == "sft" and stage_config.packing)
        tokens[stage] = count
        rows[stage] = -(-count // stage_config.seq_len) if packed else len(data)
        batches[stage] = (stage_config.batch_size * stage_config.grad_accumulation if stage_config.batch_size
                          else EFFECTIVE_BATCH)
    seconds_left = config.budget_minutes * 60 - spent_s - (time.perf_counter() - entered) - final_eval_s
    max_epochs = {s: getattr(config, s).epochs or 1.0 for s in config.stages}
    plans = plan_budget(seconds_left, tokens, rows, tokens_per_s, batches, max_epochs)
    atomic_write_text(plan_file, json.dumps({"key": key, "tokens_per_s": tokens_per_s, "tokens": tokens,
                                             "plans": {s: vars(p) for s, p in plans.items()}}, indent=2) + "\n")
    return plans


def _already_registered(registry, name: str, artifact: Path, base_model: str):
    """The current record of `name` when it holds exactly this adapter (or model) on this base."""
    from specialists.registry import sha256_file

    if name not in registry.names():
        return None
    current = registry.get(name)
    weights = artifact / ("adapter_model.safetensors" if current.adapter_path else "model.safetensors")
    stored = current.adapter_sha256 if current.adapter_path else current.model_sha256
    if weights.exists() and stored == sha256_file(weights) and current.base_model == base_model:
        return current
    return None


def _brief(metrics: dict[str, float]) -> str:
    parts = []
    if "perplexity" in metrics:
        parts.append(f"ppl {metrics['perplexity']:.1f}")
    if "mcq_accuracy" in metrics:
        parts.append(f"mcq {metrics['mcq_accuracy']:.2f}")
    if "preference_accuracy" in metrics:
        parts.append(f"pref {metrics['preference_accuracy']:.2f}")
    return ", ".join(parts)
