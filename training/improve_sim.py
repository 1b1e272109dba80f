"""Simulated use, to measure an improvement round end to end (the test suite and bench/improve_bench.py).

1. `split_exam_file`: an exam's lines in two halves by a seeded shuffle (a training half whose
   questions get feedback, and an untouched half the gate and the report test on).
2. `record_use`: the specialist answers every question of the training half through the real
   runtime; each exchange goes into the real feedback store as the API records it (route
   `specialist:NAME`, the answering version, an owner), then a rating: thumbs-up when the answer
   contains the reference, else thumbs-down with the reference answer as the correction.
3. `compare_versions`: two versions on an exam, with intervals, paired tests and flips
   (`eval.exam_eval.summarise`), plus how many of the corrected questions each gets right.
"""

from __future__ import annotations

import random
import uuid
from pathlib import Path
from typing import Any

from atelier.home import atomic_write_text


def split_exam_file(path: Path, out_dir: Path, seed: int = 0) -> tuple[Path, Path]:
    """(training half, other half) of the exam's non-blank lines, written as two JSONL files."""
    lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    order = list(range(len(lines)))
    random.Random(seed).shuffle(order)
    half = len(lines) // 2
    parts = []
    for label, picked in (("train", sorted(order[:half])), ("other", sorted(order[half:]))):
        target = Path(out_dir) / f"{Path(path).stem}-{label}-seed{seed}.jsonl"
        atomic_write_text(target, "".join(lines[i] + "\n" for i in picked))
        parts.append(target)
    return parts[0], parts[1]


def record_use(name: str, exam, store, *, owner: str = "simulated-user", max_tokens: int = 32,
               home: Path | None = None) -> dict[str, Any]:
    """Ask specialist `name` every open question of `exam` and rate each answer in `store` (see above)."""
    from eval.answers import contains_answer
    from specialists.generation import GenerationParams
    from specialists.registry import Registry
    from specialists.runtime import SpecialistRuntime

    registry = Registry(home)
    runtime = SpecialistRuntime(registry)
    params = GenerationParams(max_tokens=max_tokens, temperature=0.0)
    right, corrected, feedback_ids = [], [], []
    try:
        for item in exam.open_items:
            generation = runtime.generate(name, [{"role": "user", "content": item.question}], params)
            answer = generation.text
            completion_id, thread = f"chatcmpl-sim-{uuid.uuid4().hex[:12]}", f"sim-{item.id}"
            store.record_exchange(completion_id, thread, f"specialist/{name}", item.question, answer,
                                  f"specialist:{name}", owner, generation.version)
            good = contains_answer(answer, item.answer, item.aliases)
            (right if good else corrected).append(item.id)
            feedback_ids.append(store.add(completion_id, "up" if good else "down", thread_id=thread, owner=owner,
                                          correction=None if good else item.answer))
    finally:
        runtime.unload()
    return {"version": registry.current_version(name), "asked": len(exam.open_items), "right": right, "corrected": corrected,
            "feedback_ids": feedback_ids}


def compare_versions(current, candidate, exam, eval_config, corrected: list[str] | None = None) -> dict[str, Any]:
    """`summarise` of current ("base") vs candidate ("specialist") on `exam`, and the corrected items fixed.

    `current` and `candidate` are (model folder, [adapters]) pairs.
    """
    from eval.exam_eval import run_system, summarise
    from eval.systems import LocalModel

    runs = {"base": run_system(LocalModel("current", Path(current[0]), list(current[1]), config=eval_config), exam),
            "specialist": run_system(LocalModel("candidate", Path(candidate[0]), list(candidate[1]),
                                                config=eval_config), exam)}
    summary = summarise(exam, runs, eval_config.gate)
    if corrected is not None:
        summary["corrected"] = {"n": len(corrected), **{
            f"{metric}_fixed": sum(1 for i in corrected if (runs["specialist"].per_item(metric) or {}).get(i)
                                   and not (runs["base"].per_item(metric) or {}).get(i))
            for metric in ("mcq_accuracy", "contains")}}
    return summary
