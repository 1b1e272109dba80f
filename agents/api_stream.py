"""Running one API request: its events in a worker thread, handed to the event loop, sent as SSE.

The orchestrator is blocking code, so each request runs in a worker thread that hands its
events to the event loop through an asyncio queue; the loop never blocks, and awaits each event
with the request's deadline (504 past it; a stream gets an error event, then [DONE]). The routes
and the limits are in agents/api.py and agents/limits.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any

from fastapi.responses import JSONResponse, StreamingResponse

from agents.api_redact import header_value, public_answer, redact_paths
from atelier import tracing
from atelier.errors import AtelierError

if TYPE_CHECKING:
    from agents.api_schemas import ChatCompletionRequest
    from agents.orchestrator import Orchestrator

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An HTTP error in OpenAI's shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}
        self.counted = False  # True: the request's worker counted it in the metrics already

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


_END = object()


def internal_error(request_id: str) -> ApiError:
    """What a client hears of an unexpected exception: nothing but the id to find it in the server log."""
    return ApiError(500, f"internal error; the server log has the details under request id {request_id}",
                    type="server_error", code="internal_error")


class Worker:
    """Runs a blocking event iterator in a thread; the event loop awaits its events with a deadline.

    The caller has taken a slot (`Admission.enter`); the worker calls `leave` to give it back when its
    thread ends (even past the deadline, so abandoned work still holds its slot)."""

    def __init__(self, produce: Callable[[], Iterator[dict]], leave: Callable[[], None], deadline: float,
                 request_id: str = ""):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.deadline, self.request_id = deadline, request_id
        try:
            threading.Thread(target=self._work, args=(produce, leave), name="atelier-api-request",
                             daemon=True).start()
        except BaseException:
            leave()
            raise

    def _put(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the server stopped
            self.cancelled.set()

    def _work(self, produce: Callable[[], Iterator[dict]], leave: Callable[[], None]) -> None:
        events: Iterator[dict] | None = None
        try:
            events = produce()
            for event in events:
                if self.cancelled.is_set():
                    break
                self._put(event)
        except AtelierError as exc:
            self._put(_counted(ApiError(400, redact_paths(str(exc)), code="atelier_error")))
        except Exception:  # logged with the request id; the client gets only the id
            log.exception("request %s failed", self.request_id)
            self._put(_counted(internal_error(self.request_id)))
        finally:
            try:
                if events is not None and hasattr(events, "close"):
                    events.close()
            finally:
                leave()
                self._put(_END)

    async def next(self) -> dict | None:
        """The next event; None at the end. ApiError 504 past the deadline."""
        remaining = self.deadline - self.loop.time()
        try:
            item = await asyncio.wait_for(self.queue.get(), max(remaining, 0.001))
        except TimeoutError:
            self.cancelled.set()
            raise _counted(ApiError(504, "the answer took longer than the server's request_timeout_s; ask something "
                           "simpler or raise the limit", type="timeout", code="timeout")) from None
        if isinstance(item, ApiError):
            raise item
        return None if item is _END else item


def _counted(error: ApiError) -> ApiError:
    error.counted = True
    return error


def words(text: str) -> int:
    """The API's rough token count for the orchestrator: whitespace-separated words."""
    return len(text.split())


def orchestrator_events(orchestrator: Orchestrator, question: str, thread_id: str) -> Iterator[dict]:
    """The orchestrator's route, token and done events; the answer as a client may see it (agents/api_redact.py)."""
    for event in orchestrator.stream(question, thread_id=thread_id):
        if event["type"] == "done":
            answer = public_answer(event["answer"])
            yield {**event, "answer": answer, "finish_reason": "stop", "usage": (words(question), words(answer.text))}
        elif event["type"] in ("route", "token"):
            yield event


