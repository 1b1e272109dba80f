"""The teacher: a larger chat model that writes training data, asked each question only once.

A teacher is named `provider:model` (the model-server layer's names, atelier.servers):
`ollama:gemma2:27b` (an Ollama server, through the official `ollama` client), `openai:MODEL`
(any OpenAI-compatible server: OpenAI, vLLM, llama.cpp, LM Studio, Ollama's `/v1`, through the
official `openai` SDK) or `llamacpp:smollm2-135m` / `llamacpp:PATH.gguf`
(llama.cpp started in-process by atelier.servers). A parser with a `json_schema` attribute
gets structured output: the schema as `response_format` for OpenAI-compatible servers and
llama.cpp (which turns it into a grammar), as `format` for Ollama. Both backends honour one small contract (`send`, `probe`), so adding a
provider means adding one class to `_BACKENDS`.

What the rest of the pipeline relies on:

* **No wasted calls.** Every answer that came back is stored in a SQLite cache keyed by
  sha256(model + messages + sampling parameters). A re-run, or a run resumed after a
  crash, never asks the same question twice; it also sees the same answers, so its
  rejection counts are the same.
* **Transient failures are retried, others are not.** Connection errors, timeouts, 429
  and 5xx (the SDKs' exception types, sorted by `_openai_errors` and OllamaBackend.send) are
  retried with exponential backoff by the teacher's own loop (the SDK's retries are off); any other HTTP error fails that one item
  (counted), except 401/403/404, which mean the teacher is misconfigured and stop the run.
* **Bounded load.** Requests run in a thread pool of `concurrency` workers, never more.
* **Bad output is data, not a crash.** `complete_many` hands each answer to a parser;
  an answer the parser rejects is counted under the parser's reason and skipped.
* **Fail early.** `check()` reaches the server before any work starts and raises an
  AtelierError naming the URL and the fix.

What is asked, and how answers are checked, lives in `training.prompts`.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import logging
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from pydantic import Field

from atelier import tracing
from atelier.config import StrictModel
from atelier.errors import AtelierError
from atelier.redact import redact_url
from atelier.sqlite import connect

log = logging.getLogger(__name__)
T = TypeVar("T")


class TeacherConfig(StrictModel):
    name: str = Field(description="The teacher as provider:model, e.g. 'ollama:gemma2:27b' or 'openai:gpt-4o-mini'; "
                      "without a teacher, offline generators write the data.")
    base_url: str | None = Field(None, description="Server URL. Default: $OLLAMA_HOST or http://127.0.0.1:11434 for "
                                                   "ollama; $OPENAI_BASE_URL or https://api.openai.com/v1 for openai.")
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the API key (openai only).")
    num_ctx: int = Field(8192, ge=512, description="Ollama context window, always sent: Ollama's default silently "
                                                   "truncates long prompts.")
    temperature: float = Field(0.7, ge=0.0, le=2.0, description="Sampling temperature of the teacher.")
    max_tokens: int = Field(1024, ge=16, description="Longest answer the teacher may write, in tokens.")
    timeout_s: float = Field(300.0, gt=0, description="Seconds to wait for one answer.")
    max_retries: int = Field(4, ge=0, description="Retries of one request after a transient error (connection, "
                                                  "timeout, 429, 5xx).")
    backoff_s: float = Field(1.0, ge=0, description="Wait before the first retry; doubled after each further failure.")
    cache_path: Path | None = Field(None, description="SQLite file of cached answers. Default: "
                                                      "$ATELIER_HOME/cache/teacher.sqlite.")


class TransientError(Exception):
    """A failure worth retrying: the same request may succeed a little later."""


class RequestFailed(Exception):
    """A failure of one request that retrying will not fix; `fatal` ones stop the run."""

    def __init__(self, reason: str, fatal: bool = False):
        super().__init__(reason)
        self.reason, self.fatal = reason, fatal


class Rejected(Exception):
    """Raised by a parser: the teacher's answer is unusable, for the reason given."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class ChatBackend(Protocol):
    """What a provider must do: answer one chat request, and say whether it is reachable."""

    url: str

    def send(self, messages: list[dict[str, str]], schema: dict | None = None) -> str: ...

    def probe(self) -> None: ...


