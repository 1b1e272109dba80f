"""Training side-by-sides on the tiny scratch model, as ratios within one run (runner noise cancels).

1. DAPT with packing vs without, on the same paragraphs of examples/docs (a mix of short and
   long texts): non-padding tokens per second, non-padding tokens per step, steps per second.
   Published ceilings: ~2x with very mixed lengths, ~1.4x with homogeneous ones.
2. LoRA vs full fine-tuning of the same model: trainable-parameter share, AdamW state bytes,
   seconds per step, and what lands on disk (adapter vs whole model).

Usage: OMP_NUM_THREADS=1 .venv/bin/python bench/training_bench.py [--steps 30]
Writes bench/results/training.json and prints a table.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from retrieval.documents import load_folder
from specialists.loading import load_tokenizer
from training.dapt import DaptConfig, PadCollator, to_blocks, train_dapt
from training.lora import LoraSettings, trainable_model, trainable_share
from training.models import resolve_base

DOCS = ROOT / "examples" / "docs"
RESULTS = ROOT / "bench" / "results" / "training.json"


def paragraphs() -> list[str]:
    """Every paragraph of the example documents: lengths from one line to a page."""
    found = []
    for doc in load_folder(DOCS).documents:
        found += [" ".join(p.split()) for p in re.split(r"\n\s*\n", doc.text) if len(p.strip()) >= 40]
    return found


def bench_packing(base: Path, work: Path, texts: list[str], steps: int) -> dict:
    """Same rows, same steps and batch: packing on vs off."""
    data = work / "data" / "dapt"
    data.mkdir(parents=True)
    (data / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tokenizer = load_tokenizer(base)
    rows = {}
    for packing in (True, False):
        config = DaptConfig(max_steps=steps, packing=packing, eval_heldout=False, save_steps=10_000, logging_steps=5)
        result = train_dapt(base, work / "data", work / f"packing-{packing}", config, LoraSettings(),
                            progress=lambda *a, **k: None)
        blocks = to_blocks(texts, tokenizer, config.seq_len, packing=packing)
        rows["packed" if packing else "padded"] = {
            "tokens_per_s": result.tokens_per_s, "steps_per_s": round(result.steps / result.runtime_s, 3),
            "non_pad_tokens_per_step": round(result.tokens_per_s * result.runtime_s / result.steps, 1),
            "sequences_per_epoch": len(blocks), "final_loss": result.train_loss_last}
    rows["tokens_per_s_ratio"] = round(rows["packed"]["tokens_per_s"] / rows["padded"]["tokens_per_s"], 2)
    return rows


def bench_lora_vs_full(base: Path, work: Path, texts: list[str], steps: int) -> dict:
    """Trainable share, optimizer state, step time and bytes on disk for the same model."""
    import torch

    tokenizer = load_tokenizer(base)
    blocks = to_blocks(texts, tokenizer, 256, packing=True)
    collate = PadCollator(tokenizer.pad_token_id)
    rows = {}
    for name, lora in (("lora_r16", LoraSettings()), ("full", LoraSettings(method="full"))):
        torch.manual_seed(0)
        model = trainable_model(base, None, lora, full=lora.method == "full")
        trainable, total = trainable_share(model)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        started = time.perf_counter()
        for step in range(steps):
            batch = collate(blocks[(step * 8) % len(blocks):][:8] or blocks[:8])
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        seconds = (time.perf_counter() - started) / steps
        state_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values()
                          for t in s.values() if torch.is_tensor(t))
        target = work / name
        model.save_pretrained(str(target))
        disk = sum(f.stat().st_size for f in target.glob("*.safetensors"))
        rows[name] = {"trainable_params": trainable, "total_params": total,
                      "trainable_share": round(trainable / total, 4), "optimizer_state_bytes": state_bytes,
                      "seconds_per_step": round(seconds, 4), "weights_on_disk_bytes": disk}
    full, lora = rows["full"], rows["lora_r16"]
    rows["disk_ratio_full_over_lora"] = round(full["weights_on_disk_bytes"] / lora["weights_on_disk_bytes"], 1)
    rows["step_time_ratio_full_over_lora"] = round(full["seconds_per_step"] / lora["seconds_per_step"], 2)
    return rows


def print_table(report: dict) -> None:
    packing = report["packing"]
    print(f"\nDAPT packing on vs off ({report['steps']} steps, batch 8 x 256 tokens, scratch:tiny)")
    print(f"{'':8} {'tokens/s':>9} {'steps/s':>8} {'tok/step':>9} {'seqs/epoch':>10} {'loss':>6}")
    for name in ("packed", "padded"):
        row = packing[name]
        print(f"{name:8} {row['tokens_per_s']:>9.0f} {row['steps_per_s']:>8.2f} {row['non_pad_tokens_per_step']:>9.0f} "
              f"{row['sequences_per_epoch']:>10} {row['final_loss']:>6.2f}")
    print(f"packed / padded tokens per second: {packing['tokens_per_s_ratio']}x")
    lora = report["lora_vs_full"]
    print("\nLoRA (r=16, all-linear) vs full fine-tuning, same model")
    print(f"{'':9} {'trainable':>10} {'share':>7} {'AdamW state':>12} {'s/step':>7} {'on disk':>10}")
    for name in ("lora_r16", "full"):
        row = lora[name]
        print(f"{name:9} {row['trainable_params']:>10,} {row['trainable_share']:>7.1%} "
              f"{row['optimizer_state_bytes'] / 1e6:>10.2f}MB {row['seconds_per_step']:>7.3f} "
              f"{row['weights_on_disk_bytes'] / 1e6:>8.2f}MB")
    print(f"full / LoRA: {lora['disk_ratio_full_over_lora']}x on disk, "
          f"{lora['step_time_ratio_full_over_lora']}x step time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="training steps per measured configuration")
    args = parser.parse_args()
    texts = paragraphs()
    with tempfile.TemporaryDirectory(prefix="atelier-training-bench-") as tmp:
        work = Path(tmp)
        base = resolve_base("scratch:tiny", work_dir=work / "base", corpus_texts=texts, seed=0)
        report = {"steps": args.steps, "paragraphs": len(texts), "omp_threads": os.environ.get("OMP_NUM_THREADS"),
                  "packing": bench_packing(base, work / "packing", texts, args.steps),
                  "lora_vs_full": bench_lora_vs_full(base, work / "lora", texts, max(5, args.steps // 3))}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print(f"\nwrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
