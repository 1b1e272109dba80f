"""The limits every API request obeys before it gets a worker (OWASP LLM10, unbounded consumption).

    BodyGuard   ASGI middleware: 413 past max_body_bytes, 408 when the body takes longer than
                body_timeout_s to arrive (uvicorn's timeout_keep_alive only covers idle connections
                between requests, so a client trickling its body would hold a connection forever)
    RateLimits  per key: requests and tokens per minute, token buckets; 429 with Retry-After
    Admission   at most `slots` requests at work and `max_queue` waiting their turn in order
                (like Ollama's OLLAMA_MAX_QUEUE); a full queue answers 429 with Retry-After

A burst is served in turn instead of mostly refused; only what overflows the queue is told to
retry. Slots are handed back from the worker threads, so Admission is thread-safe, and it keeps
each waiter's own event loop (a test client may run every request on a fresh one).
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque

from agents.api_stream import ApiError


class BodyGuard:
    """Reads a request body in full before the app sees it: 413 when too big, 408 when too slow."""

    def __init__(self, app, limit: int, timeout_s: float):
        self.app, self.limit, self.timeout_s = app, limit, timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = ApiError(413, f"request body larger than {self.limit} bytes; send less (max_body_bytes)",
                           code="request_too_large", headers={"Connection": "close"})
        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            return await too_big.response()(scope, receive, send)
        body, more = b"", scope["method"] in ("POST", "PUT", "PATCH")
        deadline = time.monotonic() + self.timeout_s
        while more:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.001))
            except TimeoutError:
                slow = ApiError(408, f"the request body did not arrive within {self.timeout_s:g} s "
                                "(body_timeout_s); send it at once", type="timeout", code="request_timeout",
                                headers={"Connection": "close"})
                return await slow.response()(scope, receive, send)
            if message["type"] != "http.request":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                return await too_big.response()(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


class Bucket:
    """A token bucket: `per_minute` units, refilled evenly; the level may go below zero (tokens charged late)."""

    def __init__(self, per_minute: int):
        self.capacity, self.rate = float(per_minute), per_minute / 60.0
        self.level, self.updated = float(per_minute), time.monotonic()

    def refill(self) -> None:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now

    def wait_s(self, need: float) -> float:
        """Seconds until `need` units are there (0: now)."""
        self.refill()
        return 0.0 if self.level >= need else (need - self.level) / self.rate


class RateLimits:
    """Requests and tokens per minute for each key (0: unlimited). Thread-safe."""

    def __init__(self, requests_per_minute: int, tokens_per_minute: int):
        self.rpm, self.tpm = requests_per_minute, tokens_per_minute
        self._lock = threading.Lock()
        self._buckets: dict[tuple[str, str], Bucket] = {}

    def _bucket(self, owner: str, kind: str, per_minute: int) -> Bucket:
        return self._buckets.setdefault((owner, kind), Bucket(per_minute))

    def admit(self, owner: str) -> None:
        """Count one request of `owner`; 429 with Retry-After when its requests or tokens are spent."""
        with self._lock:
            tokens_wait = self._bucket(owner, "tokens", self.tpm).wait_s(1) if self.tpm else 0.0
            requests = self._bucket(owner, "requests", self.rpm) if self.rpm else None
            requests_wait = requests.wait_s(1) if requests else 0.0
            if not tokens_wait and not requests_wait and requests:
                requests.level -= 1
        if tokens_wait or requests_wait:
            kind, limit = ("tokens", self.tpm) if tokens_wait >= requests_wait else ("requests", self.rpm)
            raise ApiError(429, f"this API key used its {limit} {kind} per minute; retry after the Retry-After "
                           f"seconds (key_{kind}_per_minute)", type="rate_limit_exceeded",
                           code=f"{kind}_per_minute", headers={"Retry-After": str(math.ceil(max(tokens_wait,
                                                                                              requests_wait)))})

    def refund(self, owner: str) -> None:
        """Give back the request `admit` counted (it was refused further on, by a full queue)."""
        if self.rpm:
            with self._lock:
                bucket = self._bucket(owner, "requests", self.rpm)
                bucket.level = min(bucket.capacity, bucket.level + 1)

    def charge(self, owner: str, tokens: int) -> None:
        """Charge the tokens a finished request used (from any thread)."""
        if self.tpm:
            with self._lock:
                bucket = self._bucket(owner, "tokens", self.tpm)
                bucket.refill()
                bucket.level -= tokens


def _grant(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


class Admission:
    """At most `slots` requests at work, at most `max_queue` more waiting in FIFO order; then 429."""

    def __init__(self, slots: int, max_queue: int, retry_after_s: int):
        self.max_queue, self.retry_after_s = max_queue, retry_after_s
        self._lock = threading.Lock()
        self._free = slots
        self._waiting: deque[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = deque()

    def busy(self, why: str) -> ApiError:
        return ApiError(429, f"{why}; retry after the Retry-After seconds", type="rate_limit_exceeded",
                        code="server_busy", headers={"Retry-After": str(self.retry_after_s)})

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    async def enter(self, timeout_s: float) -> None:
        """Take a slot, waiting up to `timeout_s` in line. 429 when the line is full or the wait runs out."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._free and not self._waiting:
                self._free -= 1
                return
            if len(self._waiting) >= self.max_queue:
                raise self.busy(f"all {self.max_queue} places in the wait queue are taken")
            waiter = (loop, loop.create_future())
            self._waiting.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter[1]), max(timeout_s, 0.001))
        except BaseException as exc:
            with self._lock:
                granted = waiter not in self._waiting
                if not granted:
                    self._waiting.remove(waiter)
            if granted:  # a slot was handed over as the wait ended: pass it on
                self.leave()
            if isinstance(exc, TimeoutError):
                raise self.busy("no slot came free in time (request_timeout_s)") from None
            raise

    def leave(self) -> None:
        """Hand the slot to the next waiter, or free it. Safe from any thread."""
        with self._lock:
            while self._waiting:
                loop, future = self._waiting.popleft()
                try:
                    loop.call_soon_threadsafe(_grant, future)
                    return
                except RuntimeError:  # that waiter's event loop is gone
                    continue
            self._free += 1
