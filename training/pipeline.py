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

import hashlib
import json
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from atelier.errors import AtelierError
from atelier.home import atelier_home, atomic_write_text
from retrieval.documents import Document, load_folder
from training.config import SpecialistConfig

DONE_FILE = "summary.json"


@dataclass
class PipelineHooks:
    """How the pipeline reports to its caller (the CLI draws progress bars with these)."""

    step: Callable[[str, str], None] = lambda name, detail: None  # a step starts: ("dapt", "training 250 steps")
    data_progress: Callable[[str, int, int], None] | None = None  # (what, done, total)
    train_progress: Callable[[int, int, float | None], None] | None = None  # (step, max_steps, loss)
    skipped: Callable[[str, str], None] = lambda path, reason: None  # an unreadable document
    done: Callable[[str, float, str], None] = lambda name, seconds, note: None  # a step finished


@dataclass
class PipelineResult:
    name: str
    run_dir: Path
    report: dict[str, Any]
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    record: Any = None  # the SpecialistRecord when registered
    data_counts: dict[str, int] = field(default_factory=dict)


def _digest(*parts: Any) -> str:
    payload = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def choose_run(name: str, *, new_run: bool = False) -> Path:
    """The newest run of `name` (its unchanged steps skip themselves), or a new one."""
    runs = atelier_home() / "runs" / name
    existing = sorted(p for p in runs.glob("*") if p.is_dir() and not p.name.startswith("."))
    if existing and not new_run:
        return existing[-1]
    run_dir = runs / datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    while run_dir.exists():
        time.sleep(1)
        run_dir = runs / datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True)
    return run_dir


def model_identity(path: Path) -> list:
    """What identifies a model folder's contents cheaply: file names, sizes and modification times."""
    path = Path(path)
    if not path.is_dir():
        return [str(path)]
    return [(p.relative_to(path).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(path.rglob("*")) if p.is_file() and "checkpoint" not in p.as_posix()]


def load_documents(docs_dir: Path, hooks: PipelineHooks) -> list[Document]:
    loaded = load_folder(docs_dir)
    for path, reason in loaded.skipped:
        hooks.skipped(path, reason)
    if not loaded.documents:
        raise AtelierError(f"no readable documents in {docs_dir}; add .md, .txt, .html, .pdf or .jsonl files "
                           "(an empty or unreadable folder cannot teach a specialist anything)")
    return loaded.documents


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
    """Held-out metrics of model (+ adapter), cached under eval_dir/<label>.json by their inputs."""
    from eval.specialist import evaluate_model

    key = _digest(str(model), str(adapter), manifest_hash, config.eval.model_dump(mode="json"), stage_stamp)
    cached = eval_dir / f"{label}.json"
    if cached.exists():
        saved = json.loads(cached.read_text())
        if saved.get("key") == key:
            return saved["metrics"]
    metrics = evaluate_model(model, adapter, data_dir, config.eval)
    atomic_write_text(cached, json.dumps({"key": key, "metrics": metrics}, indent=2) + "\n")
    return metrics


def train_stage(stage: str, model: Path, adapter: Path | None, data_dir: Path, manifest_hash: str, run_dir: Path,
                config: SpecialistConfig, hooks: PipelineHooks):
    from training.dapt import train_dapt
    from training.dpo import train_dpo
    from training.sft import train_sft

    trainers = {"dapt": (train_dapt, config.dapt), "sft": (train_sft, config.sft), "dpo": (train_dpo, config.dpo)}
    train, stage_config = trainers[stage]
    key = _digest(model_identity(model), model_identity(adapter) if adapter else None, manifest_hash,
                  stage_config.model_dump(mode="json"), config.lora.model_dump(mode="json"))
    return train(model, data_dir, run_dir / f"{stage}-{key[:12]}", stage_config, config.lora, adapter=adapter,
                 progress=hooks.train_progress)


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
        tmp = target.with_name(f".{target.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(model, tmp, ignore=shutil.ignore_patterns("checkpoint-*"))
        os.replace(tmp, target)
    return target


def route_exemplars(data_dir: Path, count: int, seed: int) -> list[str]:
    """A sample of the specialist's training instructions: what the router matches requests against."""
    path = data_dir / "sft" / "train.jsonl"
    if count <= 0 or not path.exists():
        return []
    questions = []
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        first = next((m["content"] for m in row.get("messages", []) if m.get("role") == "user"), None)
        if first:
            questions.append(first)
    questions = sorted(set(questions))
    random.Random(seed).shuffle(questions)
    return questions[:count]


def run_pipeline(name: str, docs_dir: Path, config: SpecialistConfig, *, force: bool = False,
                 new_run: bool = False, hooks: PipelineHooks | None = None) -> PipelineResult:
    """The whole recipe for one specialist; see the module docstring."""
    from eval.report import compare, write_report
    from specialists.registry import Registry, validate_name
    from training.models import resolve_base

    hooks = hooks or PipelineHooks()
    validate_name(name)
    config.lora.check_available()
    docs = load_documents(Path(docs_dir), hooks)
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

    eval_dir = run_dir / "eval"
    started = time.perf_counter()
    hooks.step("eval", "base model on the held-out split")
    metrics = {"base": evaluate_cached("base", base, None, data_dir, manifest.content_hash, config, eval_dir)}
    result.timings["eval:base"] = time.perf_counter() - started
    hooks.done("eval", result.timings["eval:base"], _brief(metrics["base"]))

    model, adapter = base, None
    for stage in config.stages:
        started = time.perf_counter()
        hooks.step(stage, f"{getattr(config, stage).max_steps} steps")
        outcome = train_stage(stage, model, adapter, data_dir, manifest.content_hash, run_dir, config, hooks)
        model, adapter = Path(outcome.model_path), (Path(outcome.adapter_path) if outcome.adapter_path else None)
        result.stages[stage] = outcome.model_dump(mode="json")
        result.timings[stage] = time.perf_counter() - started
        metrics[stage] = evaluate_cached(stage, model, adapter, data_dir, manifest.content_hash, config, eval_dir,
                                         stage_stamp=json.dumps(model_identity(adapter or model)))
        result.timings[f"eval:{stage}"] = time.perf_counter() - started - result.timings[stage]
        resumed = f", resumed from step {outcome.resumed_from_step}" if outcome.resumed_from_step else ""
        hooks.done(stage, result.timings[stage], f"{outcome.steps} steps{resumed}; {_brief(metrics[stage])}")

    report = compare(metrics["base"], {s: metrics[s] for s in config.stages})
    write_report(report, eval_dir)
    result.report = report.to_dict()

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
                data_dir, config.route_exemplars, config.seed), run_dir=run_dir, force=force)
    except AtelierError as exc:
        raise AtelierError(f"{exc} (report: {eval_dir / 'eval.md'})") from None
    else:
        hooks.done("register", time.perf_counter() - started, f"{name} v{result.record.version}")
    finally:
        atomic_write_text(run_dir / DONE_FILE, json.dumps({"report": result.report, "timings": result.timings,
                                                           "stages": result.stages}, indent=2, default=str) + "\n")
    return result


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
