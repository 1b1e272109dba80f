"""Specialists that improve from use, measured: simulated feedback -> `specialist improve` -> the gate.

On a copy of a built specialist (default: the full-recipe SmolLM2 specialist `hx` of the
specialist bench, in /work/bench-home; that folder is only read):

  1. the exam (bench/exams/hx-pumps.jsonl, 80 items) is split in two halves by a seeded shuffle;
  2. the specialist answers the training half through the real runtime; every exchange and rating
     goes into the real feedback store as the API records it: thumbs-up when the answer contains
     the reference, thumbs-down with the reference answer as the correction otherwise;
  3. `specialist improve --from-feedback --exam <other half>` runs one DPO round continuing the
     adapter; its regression gate scores current and candidate on the held-out split, the held-out
     feedback pairs, the other half and all feedback pairs;
  4. current and new version are scored on the training half (multiple choice with the exam's own
     options, and closed-book answers): how many of the corrected questions are now right.

Every figure comes with a 95% bootstrap interval and a paired test (exact McNemar on right/wrong).
Results: bench/results/improve-<label>.json.

Usage (one core; ~30 min on SmolLM2 on this CPU):
  OMP_NUM_THREADS=1 .venv/bin/python bench/improve_bench.py --home /work/loop-home \\
      --source-home /work/bench-home --name hx --label smollm2
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def prepare_home(home: Path, source: Path, name: str) -> None:
    """A fresh home holding a copy of `source`'s specialist `name`; bases and indexes linked, not copied."""
    if (home / "specialists" / name).exists():
        shutil.rmtree(home / "specialists" / name)
    (home / "specialists").mkdir(parents=True, exist_ok=True)
    shutil.copytree(source / "specialists" / name, home / "specialists" / name, ignore=shutil.ignore_patterns(".lock"))
    for linked in ("bases", "indexes"):
        if not (home / linked).exists() and (source / linked).exists():
            (home / linked).symlink_to(source / linked, target_is_directory=True)
    for stale in ("feedback.sqlite", "feedback.sqlite-wal", "feedback.sqlite-shm"):
        (home / stale).unlink(missing_ok=True)


def test_figures(test) -> dict:
    """A MetricTest as the result file shows it."""
    return {
        "current": test.base,
        "candidate": test.specialist,
        "current_ci": test.base_ci,
        "candidate_ci": test.specialist_ci,
        "delta": test.delta,
        "delta_ci": test.delta_ci,
        "p_value": test.p_value,
        "test": test.test,
        "n": test.n,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, required=True, help="ATELIER_HOME to work in (created).")
    parser.add_argument("--source-home", type=Path, required=True, help="Home holding the built specialist.")
    parser.add_argument("--name", default="hx")
    parser.add_argument("--label", default="smollm2")
    parser.add_argument("--exam", type=Path, default=ROOT / "bench" / "exams" / "hx-pumps.jsonl")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the exam split.")
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--seq-len", type=int, default=192)
    parser.add_argument("--perplexity-texts", type=int, default=100, help="Held-out texts the gate scores.")
    parser.add_argument("--mcq-items", type=int, default=100, help="Held-out MCQ items the gate scores.")
    parser.add_argument("--sft-weight", type=float, default=1.0, help="Weight of the chosen answer's NLL beside DPO.")
    parser.add_argument("--min-pairs", type=int, default=8)
    parser.add_argument("--replay", type=float, default=0.0,
                        help="Rehearsal pairs from the specialist's own DPO data per feedback pair (ImproveConfig).")
    parser.add_argument("--limit", type=int, default=None, help="Smoke test: only this many items per exam half.")
    args = parser.parse_args()

    home = args.home.resolve()
    os.environ["ATELIER_HOME"] = str(home)
    from atelier.feedback import FeedbackStore
    from eval.exam import read_exam
    from specialists.registry import Registry
    from training.config import SpecialistConfig
    from training.dpo import DpoConfig
    from training.improve import ImproveConfig, improve
    from training.improve_sim import compare_versions, record_use, split_exam_file

    out = ROOT / "bench" / "results" / f"improve-{args.label}.json"
    result: dict = {
        "label": args.label,
        "specialist": args.name,
        "source_home": str(args.source_home),
        "exam": str(args.exam.relative_to(ROOT)),
        "split_seed": args.seed,
        "timings_s": {},
    }

    def save() -> None:
        out.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")

    started = time.perf_counter()
    prepare_home(home, args.source_home.resolve(), args.name)
    train_half, other_half = split_exam_file(args.exam, home / "bench", seed=args.seed)
    if args.limit:
        for half in (train_half, other_half):
            half.write_text("".join(half.read_text(encoding="utf-8").splitlines(keepends=True)[: args.limit]))
    registry = Registry(home)
    v1 = registry.get(args.name)
    result["base_model"], result["parent_version"] = v1.base_model, v1.version

    store = FeedbackStore(home / "feedback.sqlite")
    try:
        use = record_use(args.name, read_exam(train_half), store, home=home)
    finally:
        store.close()
    result["use"] = {k: use[k] for k in ("asked", "right", "corrected")}
    result["timings_s"]["use"] = round(time.perf_counter() - started, 1)
    print(f"asked {use['asked']}: {len(use['right'])} right, {len(use['corrected'])} corrected", flush=True)
    save()

    spec_eval = SpecialistConfig.model_validate(v1.config).eval
    gate_eval = spec_eval.model_copy(
        update={"max_perplexity_texts": args.perplexity_texts, "max_mcq_items": args.mcq_items}
    )
    config = ImproveConfig(
        min_pairs=args.min_pairs,
        replay=args.replay,
        eval=gate_eval,
        dpo=DpoConfig(
            epochs=args.epochs,
            learning_rate=args.learning_rate,
            beta=args.beta,
            seq_len=args.seq_len,
            sft_weight=args.sft_weight,
            eval_heldout=False,
        ),
    )
    result["config"] = config.model_dump(mode="json")
    started = time.perf_counter()
    from training.cli import Display

    with Display() as display:
        round_ = improve(args.name, config, from_feedback=True, exam=other_half, home=home, hooks=display.hooks())
    result["timings_s"] |= {f"round_{k}": round(v, 1) for k, v in round_.timings.items()}
    record = round_.record
    result["round"] = {
        "new_version": record.version,
        "activated": round_.activated,
        "reasons": round_.verdict.reasons,
        "pairs": record.lineage["pairs"],
        "stage": record.lineage["stage"],
        "sets": {
            name: {
                "tests": {m: test_figures(t) for m, t in s.tests.items()},
                "regressed": s.regressed,
                "warnings": s.warnings,
                "flips_to_wrong": s.flips_to_wrong,
                "flips_to_right": s.flips_to_right,
            }
            for name, s in round_.verdict.sets.items()
        },
    }
    save()

    started = time.perf_counter()
    before = (v1.base_model, [v1.adapter_path])
    after = (record.base_model, [record.adapter_path])
    trained = compare_versions(before, after, read_exam(train_half), spec_eval, use["corrected"])
    result["training_half"] = {
        "systems": trained["systems"],
        "paired": trained["paired"]["specialist_vs_base"],
        "flips": trained["flips"],
        "corrected": trained["corrected"],
    }
    result["timings_s"]["training_half"] = round(time.perf_counter() - started, 1)
    save()
    print(
        json.dumps(
            {
                "training_half": result["training_half"]["paired"],
                "corrected": trained["corrected"],
                "activated": round_.activated,
                "reasons": round_.verdict.reasons,
            },
            indent=2,
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
