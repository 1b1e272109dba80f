"""The chat page (agents/web) in headless Chromium, driven by playwright-core (tests/web/drive.mjs).

Twice: against a stand-in FastAPI app below that implements the API contract of agents/api.py
with canned data, streaming tokens with small delays so the test can see the answer grow chunk
by chunk; and against the real `agents.api.create_app` (router-only, a one-document index).
Both serve agents/web the same way: `/` and `/static/*`. See tests/web/README.md.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="fastapi is in the [agents] extra")
uvicorn = pytest.importorskip("uvicorn", reason="uvicorn is in the [agents] extra")

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles

HERE = Path(__file__).parent
WEB_DIR = HERE.parent.parent / "agents" / "web"
CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))  # drive.mjs reads the same variable
NODE = shutil.which("node")
NPM = shutil.which("npm")

pytestmark = [
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium: apt-get install -y chromium"),
    pytest.mark.skipif(NODE is None or NPM is None, reason="needs node and npm on PATH (Debian: nodejs npm)"),
]

KEY = "test-key-0123456789"
CORRECTION = "The HX-65 impeller nut takes 80 N·m."  # typed into the thumbs-down box
TOKENS = ["DAPT ", "is ", "domain-", "adaptive ", "pre", "training ", "<b>[1]</b>", "."]
ROUTE = "specialist:legal"
TIMINGS = {"route": 11.6, "search": 0.0, "model": 0.4, "tool": 3.2}
# A source whose text would run script if the page ever parsed it as HTML.
SOURCES = [
    {"n": 1, "title": "Don't Stop Pretraining", "source": "docs/dapt.pdf", "doc_id": "d1", "start": 0, "end": 120,
     "text": "Continued pretraining on in-domain text <img src=x onerror=\"window.__xss=1\">helps."},
    {"n": 2, "title": "Notes", "source": "notes/adaptation.md", "doc_id": "d2", "start": 10, "end": 80,
     "text": "DAPT then TAPT."},
]


def _chunk(completion_id: str, delta: dict, finish_reason: str | None = None, **extra) -> str:
    body = {"id": completion_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": "atelier",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}], **extra}
    return f"data: {json.dumps(body)}\n\n"


def stand_in_app(seen: dict) -> FastAPI:
    """Just the endpoints the page uses, per the agents/api.py contract; `seen` records the requests."""
    app = FastAPI()

    @app.get("/health")
    def health():
        return {"status": "ok", "router_only": True}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": "atelier", "object": "model", "owned_by": "atelier"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        thread = request.headers.get("x-atelier-thread", "")
        seen["chat"].append({"body": body, "thread": thread, "auth": request.headers.get("authorization")})
        if "fail" in body["messages"][-1]["content"]:
            error = {"message": "no orchestrator model reachable; start one with `atelier serve`",
                     "type": "server_error", "code": "backend_unavailable"}
            return JSONResponse({"error": error}, status_code=503)
        completion_id = f"chatcmpl-{len(seen['chat'])}"

        async def events():
            yield _chunk(completion_id, {"role": "assistant"},
                         atelier={"route": ROUTE, "confidence": 0.93, "thread_id": thread})
            for token in TOKENS:
                await asyncio.sleep(0.06)
                yield _chunk(completion_id, {"content": token})
            yield _chunk(completion_id, {}, "stop",
                         atelier={"route": ROUTE, "confidence": 0.93, "sources": SOURCES, "thread_id": thread,
                                  "timings": TIMINGS})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/feedback")
    async def feedback(request: Request):
        seen["feedback"].append(await request.json())
        return {"status": "recorded"}

    @app.get("/")
    def index():
        return FileResponse(WEB_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")
    return app


@contextmanager
def serving(app) -> Iterator[str]:
    """uvicorn serving `app` on a free 127.0.0.1 port in a thread; yields the page's URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start within 10 s"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/"
    finally:
        srv.should_exit = True
        thread.join(timeout=5)
        sock.close()