def _status_error(status: int) -> Exception:
    """429 and 5xx are worth a retry; 401/403/404 mean a wrong key, URL or model name."""
    if status == 429 or status >= 500:
        return TransientError(f"HTTP {status}")
    return RequestFailed(f"http_{status}" if status > 0 else "error", fatal=status in (401, 403, 404))


def _openai_errors(exc: Exception) -> Exception:
    """The openai SDK's exception as the teacher's split: transient (retry) or not (count, or stop the run)."""
    import openai

    if isinstance(exc, openai.APIConnectionError):  # APITimeoutError included
        return TransientError(f"{type(exc).__name__}: {exc}")
    if isinstance(exc, openai.APIStatusError):
        return _status_error(exc.status_code)
    return RequestFailed("bad_response")


class OpenAIBackend:
    """The OpenAI-compatible chat API through the official openai SDK (its own retries off: the
    teacher's loop retries transient failures, with the cache and counts around it)."""

    def __init__(self, model: str, config: TeacherConfig, url: str | None = None, label: str | None = None):
        from atelier.servers import OPENAI_DEFAULT_URL, Endpoint, openai_client, with_scheme

        self.model, self.config, self.label = model, config, label or f"openai:{model}"
        self.url = with_scheme(url or config.base_url or os.environ.get("OPENAI_BASE_URL") or OPENAI_DEFAULT_URL)
        key = os.environ.get(config.api_key_env) or None
        self._client = openai_client(Endpoint(self.label, "openai", model, self.url, key), timeout=config.timeout_s,
                                     max_retries=0)

    def send(self, messages: list[dict[str, str]], schema: dict | None = None) -> str:
        import openai

        extra: dict[str, Any] = {}
        if schema is not None:  # llama.cpp turns the schema into a grammar; OpenAI and vLLM honour it too
            extra["response_format"] = {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema}}
        with tracing.model_call(self.label, attributes={tracing.AGENT: "teacher"}) as call:
            try:
                reply = self._client.chat.completions.create(model=self.model, messages=messages, stream=False,
                                                             temperature=self.config.temperature,
                                                             max_tokens=self.config.max_tokens, **extra)
            except openai.OpenAIError as exc:
                raise _openai_errors(exc) from None
            usage = getattr(reply, "usage", None)
            call.usage(getattr(usage, "prompt_tokens", 0), getattr(usage, "completion_tokens", 0),
                       getattr(reply, "model", None))
        try:
            return str(reply.choices[0].message.content or "")
        except (AttributeError, IndexError, TypeError):
            raise RequestFailed("bad_response") from None

    def probe(self) -> None:
        import openai

        try:
            self._client.with_options(timeout=min(10.0, self.config.timeout_s)).models.list()
        except openai.APIConnectionError:
            raise AtelierError(f"teacher {self.label} not reachable at {redact_url(self.url)}; start the server, or set "
                               f"OPENAI_BASE_URL / the teacher's base_url, or run without --teacher") from None
        except openai.APIStatusError as exc:
            if exc.status_code in (401, 403):
                raise AtelierError(f"teacher {self.label} at {redact_url(self.url)} refused the API key (HTTP "
                                   f"{exc.status_code}); set {self.config.api_key_env} or run without --teacher"
                                   ) from None  # other statuses: some servers have no /models; the chat call will tell


