"""The mission's claim at small scale: a specialist on SmolLM2-135M from the sample manuals, against
its base and against Gemma 3 270M (twice its size, general), on a held-out exam and on the
pipeline's own held-out split — plus forgetting, throughput and the budgeted recipe.

Phases (each writes its part of bench/results/specialist-<label>.json, so a long run can be
resumed phase by phase):

  train     atelier specialist add on --docs with the recipe (full by default; --budget N
            for the budgeted one); records the timings, the stage throughputs and the gate.
            `--docs scifact:300` takes 300 SciFact abstracts (shared data) instead of the manuals.
  evaluate  eval.specialist on --exam: base, specialist and gemma3-270m, multiple choice and
            closed-book QA with 95% bootstrap intervals; perplexity on general English
            (forgetting: training/resources/general_en.txt) for base and specialist.
  throughput  the trainer's tokens/s against raw forward+backward+step on the same packed
            batches, in one run (and the padding/packing waste of each stage's data).

Usage (OMP_NUM_THREADS=1, one core; hours on a CPU, minutes on a GPU):
  .venv/bin/python bench/specialist_bench.py train --label full
  .venv/bin/python bench/specialist_bench.py evaluate --label full --exam bench/exams/hx-pumps.jsonl
  .venv/bin/python bench/specialist_bench.py train --label budget8 --budget 8
  .venv/bin/python bench/specialist_bench.py throughput --label full
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results"
GENERAL = ROOT / "training" / "resources" / "general_en.txt"


def _results_file(label: str) -> Path:
    return RESULTS / f"specialist-{label}.json"


def _load(label: str) -> dict:
    path = _results_file(label)
    return json.loads(path.read_text()) if path.exists() else {}


def _save(label: str, part: str, data: dict) -> None:
    from atelier.home import atomic_write_text

    results = _load(label)
    results[part] = data
    atomic_write_text(_results_file(label), json.dumps(results, indent=2, default=str) + "\n")
    print(json.dumps({part: data}, indent=2, default=str))


def scifact_docs(count: int, seed: int = 0) -> Path:
    """`count` abstracts of the BEIR SciFact corpus (shared data; never copied into the repo) as a
    JSONL document folder in a temporary directory: documents nobody here wrote."""
    import random
    import tempfile

    corpus = ROOT.parent / "shared" / "data" / "scifact-train" / "corpus.jsonl"
    rows = [json.loads(line) for line in corpus.read_text(encoding="utf-8").splitlines() if line.strip()]
    picked = random.Random(seed).sample(rows, count)
    folder = Path(tempfile.mkdtemp(prefix="scifact-docs-"))
    (folder / "abstracts.jsonl").write_text("".join(
        json.dumps({"id": r["_id"], "title": r["title"], "text": r["text"]}) + "\n" for r in picked), encoding="utf-8")
    return folder


def phase_train(args) -> None:
    from training.config import SpecialistConfig
    from training.pipeline import PipelineHooks, run_pipeline

    if args.docs.startswith("scifact:"):
        args.docs = str(scifact_docs(int(args.docs.split(":", 1)[1])))
    config = SpecialistConfig(base=args.base, budget_minutes=args.budget)
    marks = []

    def done(name: str, seconds: float, note: str) -> None:
        marks.append({"step": name, "seconds": round(seconds, 1), "note": note})
        print(f"[{time.strftime('%H:%M:%S')}] {name} {seconds:.1f}s {note}", flush=True)

    last = {"t": 0.0}

    def progress(step: int, total: int, loss, tokens_seen: int = 0) -> None:
        if time.perf_counter() - last["t"] > 60 or step == total:
            last["t"] = time.perf_counter()
            print(f"[{time.strftime('%H:%M:%S')}]   step {step}/{total} loss {loss} tokens {tokens_seen}", flush=True)

    hooks = PipelineHooks(step=lambda n, d: print(f"[{time.strftime('%H:%M:%S')}] {n}: {d}", flush=True),
                          done=done, train_progress=progress)
    started = time.perf_counter()
    result = run_pipeline(args.name, Path(args.docs), config, force=True, new_run=True, hooks=hooks)
    wall = time.perf_counter() - started
    _save(args.label, "train", {
        "base": args.base, "docs": args.docs, "budget_minutes": args.budget, "wall_s": round(wall, 1),
        "within_budget": (wall <= args.budget * 60 * 1.1) if args.budget else None,
        "run_dir": str(result.run_dir), "registered": f"{args.name} v{result.record.version}",
        "forced": result.record.forced, "gate": result.report.to_dict(), "timings": result.timings, "steps": marks,
        "stages": {s: {k: v for k, v in r.items() if k in ("steps", "tokens_per_s", "runtime_s", "train_loss_first",
                                                            "train_loss_last", "metrics")}
                   for s, r in result.stages.items()},
        "data": result.data_counts, "home": os.environ.get("ATELIER_HOME")})


def phase_evaluate(args) -> None:
    """`atelier eval specialist` from Python, on the exam (or the held-out split without one)."""
    from eval.side_by_side import evaluate_specialist
    from eval.specialist import SpecialistEvalConfig

    trained = _load(args.label).get("train") or {}
    started = time.perf_counter()
    config = SpecialistEvalConfig(mcq_normalization=args.mcq_normalization)
    summary, _rows = evaluate_specialist(args.name, exam=Path(args.exam) if args.exam else None,
                                         against=args.against, rag=args.rag,
                                         docs=ROOT / "examples" / "docs" if args.rag else None,
                                         general=GENERAL if args.general else None, config=config)
    summary["wall_s"] = round(time.perf_counter() - started, 1)
    summary["registered"] = trained.get("registered")
    summary["mcq_normalization"] = args.mcq_normalization
    part = f"evaluate:{Path(args.exam).stem if args.exam else 'heldout'}"
    _save(args.label, part + ("" if args.mcq_normalization == "bytes" else f":{args.mcq_normalization}"), summary)


def phase_throughput(args) -> None:
    """Trainer tokens/s vs raw forward+backward+AdamW on the same packed DAPT blocks."""
    import torch

    from specialists.loading import load_tokenizer
    from training.dapt import DaptConfig, PadCollator, to_blocks, train_dapt
    from training.lora import LoraSettings, trainable_model
    from training.models import resolve_base
    from training.trainer_common import read_rows

    trained = _load(args.label).get("train") or {}
    data_dir = Path(trained["run_dir"]) / "data"
    base = resolve_base(args.base, work_dir=Path("/tmp/unused"), corpus_texts=None, seed=0)
    tokenizer = load_tokenizer(base)
    texts = [r["text"] for r in read_rows(data_dir / "dapt" / "train.jsonl", ("text",))]
    blocks = to_blocks(texts, tokenizer, 256, packing=True)
    steps, batch = args.steps, 2
    lora = LoraSettings()
    model = trainable_model(base, None, lora, full=False)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    collate = PadCollator(tokenizer.pad_token_id)
    tokens, seconds = 0, 0.0
    for step in range(steps + 1):
        rows = collate(blocks[step * batch:(step + 1) * batch])
        started = time.perf_counter()
        model(**rows, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:  # the first step warms up
            seconds += time.perf_counter() - started
            tokens += int(rows["attention_mask"].sum())
    raw = tokens / seconds
    del model, optimizer
    out = Path("/tmp/atelier-throughput")
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    config = DaptConfig(max_steps=steps, batch_size=batch, learning_rate=1e-5, eval_heldout=False, save_steps=10_000,
                        logging_steps=1)
    result = train_dapt(base, data_dir, out, config, lora, progress=lambda *a, **k: None)
    waste = {}
    for stage, key in (("dapt", "text"), ("sft", "messages")):
        rows = read_rows(data_dir / stage / "train.jsonl", (key,))
        lengths = [len(tokenizer.apply_chat_template(r[key], tokenize=True, return_dict=False)) if key == "messages"
                   else len(tokenizer(r[key])["input_ids"]) for r in rows]
        padded = sum(max(lengths[i:i + 8]) * len(lengths[i:i + 8]) for i in range(0, len(lengths), 8))
        waste[stage] = {"rows": len(rows), "tokens": sum(lengths),
                        "padding_share_unpacked_batch8": round(1 - sum(lengths) / padded, 3),
                        "padding_share_packed": 0.0}
    _save(args.label, "throughput", {"raw_tokens_per_s": round(raw, 1), "trainer_tokens_per_s": result.tokens_per_s,
                                     "ratio": round(result.tokens_per_s / raw, 3), "steps": steps, "batch": batch,
                                     "seq_len": 256, "waste": waste})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("phase", choices=["train", "evaluate", "throughput"])
    parser.add_argument("--label", default="full")
    parser.add_argument("--name", default="hx")
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--docs", default=str(ROOT / "examples" / "docs"))
    parser.add_argument("--budget", type=float, default=None)
    parser.add_argument("--exam", default=None)
    parser.add_argument("--against", nargs="*", default=["gemma3-270m"])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rag", action="store_true", help="evaluate: also search and specialist+search")
    parser.add_argument("--mcq-normalization", default="bytes", choices=["bytes", "tokens", "none", "pmi"],
                        help="evaluate: how options are scored (eval.specialist.SpecialistEvalConfig)")
    parser.add_argument("--no-general", dest="general", action="store_false",
                        help="evaluate: skip the general-English perplexity (forgetting)")
    args = parser.parse_args()
    {"train": phase_train, "evaluate": phase_evaluate, "throughput": phase_throughput}[args.phase](args)


if __name__ == "__main__":
    main()