def _ensure_playwright_core() -> None:
    """`npm ci` into tests/web/node_modules once (playwright-core only; it never fetches a browser)."""
    if (HERE / "node_modules" / "playwright-core").is_dir():
        return
    env = {**os.environ, "PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD": "1"}  # keep the machine's proxy/CA settings
    try:
        done = subprocess.run([NPM, "ci", "--prefix", str(HERE), "--no-audit", "--no-fund"],
                              check=False, capture_output=True, text=True, timeout=180, env=env)
    except subprocess.TimeoutExpired:
        pytest.skip("`npm ci --prefix tests/web` timed out (no npm registry?)")
    if done.returncode != 0:
        pytest.skip(f"`npm ci --prefix tests/web` failed (no npm registry?): {done.stderr[-500:]}")


def drive(url: str, tmp_path: Path, *, question: str, fail_prompt: str, api_key: str = KEY) -> dict:
    """Runs drive.mjs against the page at `url`; returns what it observed (the screenshot lands in tmp_path)."""
    _ensure_playwright_core()
    scenario = {"url": url, "screenshot": str(tmp_path / "chat.png"), "apiKey": api_key, "question": question,
                "failPrompt": fail_prompt, "correction": CORRECTION}
    started = time.monotonic()
    run = subprocess.run([NODE, str(HERE / "drive.mjs"), json.dumps(scenario)],
                         check=False, capture_output=True, text=True, timeout=50, cwd=HERE)
    elapsed = time.monotonic() - started
    assert run.returncode == 0 and run.stdout.strip(), f"drive.mjs crashed:\n{run.stderr[-2000:]}"
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert "failure" not in out, f"browser step after {out['steps']} failed:\n{out['failure']}"
    assert elapsed < 40, f"browser run took {elapsed:.1f} s"
    assert (tmp_path / "chat.png").stat().st_size > 1000
    return out


def test_chat_page_against_the_contract(tmp_path):
    """The stand-in streams token by token, so this one also proves the page renders the stream as it arrives."""
    seen: dict = {"chat": [], "feedback": []}
    with serving(stand_in_app(seen)) as url:
        out = drive(url, tmp_path, question="What is <b>DAPT</b>?", fail_prompt="please fail")

    # Enter sends, Shift+Enter is a newline.
    assert out["shiftEnterValue"] == "line one\nline two"
    assert out["messagesAfterShiftEnter"] == 0

    # The request followed the contract: one streamed user turn, the thread header, the saved key.
    (chat, failing) = seen["chat"]
    assert chat["body"] == {"model": "atelier", "stream": True,
                            "messages": [{"role": "user", "content": "What is <b>DAPT</b>?"}]}
    assert chat["thread"] and chat["thread"] == out["threadBefore"]
    assert chat["auth"] == f"Bearer {KEY}"
    assert failing["thread"] == chat["thread"]

    # The answer streamed: the page showed it growing through several partial texts.
    full = "".join(TOKENS)
    assert out["answerText"] == full
    assert len(out["snapshots"]) >= 3 and out["snapshots"][-1] == full, out["snapshots"]
    assert all(full.startswith(s) for s in out["snapshots"])
    assert out["userText"] == "What is <b>DAPT</b>?"
    assert out["routeBadge"] == ROUTE and out["confidence"] == "93%"
    assert out["timings"] == "route 12 ms · model <1 ms · tool 3 ms"  # steps that took no time are left out
    assert out["ariaLive"] == "polite"

    # Sources are collapsed, open on click, and model/source text is never parsed as HTML.
    assert (out["sourcesOpenBefore"], out["sourcesOpenAfter"]) == (False, True)
    assert [(s["n"], s["title"], s["source"], s["text"]) for s in out["sources"]] == [
        (f"[{s['n']}]", s["title"], s["source"], s["text"]) for s in SOURCES]
    assert out["injectedElements"] == 0 and out["xssFired"] is False

    # Thumbs up reached the server with the completion id and showed it was recorded; thumbs down (after the
    # reload) asked what it should have said and sent that as the correction.
    assert seen["feedback"] == [{"thread_id": chat["thread"], "completion_id": "chatcmpl-1", "rating": "up"},
                                {"thread_id": chat["thread"], "completion_id": "chatcmpl-1", "rating": "down",
                                 "correction": CORRECTION}]
    assert "Recorded" in out["thumbUpText"] and "Recorded" in out["thumbDownText"]
    assert out["correctionFocused"] and out["correctionFormsLeft"] == 0

    # After a reload the conversation, route, sources and feedback are still shown.
    assert out["afterReload"] == {"messages": ["What is <b>DAPT</b>?", full], "routeBadge": ROUTE,
                                  "sourcesOpen": False, "sourceCount": len(SOURCES),
                                  "thumbUpPressed": "true"}

    # A server error shows inline with the server's message.
    assert "no orchestrator model reachable" in out["errorText"]

    assert out["messagesAfterNew"] == 0 and out["newThreadDiffers"]
    # The only console error is Chromium logging the deliberate 503.
    assert [e for e in out["consoleErrors"] if "503" not in e] == [], out["consoleErrors"]