class OllamaBackend:
    """Ollama's /api/chat through the official ollama client, with num_ctx always set and the
    schema as Ollama's `format` (its structured output)."""

    def __init__(self, model: str, config: TeacherConfig):
        from atelier.servers import Endpoint, ollama_client, ollama_host

        self.model, self.config = model, config
        self.url = ollama_host(config.base_url)
        self._client = ollama_client(Endpoint(f"ollama:{model}", "ollama", model, self.url), timeout=config.timeout_s)

    def send(self, messages: list[dict[str, str]], schema: dict | None = None) -> str:
        import httpx
        from ollama import ResponseError

        options = {"num_ctx": self.config.num_ctx, "temperature": self.config.temperature,
                   "num_predict": self.config.max_tokens}
        with tracing.model_call(f"ollama:{self.model}", attributes={tracing.AGENT: "teacher"}) as call:
            try:
                reply = self._client.chat(self.model, messages=messages, stream=False, options=options, format=schema)
            except (ConnectionError, httpx.TransportError) as exc:
                raise TransientError(f"{type(exc).__name__}: {exc}") from None
            except ResponseError as exc:
                raise _status_error(exc.status_code) from None
            except (ValueError, KeyError, TypeError):
                raise RequestFailed("bad_response") from None
            call.usage(reply.prompt_eval_count, reply.eval_count, reply.model)
        return str(reply.message.content or "")

    def probe(self) -> None:
        import httpx
        from ollama import ResponseError

        try:
            tags = self._client.list()
        except (ConnectionError, httpx.TransportError, ResponseError, ValueError):
            raise AtelierError(f"teacher ollama:{self.model} not reachable at {redact_url(self.url)}; start it with `ollama serve`"
                               f" and `ollama pull {self.model}`, or set OLLAMA_HOST, or run without --teacher"
                               ) from None
        names = {m.model for m in tags.models}
        if self.model not in names and f"{self.model}:latest" not in names:
            raise AtelierError(f"teacher model {self.model} is not pulled on the Ollama server at {redact_url(self.url)}; run "
                               f"`ollama pull {self.model}`, or choose another --teacher, or run without --teacher")


def _llamacpp_backend(model: str, config: TeacherConfig) -> OpenAIBackend:
    """A GGUF (llamacpp:smollm2-135m, llamacpp:PATH.gguf) in the embedded llama.cpp, spoken to as OpenAI."""
    from atelier.servers import ServerConfig, endpoint

    ep = endpoint(ServerConfig(name=f"llamacpp:{model}", num_ctx=max(config.num_ctx, 2048)))
    return OpenAIBackend(ep.model, config, url=ep.base_url, label=ep.name)


_BACKENDS: dict[str, Callable[[str, TeacherConfig], ChatBackend]] = {
    "ollama": OllamaBackend, "openai": OpenAIBackend, "llamacpp": _llamacpp_backend}


_ANSWERS_TABLE = ("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, model TEXT NOT NULL, "
                  "answer TEXT NOT NULL, created REAL NOT NULL);")


