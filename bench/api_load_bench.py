"""The API under a burst: 200 concurrent clients, 3 API keys, a real uvicorn on 127.0.0.1.

    nice -n 19 env OMP_NUM_THREADS=1 .venv/bin/python bench/api_load_bench.py [--clients 200] [--keys 3]

Behind the server: the real router-only orchestrator (tool routes, SQLite memory), whose stream is
scripted to send each answer word by word with a short pause per word, like a model would, so
that concurrent streams really interleave on the server. Default ServeConfig limits
(max_concurrency 4, max_queue 128, per-key requests and tokens per minute).

Each client, on its own key and thread: (1) a streamed question, (2) a follow-up in the same
thread, (3) once the neighbouring key's client has its thread, an attempt to continue that
thread with its own key (must be 404). Every 429 is retried after its Retry-After.
Checks: every request eventually answered; each stream reassembles exactly its own text (no
interleaving); no client sees another key's thread (404, and the memory of each thread holds
only its own turns); each key lists only its own feedback. Reports p50/p95 of request time
(first attempt to answer, retries included) and of time to first token, the 429s retried, wall.
Writes bench/results/api_load.json.
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
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx
from api_bench import start  # bench/ is the script's folder, first on sys.path

from eval.metrics import percentile

WORD_PAUSE_S = 0.004


def script_words(orchestrator) -> None:
    """The orchestrator's stream, its answer re-sent word by word ("thread T: QUESTION -> ANSWER")."""
    import dataclasses

    real = orchestrator.stream

    def stream(question, thread_id="default"):
        for event in real(question, thread_id):
            if event["type"] == "done":
                text = f"thread {thread_id}: {question} -> {event['answer'].text}"
                for i, word in enumerate(text.split(" ")):
                    time.sleep(WORD_PAUSE_S)
                    yield {"type": "token", "text": word if i == 0 else f" {word}"}
                yield {**event, "answer": dataclasses.replace(event["answer"], text=text)}
            elif event["type"] == "route":
                yield event

    orchestrator.stream = stream


class Client:
    """One simulated user: its key, its thread, its tallies."""

    def __init__(self, http: httpx.AsyncClient, key: str, i: int):
        self.http, self.key, self.i = http, key, i
        self.thread = f"load-{i}"
        self.retried: Counter = Counter()
        self.times: list[float] = []
        self.ttft: list[float] = []
        self.errors: list[str] = []
        self.completions: list[str] = []
        self.completion, self.stolen = "", False

    def headers(self, thread: str) -> dict:
        return {"Authorization": f"Bearer {self.key}", "X-Atelier-Thread": thread}

    async def post(self, body: dict, thread: str, stream: bool):
        """(status, text or parsed body, seconds to first token); 429s retried after their Retry-After."""
        while True:
            started = time.perf_counter()
            if stream:
                async with self.http.stream("POST", "/v1/chat/completions", json=body,
                                            headers=self.headers(thread)) as response:
                    if response.status_code == 429:
                        await self.wait(response)
                        continue
                    parts, first, finish = [], None, None
                    async for line in response.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            return 500, chunk["error"]["message"], None
                        for choice in chunk["choices"]:
                            if choice["delta"].get("content"):
                                first = first or time.perf_counter()
                                parts.append(choice["delta"]["content"])
                            finish = choice["finish_reason"] or finish
                        if "atelier" in chunk and chunk["atelier"]["thread_id"] != thread:
                            return 500, f"saw thread {chunk['atelier']['thread_id']}", None
                        self.completion = chunk["id"]
                    return response.status_code, "".join(parts), (first or time.perf_counter()) - started
            response = await self.http.post("/v1/chat/completions", json=body, headers=self.headers(thread))
            if response.status_code == 429:
                await self.wait(response)
                continue
            return response.status_code, response, None

    async def wait(self, response: httpx.Response) -> None:
        """Count a 429 by its error code, then sleep for its Retry-After."""
        await response.aread()
        self.retried[response.json()["error"]["code"]] += 1
        await asyncio.sleep(float(response.headers["retry-after"]))

    async def run(self, started: dict[str, asyncio.Event], neighbour: str) -> None:
        a, b = 100 + self.i, 7 + self.i % 13
        t0 = time.perf_counter()
        question = f"what is {a} * {b}?"
        status, text, ttft = await self.post({"model": "atelier", "stream": True, "messages": [
            {"role": "user", "content": question}]}, self.thread, stream=True)
        expected = f"thread {self.thread}: {question} -> {a * b}"
        if status != 200 or text != expected:
            self.errors.append(f"stream {status}: {text!r} (expected {expected!r})")
        else:
            self.times.append(time.perf_counter() - t0)
            self.ttft.append(ttft)
            self.completions.append(self.completion)
        started[self.thread].set()

        t0 = time.perf_counter()
        follow = f"what is {a} + {b}?"
        status, response, _ = await self.post({"model": "atelier", "messages": [
            {"role": "user", "content": follow}]}, self.thread, stream=False)
        if status != 200 or response.json()["choices"][0]["message"]["content"] != \
                f"thread {self.thread}: {follow} -> {a + b}":
            self.errors.append(f"follow-up {status}: {response.text[:200]}")
        else:
            self.times.append(time.perf_counter() - t0)
            self.completions.append(response.json()["id"])

        await started[neighbour].wait()
        t0 = time.perf_counter()
        status, response, _ = await self.post({"model": "atelier", "messages": [
            {"role": "user", "content": "what did they ask?"}]}, neighbour, stream=False)
        self.times.append(time.perf_counter() - t0)
        self.stolen = status != 404
        if self.stolen:
            self.errors.append(f"another key's thread {neighbour}: {status}")
        rated = await self.http.post("/v1/feedback", headers=self.headers(self.thread),
                                     json={"completion_id": self.completions[-1], "rating": "up"}) \
            if self.completions else None
        if rated is not None and rated.status_code == 429:  # feedback is not rate limited; just in case
            self.errors.append("feedback 429")


