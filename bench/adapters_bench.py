"""Many specialists on one base: memory and adapter-switch cost of specialists/runtime.py.

The base is a random Llama (hidden 384, 6 layers, vocab ~4k, ~12 M parameters: scratch:small's
shape) with the scratch BPE tokenizer; the adapters are LoRA r=16 on every linear layer (the
training default) with random B weights, registered as specialists in a temporary registry.

1. Memory, N = 1, 5, 20 specialists on the base, each N in a fresh subprocess: parameter
   bytes of the loaded model and the process RSS growth, against base + N x adapter bytes
   (the base alone is measured the same way, as a full-model specialist).
2. Switch cost, interleaved in one run (machine noise hits both sides alike), p50 over
   `--iters` rounds, with 2 and with 20 adapters attached:
   - raw: the runtime's adapter switch + a 1-token forward (on a 32-token KV cache), vs the same
     forward without switching; and PEFT's own set_adapter + that forward, for comparison;
   - end to end: runtime.generate(another specialist, max_tokens=1) vs generate(the active one).

Usage: OMP_NUM_THREADS=1 .venv/bin/python bench/adapters_bench.py [--iters 200]
Writes bench/results/adapters.json and prints a table.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results" / "adapters.json"
SHAPE = {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 6, "intermediate_size": 1024}
COUNTS = (1, 5, 20)
ASK = [{"role": "user", "content": "How do I bleed air from the hydraulic pump after replacing the filter?"}]


# ----------------------------------------------------------------------------- building the specialists


def build(work: Path, count: int) -> tuple[Path, int]:
    """A base, `count` adapters and a registry home holding them as s0..s{count-1} plus 'base';
    returns the home and the base's parameter count."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from specialists.registry import Registry
    from training.models import GENERAL_CORPUS, train_tokenizer

    tokenizer = train_tokenizer([GENERAL_CORPUS.read_text(encoding="utf-8")], 4096)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=512, tie_word_embeddings=True,
                         num_key_value_heads=SHAPE["num_attention_heads"], bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **SHAPE)
    torch.manual_seed(0)
    base = work / "base"
    initial = LlamaForCausalLM(config)
    initial.save_pretrained(base)
    tokenizer.save_pretrained(base)

    model = get_peft_model(LlamaForCausalLM.from_pretrained(base),
                           LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    registry = Registry(work / "home")
    registry.register("base", base_model=str(base), model_dir=base, eval_report={}, force=True)
    for i in range(count):
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.02)
        model.save_pretrained(work / f"adapter-{i}")
        registry.register(f"s{i}", base_model=str(base), adapter_dir=work / f"adapter-{i}", eval_report={}, force=True)
    return work / "home", initial.num_parameters()


def adapter_bytes(home: Path) -> int:
    """Bytes of one adapter's tensors (all adapters have the same shape)."""
    from safetensors.torch import load_file

    from specialists.registry import Registry

    weights = load_file(Path(Registry(home).get("s0").adapter_path) / "adapter_model.safetensors")
    return sum(t.numel() * t.element_size() for t in weights.values())


# ----------------------------------------------------------------------------- memory (one subprocess per N)


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def child(home: Path, count: int) -> dict:
    """Load the base alone (count=0) or with `count` adapters; report parameter bytes and RSS growth."""
    import peft  # noqa: F401  (imported before the first RSS reading, like torch and transformers)
    import transformers  # noqa: F401

    from specialists.generation import GenerationParams
    from specialists.registry import Registry
    from specialists.runtime import RuntimeConfig, SpecialistRuntime

    runtime = SpecialistRuntime(Registry(home), RuntimeConfig(device="cpu"))
    before = rss_bytes()
    for name in ["base"] if count == 0 else [f"s{i}" for i in range(count)]:
        runtime.generate(name, ASK, GenerationParams(max_tokens=1))
    (loaded,) = runtime.loaded().values()
    return {"parameter_bytes": loaded.parameter_bytes, "rss_growth_bytes": rss_bytes() - before,
            "adapters": len(loaded.adapters)}


def bench_memory(home: Path) -> dict:
    runs = {}
    for count in (0, *COUNTS):
        out = subprocess.run([sys.executable, __file__, "--child", str(count), "--home", str(home)],
                             check=True, capture_output=True, text=True).stdout
        runs[count] = json.loads(out.strip().splitlines()[-1])
    base, adapter = runs[0]["parameter_bytes"], adapter_bytes(home)
    rows = []
    for count in COUNTS:
        expected = base + count * adapter
        adapters_rss = runs[count]["rss_growth_bytes"] - runs[0]["rss_growth_bytes"]
        rows.append({"n": count, "expected_bytes": expected, **runs[count],
                     "parameter_over_expected": round(runs[count]["parameter_bytes"] / expected, 4),
                     "rss_over_expected": round(runs[count]["rss_growth_bytes"] / expected, 3),
                     "adapters_rss_bytes": adapters_rss,
                     "adapters_rss_over_adapter_bytes": round(adapters_rss / (count * adapter), 3)})
    return {"base_parameter_bytes": base, "base_rss_growth_bytes": runs[0]["rss_growth_bytes"],
            "adapter_bytes": adapter, "rows": rows}


# ----------------------------------------------------------------------------- switch cost


