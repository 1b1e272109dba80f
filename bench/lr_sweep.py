"""Learning rates for LoRA on a real base, measured: the same short DAPT and SFT runs on the sample
manuals at several peak learning rates, scored by held-out loss (DAPT: held-out perplexity; SFT:
held-out answer loss), side by side in one run.

Short runs (a few dozen optimizer steps) rank learning rates by how fast they lower held-out
loss without diverging; the recipe's defaults (training/recipe.py) are the best of these.

Usage: OMP_NUM_THREADS=1 .venv/bin/python bench/lr_sweep.py [--base smollm2-135m] [--steps 8]
Writes bench/results/lr-sweep.json (--out), with general-English perplexity after each DAPT point
(what the rate forgets).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    from atelier.home import atomic_write_text
    from retrieval.documents import load_folder
    from training.dapt import DaptConfig, train_dapt
    from training.data import DataConfig, build_datasets
    from training.lora import LoraSettings
    from training.models import resolve_base
    from training.sft import SftConfig, train_sft

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rates", type=float, nargs="*", default=[5e-5, 2e-4, 5e-4, 1e-3])
    parser.add_argument("--out", default="lr-sweep", help="results file: bench/results/OUT.json")
    parser.add_argument("--no-general", dest="general", action="store_false",
                        help="skip general-English perplexity (forgetting) after each DAPT point")
    parser.add_argument("--heldout-rows", type=int, default=80,
                        help="SFT held-out conversations scored (seeded sample; each is scored before and after)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="lr-sweep-"))
    base = resolve_base(args.base, work_dir=work / "base", corpus_texts=None, seed=0)
    docs = load_folder(ROOT / "examples" / "docs").documents
    data = work / "data"
    build_datasets(docs, data, DataConfig())
    heldout = data / "sft" / "heldout.jsonl"
    lines = heldout.read_text(encoding="utf-8").splitlines()
    if len(lines) > args.heldout_rows:
        import random

        atomic_write_text(heldout, "\n".join(random.Random(0).sample(lines, args.heldout_rows)) + "\n")

    def general_perplexity(adapter: Path | None) -> float | None:
        """Perplexity on general English (training/resources/general_en.txt): what a learning rate forgets."""
        if not args.general:
            return None
        from eval.specialist import SpecialistEvalConfig, load_for_eval, perplexity

        text = (ROOT / "training" / "resources" / "general_en.txt").read_text(encoding="utf-8")
        model, tokenizer = load_for_eval(base, adapter)
        return round(perplexity(model, tokenizer, [text], SpecialistEvalConfig())["perplexity"], 3)

    rows = []
    general_base = general_perplexity(None)
    for stage in ("dapt", "sft"):
        for rate in args.rates:
            started = time.perf_counter()
            out = work / f"{stage}-{rate:g}"
            if stage == "dapt":
                config = DaptConfig(max_steps=args.steps, learning_rate=rate, batch_size=2, grad_accumulation=2,
                                    warmup_steps=1, save_steps=10_000, eval_heldout=True)
                result = train_dapt(base, data, out, config, LoraSettings())
                score = {"before": result.metrics.get("heldout_perplexity_before"),
                         "after": result.metrics.get("heldout_perplexity"), "metric": "heldout_perplexity",
                         "general_perplexity": general_perplexity(Path(result.adapter_path)),
                         "general_perplexity_base": general_base}
            else:
                config = SftConfig(max_steps=args.steps, learning_rate=rate, batch_size=2, grad_accumulation=2,
                                   warmup_steps=1, save_steps=10_000, eval_heldout=True)
                result = train_sft(base, data, out, config, LoraSettings())
                score = {"before": result.metrics.get("heldout_loss_before"),
                         "after": result.metrics.get("heldout_loss"), "metric": "heldout_answer_loss"}
            row = {"stage": stage, "learning_rate": rate, "steps": result.steps, **score,
                   "train_loss_last": result.train_loss_last, "seconds": round(time.perf_counter() - started, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    best = {stage: min((r for r in rows if r["stage"] == stage), key=lambda r: r["after"])["learning_rate"]
            for stage in ("dapt", "sft")}
    out = {"base": args.base, "steps": args.steps, "sft_heldout_rows": min(len(lines), args.heldout_rows),
           "effective_batch": 4, "seq_len": 256, "rows": rows, "best": best}
    atomic_write_text(ROOT / "bench" / "results" / f"{args.out}.json", json.dumps(out, indent=2) + "\n")
    print(json.dumps({"best": best}))


if __name__ == "__main__":
    main()