async def load(url: str, keys: list[str], clients: int) -> tuple[list[Client], float, dict]:
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        users = [Client(http, keys[i % len(keys)], i) for i in range(clients)]
        started = {u.thread: asyncio.Event() for u in users}
        t0 = time.perf_counter()
        # the neighbour is the next client, which is on the next key
        await asyncio.gather(*(u.run(started, users[(i + 1) % clients].thread) for i, u in enumerate(users)))
        wall = time.perf_counter() - t0
        listed = {}
        for key in keys:
            data = (await http.get("/v1/feedback?limit=1000", headers={"Authorization": f"Bearer {key}"})).json()
            listed[key] = {row["completion_id"] for row in data["data"]}
    return users, wall, listed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=200, help="Concurrent clients.")
    parser.add_argument("--keys", type=int, default=3, help="API keys the clients are spread over.")
    args = parser.parse_args()
    logging.getLogger("agents.llm").setLevel(logging.ERROR)
    keys = [f"load-bench-key-{k}-0123456789" for k in range(args.keys)]
    with tempfile.TemporaryDirectory() as home:
        os.environ["ATELIER_HOME"] = home
        from agents.api import create_app
        from agents.config import ServeConfig
        from agents.orchestrator import Orchestrator

        orchestrator = Orchestrator()
        orchestrator.ask("what is 1 + 1?", thread_id="warm-up")  # the router's encoder loads once, not per client
        script_words(orchestrator)
        config = ServeConfig(api_keys=keys)
        app = create_app(config, orchestrator=orchestrator)
        server, url = start(app, lifespan="on")
        users, wall, listed = asyncio.run(load(url, keys, args.clients))
        foreign_turns = 0
        for u in users:  # each thread's memory holds its own two turns only
            state = orchestrator.graph.get_state({"configurable": {"thread_id": u.thread}}).values
            texts = [m.text for m in state.get("messages", [])]
            foreign_turns += sum(1 for t in texts[::2] if "what did they ask" in t)
        server.should_exit = True
        time.sleep(0.5)
        orchestrator.close()
    by_key = {k: {c for u in users if u.key == k for c in u.completions} for k in keys}
    feedback_leaks = sum(len(listed[k] - by_key[k]) for k in keys)
    errors = [e for u in users for e in u.errors]
    retried = sum((u.retried for u in users), Counter())
    times = [t * 1000 for u in users for t in u.times]
    ttft = [t * 1000 for u in users for t in u.ttft]
    result = {
        "clients": args.clients, "keys": args.keys, "requests_per_client": 3,
        "config": {k: getattr(config, k) for k in ("max_concurrency", "max_queue", "retry_after_s",
                                                     "key_requests_per_minute", "key_tokens_per_minute")},
        "answered": len(times), "expected": 3 * args.clients, "errors": len(errors), "error_samples": errors[:5],
        "retried_429": dict(retried), "retried_429_total": sum(retried.values()),
        "cross_key_threads_readable": sum(u.stolen for u in users), "foreign_turns_in_memory": foreign_turns,
        "feedback_rows_of_other_keys": feedback_leaks,
        "request_p50_ms": percentile(times, 50), "request_p95_ms": percentile(times, 95),
        "ttft_p50_ms": percentile(ttft, 50), "ttft_p95_ms": percentile(ttft, 95),
        "wall_s": round(wall, 2), "cpu_count": os.cpu_count(), "word_pause_s": WORD_PAUSE_S,
    }
    print(f"{args.clients} clients on {args.keys} keys: {result['answered']}/{result['expected']} answered, "
          f"{len(errors)} errors, {result['retried_429_total']} 429s retried {dict(retried)}, wall {wall:.1f} s")
    print(f"request p50 {result['request_p50_ms']:.0f} / p95 {result['request_p95_ms']:.0f} ms; "
          f"time to first token p50 {result['ttft_p50_ms']:.0f} / p95 {result['ttft_p95_ms']:.0f} ms")
    print(f"isolation: {result['cross_key_threads_readable']} threads of another key readable, "
          f"{foreign_turns} foreign turns in memory, {feedback_leaks} feedback rows of another key")
    out = ROOT / "bench" / "results" / "api_load.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {out.relative_to(ROOT)}")
    if errors or result["cross_key_threads_readable"] or foreign_turns or feedback_leaks:
        sys.exit(1)


if __name__ == "__main__":
    main()
