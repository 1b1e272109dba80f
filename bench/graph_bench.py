"""Graph overhead per request, model time excluded: the orchestrator graph vs calling the same
route's work directly, side by side in one run (router-only mode, the calculator tool route).

    OMP_NUM_THREADS=1 .venv/bin/python bench/graph_bench.py [--requests 300]

The router is replaced by a precomputed decision (its own cost is the embedding, measured in
bench/routing_bench.py), so what remains is LangGraph's scheduling, state merging and
checkpointing. Reports p50/p95 for: the direct call; the graph without memory; the graph with the
SQLite checkpointer (the product's default) — on a new thread per request and in 10-turn conversations.
Writes bench/results/graph.json.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import json
import sqlite3
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from langchain_core.messages import HumanMessage
from langgraph.checkpoint.sqlite import SqliteSaver

from agents.graph import Services, build_graph
from agents.tools import builtin_tools
from eval.metrics import percentile

QUESTION = "what is 17 * 23?"


@dataclass
class Decision:
    route: str = "tool:calculator"
    confidence: float = 0.95
    confident: bool = True


class FixedRouter:
    def route(self, text: str) -> Decision:
        return Decision()


def timed(fn, n: int) -> list[float]:
    out = []
    for i in range(n):
        started = time.perf_counter()
        fn(i)
        out.append((time.perf_counter() - started) * 1000)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    tools = {t.name: t for t in builtin_tools()}
    calculator = tools["calculator"]
    services = Services(router=FixedRouter(), tools=tools)
    plain = build_graph(services)
    with tempfile.TemporaryDirectory() as tmp:
        db = sqlite3.connect(Path(tmp) / "memory.sqlite", check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        saver = SqliteSaver(db)
        saver.setup()
        remembered = build_graph(services, checkpointer=saver)

        def direct(i):
            return calculator.invoke(calculator.from_text(QUESTION))

        def graph_plain(i):
            return plain.invoke({"messages": [HumanMessage(QUESTION)]})

        def graph_new_thread(i):
            return remembered.invoke({"messages": [HumanMessage(QUESTION)]}, {"configurable": {"thread_id": f"t{i}"}},
                                     durability="exit")

        def graph_conversation(i):  # 10-turn conversations: the checkpoint grows with the thread
            return remembered.invoke({"messages": [HumanMessage(QUESTION)]}, {"configurable": {"thread_id": f"c{i // 10}"}},
                                     durability="exit")

        cases = {"direct call": direct, "graph, no memory": graph_plain,
                 "graph + SQLite memory, new thread": graph_new_thread,
                 "graph + SQLite memory, 10-turn threads": graph_conversation}
        for fn in cases.values():  # warm up
            fn(-1)
        times = {name: [] for name in cases}
        for _ in range(3):  # interleave rounds so machine noise hits every case alike
            for name, fn in cases.items():
                times[name] += timed(fn, args.requests // 3)
        db.close()
    base = percentile(times["direct call"], 50)
    results = {name: {"p50_ms": percentile(v, 50), "p95_ms": percentile(v, 95),
                      "overhead_p50_ms": percentile(v, 50) - base} for name, v in times.items()}
    print(f"{'case':38} {'p50 ms':>8} {'p95 ms':>8} {'overhead':>9}")
    for name, r in results.items():
        print(f"{name:38} {r['p50_ms']:8.2f} {r['p95_ms']:8.2f} {r['overhead_p50_ms']:9.2f}")
    out = ROOT / "bench" / "results" / "graph.json"
    out.write_text(json.dumps({"requests": args.requests, "results": results}, indent=2) + "\n")
    print(f"written to {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
