"""Serving measurements of issue 11, in one run, one thread:

1. decode tokens/s and time to first token of SmolLM2-135M-Instruct: llama.cpp (embedded, Q4_1 GGUF)
   vs the transformers runtime (the same GGUF loaded as fp32), same prompts, greedy;
2. p50/p95 latency of `Orchestrator.ask` on the demo's three questions, router-only vs SmolLM2;
   with SmolLM2 also: does every answer keep the route's output, and end within its bounds;
3. "does the model help?": share of exam answers whose first two lines contain the answer,
   for router-only with the extractive answer, the passage dump before it, and the SmolLM2 orchestrator.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python bench/serving_bench.py \
        --exam bench/exams/hx-pumps.jsonl [--model-questions 15]

Needs an index of examples/docs in ATELIER_HOME (`atelier index examples/docs`). Writes
bench/results/serving.json.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = ["Explain in two sentences what a centrifugal pump does.", "Give three tips for saving energy at home.",
           "What is the capital of France? Answer in one sentence."]
DEMO = ["what torque for the HX-65 impeller nut", "what does fault code E14 mean", "convert 80 N m to lbf ft"]
NEW_TOKENS = 64


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def llamacpp_speed() -> dict:
    import openai

    from atelier.llamacpp import embedded_server

    server = embedded_server("smollm2-135m", n_ctx=4096)
    client = openai.OpenAI(base_url=server.url, api_key="x")
    runs = []
    for prompt in PROMPTS:
        start, first = time.perf_counter(), None
        stream = client.chat.completions.create(model="m", messages=[{"role": "user", "content": prompt}],
                                                max_tokens=NEW_TOKENS, temperature=0, stream=True,
                                                extra_body={"ignore_eos": True, "timings_per_token": False})
        timings = None
        for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - start
            timings = (chunk.model_extra or {}).get("timings") or timings
        runs.append({"ttft_s": round(first, 4), "decode_tok_s": round(timings["predicted_per_second"], 2),
                     "tokens": timings["predicted_n"]})
    return {"runs": runs, "decode_tok_s": statistics.median(r["decode_tok_s"] for r in runs),
            "ttft_s": statistics.median(r["ttft_s"] for r in runs)}


def transformers_speed() -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from atelier.catalog import catalog_gguf

    torch.set_num_threads(1)
    gguf = catalog_gguf("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    runs = []
    for prompt in PROMPTS:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
        with torch.inference_mode():
            start = time.perf_counter()
            out = model(input_ids=ids, use_cache=True)
            past, token = out.past_key_values, out.logits[0, -1].argmax().view(1, 1)
            first = time.perf_counter() - start
            decode_start = time.perf_counter()
            for _ in range(NEW_TOKENS - 1):
                out = model(input_ids=token, past_key_values=past, use_cache=True)
                past, token = out.past_key_values, out.logits[0, -1].argmax().view(1, 1)
            decode = time.perf_counter() - decode_start
        runs.append({"ttft_s": round(first, 4), "decode_tok_s": round((NEW_TOKENS - 1) / decode, 2),
                     "tokens": NEW_TOKENS})
    return {"runs": runs, "decode_tok_s": statistics.median(r["decode_tok_s"] for r in runs),
            "ttft_s": statistics.median(r["ttft_s"] for r in runs)}


def ask_latency(model: str | None, repeats: int) -> dict:
    from agents.orchestrator import Orchestrator, OrchestratorConfig

    config = OrchestratorConfig(model={"name": model} if model else {})
    orchestrator = Orchestrator(config)
    times, answers = [], []
    try:
        orchestrator.ask(DEMO[0], thread_id="warm")  # router fit, encoder load: not per-request costs
        for r in range(repeats):
            for i, question in enumerate(DEMO):
                start = time.perf_counter()
                answer = orchestrator.ask(question, thread_id=f"lat-{r}-{i}")
                times.append(time.perf_counter() - start)
                if r == 0:
                    answers.append({"question": question, "route": answer.route, "finish": answer.finish,
                                    "route_output_kept": answer.route_output in answer.text,
                                    "first_line": answer.text.splitlines()[0][:200] if answer.text else ""})
    finally:
        orchestrator.close()
    return {"model": model, "requests": len(times), "p50_s": round(pct(times, 0.5), 3),
            "p95_s": round(pct(times, 0.95), 3), "answers": answers}


def _norm(text: str) -> str:
    return "".join(text.lower().replace("·", "").replace("−", "-").split())


def _hit(text: str, item: dict) -> bool:
    head = _norm("\n".join(text.strip().splitlines()[:2]))
    return any(_norm(a) in head for a in [item["answer"], *(item.get("aliases") or [])] if a)


def exam(path: Path, model_questions: int) -> dict:
    from agents.graph import last_question  # noqa: F401  (graph module import: the same code path as ask)
    from agents.orchestrator import Orchestrator, OrchestratorConfig

    items = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    scores = {"extractive": [], "passage_dump": [], "smollm2": []}
    plain = Orchestrator(OrchestratorConfig())
    try:
        for item in items:
            answer = plain.ask(item["question"], thread_id=f"exam-{item['id']}")
            scores["extractive"].append(_hit(answer.text, item))
            dump = answer.text.split("From the documents:", 1)[-1] if answer.route == "search" else answer.text
            scores["passage_dump"].append(_hit("From the documents:" + dump if answer.route == "search" else dump, item))
    finally:
        plain.close()
    model = Orchestrator(OrchestratorConfig(model={"name": "llamacpp:smollm2-135m"}))
    try:
        for item in items[:model_questions]:
            answer = model.ask(item["question"], thread_id=f"exam-m-{item['id']}")
            written = answer.text[: len(answer.text) - len(answer.route_output)] if answer.route_output else answer.text
            scores["smollm2"].append(_hit(written if written.strip() else answer.text, item))
    finally:
        model.close()
    share = {k: round(sum(v) / len(v), 3) if v else None for k, v in scores.items()}
    return {"exam": str(path), "questions": len(items), "smollm2_questions": len(scores["smollm2"]),
            "share_first_two_lines": share,
            "router_only_on_the_same_subset": round(sum(scores["extractive"][:model_questions])
                                                    / max(1, min(model_questions, len(items))), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exam", type=Path, default=ROOT / "bench" / "exams" / "hx-pumps.jsonl")
    parser.add_argument("--model-questions", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip", nargs="*", default=[], choices=["speed", "latency", "exam"])
    args = parser.parse_args()
    out = ROOT / "bench" / "results" / "serving.json"
    results: dict = json.loads(out.read_text()) if out.is_file() else {}
    if "speed" not in args.skip:
        llama, hf = llamacpp_speed(), transformers_speed()
        results["speed"] = {"llamacpp_q4_1": llama, "transformers_fp32": hf,
                            "decode_speedup": round(llama["decode_tok_s"] / hf["decode_tok_s"], 2)}
        print(json.dumps(results["speed"], indent=1))
    if "latency" not in args.skip:
        results["ask_latency"] = {"router_only": ask_latency(None, args.repeats),
                                  "smollm2": ask_latency("llamacpp:smollm2-135m", args.repeats)}
        print(json.dumps(results["ask_latency"], indent=1))
    if "exam" not in args.skip and args.exam.is_file():
        results["exam"] = exam(args.exam, args.model_questions)
        print(json.dumps(results["exam"], indent=1))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