def specialist_events(orchestrator: Orchestrator, name: str, messages: list[dict], params, thread_id: str
                      ) -> Iterator[dict]:
    from agents.orchestrator import Answer

    route = f"specialist:{name}"
    with tracing.model_call(route, provider="atelier", attributes={tracing.AGENT: name}) as call:
        call.content(tracing.INPUT_MESSAGES, messages)
        stream = orchestrator.services.runtime.stream(name, messages, params)
        try:
            yield {"type": "route", "route": route, "confidence": 1.0}
            for delta in stream:
                yield {"type": "token", "text": delta}
        finally:
            stream.close()
        generation = stream.generation
        call.usage(generation.usage.prompt_tokens, generation.usage.completion_tokens)
        call.set(tracing.FINISH_REASONS, [generation.finish_reason])
    record = tracing.current_record()
    answer = Answer(generation.text, route, 1.0, [], thread_id, timings=record.rounded() if record else {})
    yield {"type": "done", "answer": answer,
           "finish_reason": generation.finish_reason,
           "usage": (generation.usage.prompt_tokens, generation.usage.completion_tokens)}


# ----------------------------------------------------------------------------- SSE


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, default=str)}\n\n"


async def drain(worker: Worker) -> AsyncIterator[dict]:
    while (event := await worker.next()) is not None:
        yield event


def atelier_info(answer_or_route: Any, thread_id: str, confidence: float = 0.0) -> dict:
    if isinstance(answer_or_route, str):
        return {"route": answer_or_route, "confidence": confidence, "sources": [], "thread_id": thread_id}
    answer = answer_or_route
    return {"route": answer.route, "confidence": answer.confidence, "sources": answer.sources, "thread_id": thread_id,
            "model": getattr(answer, "model", None), "route_output": getattr(answer, "route_output", ""),
            "timings": getattr(answer, "timings", None) or {}}


def usage_of(counts: tuple[int, int]) -> dict:
    return {"prompt_tokens": counts[0], "completion_tokens": counts[1], "total_tokens": counts[0] + counts[1]}


async def stream_response(worker: Worker, body: ChatCompletionRequest, completion_id: str, created: int,
                          thread_id: str) -> StreamingResponse:
    """SSE chunks. The route is awaited before answering so that it can travel as a header too."""
    early: list[dict] = []
    route = None
    while route is None:
        event = await worker.next()
        if event is None:
            raise ApiError(500, "the answer ended before it began", type="server_error")
        early.append(event)
        route = event["route"] if event["type"] == "route" else event["answer"].route if event["type"] == "done" \
            else None
    confidence = next((e.get("confidence", 0.0) for e in early if e["type"] == "route"), 0.0)
    base = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": body.model}
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(delta: dict, finish: str | None = None, **extra: Any) -> str:
        return sse({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra})

    async def events() -> AsyncIterator[str]:
        sent: list[str] = []
        try:
            yield chunk({"role": "assistant", "content": ""}, atelier=atelier_info(route, thread_id, confidence))
            for event in early:
                out = _sse_event(event, sent, chunk, base, thread_id, include_usage)
                if out:
                    yield out
            async for event in drain(worker):
                out = _sse_event(event, sent, chunk, base, thread_id, include_usage)
                if out:
                    yield out
        except ApiError as exc:
            yield sse(exc.body())
        finally:
            worker.cancelled.set()
        yield sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"X-Atelier-Route": header_value(route), "X-Atelier-Thread": header_value(thread_id),
                                      "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _sse_event(event: dict, sent: list[str], chunk, base: dict, thread_id: str, include_usage: bool) -> str:
    if event["type"] == "token" and event["text"]:
        sent.append(event["text"])
        return chunk({"content": event["text"]})
    if event["type"] != "done":
        return ""
    answer, streamed = event["answer"], "".join(sent)
    out = ""
    if answer.text != streamed and answer.text.startswith(streamed):  # a route that did not stream its tokens
        out += chunk({"content": answer.text[len(streamed):]})
    out += chunk({}, event["finish_reason"], atelier=atelier_info(answer, thread_id))
    if include_usage:
        out += sse({**base, "choices": [], "usage": usage_of(event["usage"])})
    return out
