"""What the HTTP API costs, and whether it holds under concurrent streams (router-only orchestrator).

    OMP_NUM_THREADS=1 .venv/bin/python bench/api_bench.py [--requests 300] [--streams 50]

(a) Added latency: p50 of a non-stream tool-route request (the calculator) through HTTP
    (httpx -> uvicorn -> worker thread -> orchestrator, exchange recorded for feedback) against
    `orchestrator.ask` called directly, side by side in interleaved rounds, in one process.
    Target: the API adds <= 5 ms at p50.
(b) Load: `--streams` concurrent streaming chats (httpx async) against one server whose
    max_concurrency admits them all; each asks a distinct multiplication, reassembles its own
    tokens and checks them against its own answer (lost or interleaved tokens would show).
    Reports errors, p50/p95 time to first token and total time.
Writes bench/results/api.json.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import asyncio
import json
import logging
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx
import uvicorn

from eval.metrics import percentile


def start(app, lifespan: str = "off") -> tuple[uvicorn.Server, str]:
    """uvicorn serving `app` in a background thread on a free loopback port."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan=lifespan))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.01)
    return server, f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"


def added_latency(orchestrator, url: str, requests: int) -> dict:
    question = "what is 17 * 23?"
    http = httpx.Client(base_url=url, timeout=30)
    health = httpx.Client(base_url=url, timeout=30)

    def direct(i: int) -> None:
        assert orchestrator.ask(question, thread_id=f"direct-{i}").text == "391"

    def through_http(i: int) -> None:
        response = http.post("/v1/chat/completions", headers={"X-Atelier-Thread": f"http-{i}"},
                             json={"model": "atelier", "messages": [{"role": "user", "content": question}]})
        assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"] == "391"

    cases = {"direct orchestrator.ask": direct, "HTTP /v1/chat/completions": through_http}
    for fn in cases.values():
        fn(-1)  # warm up
    times: dict[str, list[float]] = {name: [] for name in cases}
    for i in range(requests):  # alternate request by request: machine noise (2 shared cores) hits both alike
        for name, fn in cases.items():
            started = time.perf_counter()
            fn(i)
            times[name].append((time.perf_counter() - started) * 1000)
    http.close()
    floor = []
    for _ in range(requests):  # the HTTP round trip alone, no orchestrator: GET /health
        started = time.perf_counter()
        health.get("/health")
        floor.append((time.perf_counter() - started) * 1000)
    result = {name: {"p10_ms": percentile(v, 10), "p50_ms": percentile(v, 50), "p95_ms": percentile(v, 95)}
              for name, v in times.items()}
    result["http_round_trip_p50_ms"] = percentile(floor, 50)
    result["added_p50_ms"] = result["HTTP /v1/chat/completions"]["p50_ms"] - result["direct orchestrator.ask"]["p50_ms"]
    # the median of paired differences (each HTTP request against the direct call just before it) is
    # steadier than a difference of medians on a noisy shared machine
    result["added_paired_p50_ms"] = percentile([h - d for h, d in zip(times["HTTP /v1/chat/completions"],
                                                                        times["direct orchestrator.ask"])], 50)
    return result


async def one_stream(client: httpx.AsyncClient, i: int) -> dict:
    a, b = 100 + i, 7 + 3 * i
    started, first, parts, error = time.perf_counter(), None, [], None
    body = {"model": "atelier", "stream": True, "messages": [{"role": "user", "content": f"what is {a} * {b}?"}]}
    async with client.stream("POST", "/v1/chat/completions", json=body,
                             headers={"X-Atelier-Thread": f"load-{i}"}) as response:
        if response.status_code != 200:
            return {"error": f"HTTP {response.status_code}"}
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                error = chunk["error"]["message"]
                continue
            delta = chunk["choices"][0]["delta"].get("content") if chunk["choices"] else None
            if delta:
                first = first or time.perf_counter()
                parts.append(delta)
    text = "".join(parts)
    if error or text != str(a * b):
        return {"error": error or f"answer {text!r}, expected {a * b}"}
    return {"ttft_ms": ((first or time.perf_counter()) - started) * 1000,
            "total_ms": (time.perf_counter() - started) * 1000}


async def load(url: str, streams: int) -> dict:
    limits = httpx.Limits(max_connections=streams, max_keepalive_connections=streams)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        started = time.perf_counter()
        results = await asyncio.gather(*(one_stream(client, i) for i in range(streams)))
        wall = time.perf_counter() - started
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    return {"streams": streams, "errors": len(errors), "error_samples": errors[:3], "wall_s": wall,
            "ttft_p50_ms": percentile([r["ttft_ms"] for r in ok], 50),
            "ttft_p95_ms": percentile([r["ttft_ms"] for r in ok], 95),
            "total_p50_ms": percentile([r["total_ms"] for r in ok], 50),
            "total_p95_ms": percentile([r["total_ms"] for r in ok], 95)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300, help="Requests per case for the added latency.")
    parser.add_argument("--streams", type=int, default=50, help="Concurrent streaming chats in the load run.")
    args = parser.parse_args()
    logging.getLogger("agents.llm").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as home:
        os.environ["ATELIER_HOME"] = home
        from agents.api import create_app
        from agents.config import ServeConfig
        from agents.orchestrator import Orchestrator

        orchestrator = Orchestrator()
        app = create_app(ServeConfig(max_concurrency=args.streams), orchestrator=orchestrator)
        server, url = start(app)
        latency = added_latency(orchestrator, url, args.requests)
        loaded = asyncio.run(load(url, args.streams))
        server.should_exit = True
        orchestrator.close()
    for name in ("direct orchestrator.ask", "HTTP /v1/chat/completions"):
        r = latency[name]
        print(f"{name:28} p10 {r['p10_ms']:7.2f}   p50 {r['p50_ms']:7.2f}   p95 {r['p95_ms']:7.2f} ms")
    print(f"HTTP round trip alone (GET /health) p50: {latency['http_round_trip_p50_ms']:.2f} ms")
    print(f"API added latency p50: {latency['added_p50_ms']:.2f} ms (difference of p50s), "
          f"{latency['added_paired_p50_ms']:.2f} ms (p50 of paired differences); target <= 5 ms")
    print(f"load: {loaded['streams']} concurrent streams, {loaded['errors']} errors, wall {loaded['wall_s']:.2f} s; "
          f"TTFT p50 {loaded['ttft_p50_ms']:.1f} / p95 {loaded['ttft_p95_ms']:.1f} ms; "
          f"total p50 {loaded['total_p50_ms']:.1f} / p95 {loaded['total_p95_ms']:.1f} ms")
    out = ROOT / "bench" / "results" / "api.json"
    out.write_text(json.dumps({"requests": args.requests, "added_latency": latency, "load": loaded,
                               "cpu_count": os.cpu_count()}, indent=2) + "\n")
    print(f"written to {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
