"""Serving measurements of issue 11, in one run, one thread:

1. decode tokens/s and time to first token of SmolLM2-135M-Instruct: llama.cpp (embedded, Q4_1 GGUF)
   vs the transformers runtime (the same GGUF loaded as fp32), same prompts, greedy;
1b. the same for one *specialist* (base + LoRA adapter, r 16 on every linear layer as `specialist add`
   trains it, random non-zero B): served by llama.cpp (original Q4_1 GGUF + the adapter as a GGUF LoRA
   adapter, chosen per request) vs the transformers runtime (specialists/runtime.py, fp32 base +
   PEFT adapter), both through SpecialistRuntime.stream, one thread; plus the export parity check of
   llama.cpp with / without the adapter against transformers base+adapter / base;
2. p50/p95 latency of `Orchestrator.ask` on the demo's three questions, router-only vs SmolLM2;
   with SmolLM2 also: does every answer keep the route's output, and end within its bounds;
3. "does the model help?": share of exam answers whose first two lines contain the answer,
   for router-only with the extractive answer, the passage dump before it, and the SmolLM2 orchestrator.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python bench/serving_bench.py \
        --exam bench/exams/hx-pumps.jsonl [--model-questions 15]

Needs an index of examples/docs in ATELIER_HOME (`atelier index examples/docs`) for the latency and
exam phases; the specialist phase converts SmolLM2 into ATELIER_HOME/bases once (or give --bases-home,
e.g. the tests' .pytest_cache/d/atelier-bases). Writes bench/results/serving.json.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

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


def specialist_speed(bases_home: Path | None, repeats: int = 2) -> dict:
    """One specialist, llama.cpp (base GGUF + GGUF LoRA adapter) vs the transformers runtime."""
    import tempfile

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from specialists.export.gguf_lora import write_lora_gguf
    from specialists.export.parity import BUILTIN_PROMPTS, check_parity_in_llamacpp, reference_probes
    from specialists.generation import GenerationParams
    from specialists.registry import Registry
    from specialists.runtime import RuntimeConfig, SpecialistRuntime
    from training.models import resolve_base

    torch.set_num_threads(1)
    saved = os.environ.get("ATELIER_HOME")
    if bases_home:
        os.environ["ATELIER_HOME"] = str(bases_home)
    try:
        base_dir = Path(resolve_base("smollm2-135m", work_dir=Path(tempfile.mkdtemp()), corpus_texts=None, seed=0))
    finally:
        if bases_home:
            os.environ.pop("ATELIER_HOME", None) if saved is None else os.environ.__setitem__("ATELIER_HOME", saved)
    gguf = Path(json.loads((base_dir / "atelier-base.json").read_text())["gguf"])
    root = Path(tempfile.mkdtemp(prefix="serving-bench-"))
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.1)
    model.save_pretrained(root / "adapter")
    lora = write_lora_gguf(root / "adapter", base.config, root / "adapter.gguf", name="bench-lora")
    model.eval()
    conversations = [[{"role": "user", "content": t}] for t in BUILTIN_PROMPTS]
    probes = reference_probes(model, tokenizer, conversations)
    with model.disable_adapter():
        base_probes = reference_probes(model, tokenizer, conversations)
    parity = {"with_adapter": check_parity_in_llamacpp(probes, gguf, "quantized", "specialist", tokenizer,
                                                       adapter=lora).model_dump(),
              "adapter_off_vs_base": check_parity_in_llamacpp(base_probes, gguf, "quantized", "base",
                                                              tokenizer).model_dump()}
    del model, base
    (root / "export").mkdir()
    (root / "export" / "export.json").write_text(json.dumps({"llamacpp": {"base": str(gguf), "adapter": str(lora)}}))
    registry = Registry(root / "home")
    registry.register("spec-transformers", base_model=str(base_dir), adapter_dir=root / "adapter", eval_report={},
                      force=True)
    registry.register("spec-llamacpp", base_model=str(base_dir), adapter_dir=root / "adapter", eval_report={},
                      force=True, served_by=f"llamacpp:{root / 'export'}")
    runtime = SpecialistRuntime(registry, RuntimeConfig(device="cpu", served_num_ctx=4096))
    params = GenerationParams(max_tokens=NEW_TOKENS)
    names = {"llamacpp": "spec-llamacpp", "transformers": "spec-transformers"}
    for name in names.values():
        runtime.generate(name, [{"role": "user", "content": "Hi"}], GenerationParams(max_tokens=2))  # load / start
    runs: dict[str, list] = {label: [] for label in names}
    load_before = os.getloadavg()[0]
    for _ in range(repeats):  # interleaved, so a busy neighbour slows both alike
        for prompt in PROMPTS:
            for label, name in names.items():
                start = time.perf_counter()
                stream = runtime.stream(name, [{"role": "user", "content": prompt}], params)
                first = None
                for _ in stream:
                    if first is None:
                        first = time.perf_counter()
                end, tokens = time.perf_counter(), stream.generation.usage.completion_tokens
                runs[label].append({"ttft_s": round(first - start, 4), "tokens": tokens,
                                    "decode_tok_s": round((tokens - 1) / (end - first), 2)})
    out = {label: {"runs": r, "decode_tok_s": statistics.median(x["decode_tok_s"] for x in r),
                   "ttft_s": statistics.median(x["ttft_s"] for x in r)} for label, r in runs.items()}
    runtime.unload()
    return {"specialist": "SmolLM2-135M-Instruct + LoRA r16 all-linear (random B)", "threads": 1,
            "llamacpp_q4_1_plus_gguf_adapter": out["llamacpp"],
            "transformers_runtime_fp32_plus_peft": out["transformers"],
            "decode_speedup": round(out["llamacpp"]["decode_tok_s"] / out["transformers"]["decode_tok_s"], 2),
            "ttft_speedup": round(out["transformers"]["ttft_s"] / out["llamacpp"]["ttft_s"], 2),
            "target_decode_speedup": 4.0, "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
            "cpu_cores": os.cpu_count(), "parity": parity}


def ask_latency(model: str | None, repeats: int) -> dict:
    from agents.config import OrchestratorConfig
    from agents.orchestrator import Orchestrator

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
    from agents.config import OrchestratorConfig
    from agents.graph import last_question  # noqa: F401  (graph module import: the same code path as ask)
    from agents.orchestrator import Orchestrator

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
    parser.add_argument("--skip", nargs="*", default=[], choices=["speed", "specialist", "latency", "exam"])
    parser.add_argument("--bases-home", type=Path, default=None, help="where converted bases are (default ATELIER_HOME)")
    args = parser.parse_args()
    out = ROOT / "bench" / "results" / "serving.json"
    results: dict = json.loads(out.read_text()) if out.is_file() else {}
    if "speed" not in args.skip:
        llama, hf = llamacpp_speed(), transformers_speed()
        results["speed"] = {"llamacpp_q4_1": llama, "transformers_fp32": hf,
                            "decode_speedup": round(llama["decode_tok_s"] / hf["decode_tok_s"], 2)}
        print(json.dumps(results["speed"], indent=1))
    if "specialist" not in args.skip:
        results["specialist_speed"] = specialist_speed(args.bases_home, args.repeats)
        print(json.dumps(results["specialist_speed"], indent=1))
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