def p50_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000, 3)


def bench_switch(home: Path, attached: int, iters: int) -> dict:
    """p50s of one round-robin over: a forward with no switch; the runtime's switch + the same
    forward; PEFT's own set_adapter + the same forward; and runtime.generate(max_tokens=1) on the
    active specialist vs on another one. All interleaved, so load on the machine hits each alike."""
    import torch

    from specialists.generation import GenerationParams
    from specialists.registry import Registry
    from specialists.runtime import RuntimeConfig, SpecialistRuntime

    runtime = SpecialistRuntime(Registry(home), RuntimeConfig(device="cpu"))
    one = GenerationParams(max_tokens=1)
    for i in range(attached):
        runtime.generate(f"s{i}", ASK, one)
    (base,) = runtime._bases.values()  # the bench reaches inside for the model and its switch
    prompt, token = torch.tensor([list(range(5, 37))]), torch.tensor([[42]])
    samples: dict[str, list[float]] = {k: [] for k in ("forward", "switch+forward", "switch", "peft set_adapter+forward",
                                                        "generate same", "generate switch")}

    def timed(key: str, switch=None) -> None:
        """A 1-token forward on a 32-token KV cache (built untimed), after `switch` if given."""
        with torch.inference_mode():
            cache = base.model(input_ids=prompt, use_cache=True).past_key_values
            started = time.perf_counter()
            if switch is not None:
                switch()
                switched = time.perf_counter()
            base.model(input_ids=token, past_key_values=cache, use_cache=True)
            samples[key].append(time.perf_counter() - started)
        if key == "switch+forward":
            samples["switch"].append(switched - started)

    for i in range(iters):
        one_name, other = ("s0", "s1") if i % 2 else ("s1", "s0")
        base._switch(one_name)
        timed("forward")
        timed("switch+forward", partial(base._switch, other))
        timed("peft set_adapter+forward", partial(base.peft.set_adapter, one_name, inference_mode=True))
        base.active = one_name  # keep the runtime's record in step with the switches above
        for key, name in (("generate same", one_name), ("generate switch", other)):
            started = time.perf_counter()
            runtime.generate(name, ASK, one)
            samples[key].append(time.perf_counter() - started)
    result = {k: p50_ms(v) for k, v in samples.items()}
    result["switch_cost_ms"] = round(result["switch+forward"] - result["forward"], 3)
    result["peft_switch_cost_ms"] = round(result["peft set_adapter+forward"] - result["forward"], 3)
    result["runtime_switch_cost_ms"] = round(result["generate switch"] - result["generate same"], 3)
    result["adapters_attached"] = attached
    return result


# ----------------------------------------------------------------------------- report


def print_table(report: dict) -> None:
    mem = report["memory"]
    mb = lambda b: f"{b / 2**20:.1f}"
    print(f"\nMemory (MiB): base {mb(mem['base_parameter_bytes'])} of parameters ({report['base_parameters']:,}), "
          f"one adapter {mem['adapter_bytes'] / 2**20:.2f} (LoRA r=16, all-linear); "
          f"RSS growth of the base alone {mb(mem['base_rss_growth_bytes'])}")
    print(f"{'N':>3} {'base+N*adapter':>15} {'parameters':>11} {'ratio':>6} {'N*adapter':>10} "
          f"{'RSS(N)-RSS(base)':>17} {'ratio':>6}")
    for row in mem["rows"]:
        print(f"{row['n']:>3} {mb(row['expected_bytes']):>15} {mb(row['parameter_bytes']):>11} "
              f"{row['parameter_over_expected']:>6.3f} {mb(row['n'] * mem['adapter_bytes']):>10} "
              f"{mb(row['adapters_rss_bytes']):>17} {row['adapters_rss_over_adapter_bytes']:>6.2f}")
    print(f"\nSwitch cost, p50 over {report['iters']} interleaved rounds (ms); cost = with switch - without")
    print(f"{'attached':>8} {'fwd':>7} {'switch+fwd':>11} {'switch':>7} {'cost':>6} {'peft+fwd':>9} {'cost':>6}   "
          f"{'gen same':>9} {'gen switch':>11} {'cost':>6}")
    for row in report["switch"]:
        print(f"{row['adapters_attached']:>8} {row['forward']:>7.2f} {row['switch+forward']:>11.2f} "
              f"{row['switch']:>7.3f} {row['switch_cost_ms']:>6.2f} {row['peft set_adapter+forward']:>9.2f} "
              f"{row['peft_switch_cost_ms']:>6.2f}   {row['generate same']:>9.2f} {row['generate switch']:>11.2f} "
              f"{row['runtime_switch_cost_ms']:>6.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=200, help="Interleaved rounds per switch measurement.")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--home", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.home, args.child)))
        return
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        home, parameters = build(Path(tmp), max(COUNTS))
        built = time.perf_counter() - started
        memory = bench_memory(home)
        switch = [bench_switch(home, attached, args.iters) for attached in (2, max(COUNTS))]
    report = {"shape": SHAPE, "base_parameters": parameters, "iters": args.iters,
              "threads": torch.get_num_threads(), "build_s": round(built, 1), "memory": memory, "switch": switch,
              "target": "switch cost <= 5 ms; memory near base + N x adapter"}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