class ResponseCache:
    """Answers already received, in SQLite, keyed by the hash of the request."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = connect(path, what="teacher cache", fix="delete it (answers are asked again)", timeout=30,
                           autocommit=False, migrations=(_ANSWERS_TABLE,))

    def get(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT answer FROM answers WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def put(self, key: str, model: str, answer: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?)", (key, model, answer, time.time()))
            self._db.commit()

    def close(self) -> None:
        with self._lock:
            self._db.close()


@dataclass
class TeacherBatch(Generic[T]):
    """Parsed answers in prompt order (None where rejected), and rejection counts by reason."""

    results: list[T | None]
    rejected: Counter[str] = field(default_factory=Counter)

    @property
    def accepted(self) -> list[T]:
        return [r for r in self.results if r is not None]


def split_name(name: str) -> tuple[str, str]:
    """('ollama', 'gemma2:27b') from 'ollama:gemma2:27b' (the model-server layer's one parser)."""
    from atelier.servers import parse_model

    parsed = parse_model(name, what="teacher")
    return parsed.provider, parsed.model


class Teacher:
    """A chat model behind a cache, retries and a concurrency bound."""

    def __init__(self, config: TeacherConfig, *, backend: ChatBackend | None = None,
                 cache: ResponseCache | None = None):
        provider, model = split_name(config.name)
        self.config = config
        self.backend = backend or _BACKENDS[provider](model, config)
        if cache is None:
            from atelier.home import atelier_home

            cache = ResponseCache(config.cache_path or atelier_home() / "cache" / "teacher.sqlite")
        self.cache = cache
        self.stats: Counter[str] = Counter()  # requests, retries, cache_hits
        self._stats_lock = threading.Lock()

    @classmethod
    def from_name(cls, name: str, **settings: Any) -> Teacher:
        return cls(TeacherConfig(name=name, **settings))

    @property
    def name(self) -> str:
        return self.config.name

    def close(self) -> None:
        self.cache.close()

    def check(self) -> None:
        """Raise an AtelierError unless the teacher's server answers (no generation is run)."""
        log.info("checking teacher %s at %s", self.name, redact_url(self.backend.url))
        self.backend.probe()

    def _count(self, what: str) -> None:
        with self._stats_lock:
            self.stats[what] += 1

    def cache_key(self, messages: list[dict[str, str]], schema: dict | None = None) -> str:
        params: dict[str, Any] = {"temperature": self.config.temperature, "max_tokens": self.config.max_tokens}
        if schema is not None:
            params["schema"] = schema
        if self.name.startswith("ollama:"):
            params["num_ctx"] = self.config.num_ctx
        blob = json.dumps({"model": self.name, "messages": messages, "params": params}, sort_keys=True)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def complete(self, prompt: str, schema: dict | None = None) -> str:
        """The teacher's answer to one user prompt (as JSON following `schema` when given): cached, else asked."""
        messages = [{"role": "user", "content": prompt}]
        key = self.cache_key(messages, schema)
        cached = self.cache.get(key)
        if cached is not None:
            self._count("cache_hits")
            return cached
        answer = self._send_with_retries(messages, schema)
        self.cache.put(key, self.name, answer)
        return answer

    def _send_with_retries(self, messages: list[dict[str, str]], schema: dict | None = None) -> str:
        for attempt in range(self.config.max_retries + 1):
            self._count("requests")
            try:
                return self.backend.send(messages, schema) if schema is not None else self.backend.send(messages)
            except TransientError as exc:
                if attempt == self.config.max_retries:
                    raise RequestFailed("unavailable") from exc
                delay = self.config.backoff_s * (2 ** attempt) * (1 + 0.1 * random.random())
                log.debug("teacher %s: %s; retry %d in %.2fs", self.name, exc, attempt + 1, delay)
                self._count("retries")
                time.sleep(delay)
        raise AssertionError("unreachable")

    def complete_many(self, prompts: Sequence[str], parse: Callable[[str], T], *, concurrency: int = 2,
                      progress: Callable[[int, int], None] | None = None) -> TeacherBatch[T]:
        """Ask every prompt (at most `concurrency` at once) and parse each answer.

        A parser raising `Rejected(reason)` counts as `reason`; a request that failed counts
        as `teacher_<reason>`. A fatal failure (bad key, unknown model) stops the batch.
        """
        batch: TeacherBatch[T] = TeacherBatch(results=[None] * len(prompts))
        done = 0
        tracing.setup()  # a batch is one trace (ATELIER_HOME's store, OTLP when configured): a span per model call
        with (tracing.span("invoke_agent teacher", attributes={tracing.OPERATION: "invoke_agent", tracing.AGENT:
                           "teacher", tracing.REQUEST_MODEL: self.name, "atelier.teacher.prompts": len(prompts)}),
              ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="teacher") as pool):
            schema = getattr(parse, "json_schema", None)  # a parser may ask for structured output
            # each call runs in a copy of this context, so its span is a child of the batch's
            futures = {pool.submit(contextvars.copy_context().run, self.complete, p, schema): i
                       for i, p in enumerate(prompts)}
            for future in as_completed(futures):
                i = futures[future]
                try:
                    batch.results[i] = parse(future.result())
                except Rejected as exc:
                    batch.rejected[exc.reason] += 1
                except RequestFailed as exc:
                    if exc.fatal:
                        for other in futures:
                            other.cancel()
                        raise AtelierError(f"teacher {self.name} at {redact_url(self.backend.url)} answered {exc.reason}; check "
                                           f"the model name and API key, or run without --teacher") from None
                    batch.rejected[f"teacher_{exc.reason}"] += 1
                done += 1
                if progress:
                    progress(done, len(prompts))
        return batch