PUMP_NOTES = """# HX-65 pump service notes

## Impeller nut

The tightening torque of the HX-65 impeller nut is 80 N·m. Always fit a new tab washer.
Service staff must not paste <img src=x onerror="window.__xss=1"> into the manual.
"""


def test_chat_page_against_the_real_api(tmp_path):
    """agents.api.create_app, router-only, over a one-document index: the search route, its sources, the
    feedback store and the API's own error messages, through the page. (The search route sends its answer
    as one chunk, so token-by-token rendering is proven by the stand-in test above.)"""
    import httpx

    from agents.api import create_app
    from agents.config import ServeConfig
    from retrieval.cli import index

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "pumps.md").write_text(PUMP_NOTES, encoding="utf-8")
    index(docs, backend=None, index_name=None, embedding_model=None, model=None, config_file=None, prune=True, delete=[],
          follow_symlinks=None, max_file_mb=None, quiet=True)
    question = "what is the tightening torque of the HX-65 impeller nut?"
    with serving(create_app(ServeConfig(api_keys=[KEY], max_message_chars=200))) as url:
        out = drive(url, tmp_path, question=question, fail_prompt="x" * 300)
        stored = httpx.get(f"{url}v1/feedback", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).json()["data"]

    assert out["routeBadge"] == "search" and out["confidence"].endswith("%")
    assert out["timings"].startswith("route ") and " · search " in out["timings"]
    assert "80 N·m" in out["answerText"] and "[1]" in out["answerText"]
    [source] = out["sources"]
    assert (source["n"], source["title"], source["source"]) == ("[1]", "HX-65 pump service notes", "pumps.md")  # no server path
    assert '<img src=x onerror="window.__xss=1">' in source["text"]  # the probe reached the page, as text
    assert out["injectedElements"] == 0 and out["xssFired"] is False

    corrected, feedback = stored  # newest first
    assert (feedback["rating"], feedback["route"], feedback["question"]) == ("up", "search", question)
    assert feedback["thread_id"] == out["threadBefore"] and "Recorded" in out["thumbUpText"]
    assert (corrected["rating"], corrected["correction"], corrected["completion_id"]) == (
        "down", CORRECTION, feedback["completion_id"])

    assert out["afterReload"] == {"messages": [question, out["answerText"]], "routeBadge": "search",
                                  "sourcesOpen": False, "sourceCount": 1, "thumbUpPressed": "true"}
    assert "at most 200" in out["errorText"]  # the API's 400 for an over-long message, shown inline
    assert [e for e in out["consoleErrors"] if "400" not in e] == [], out["consoleErrors"]
