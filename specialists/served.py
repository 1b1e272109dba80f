"""Specialists served by an external server, behind the runtime's generate/stream contract.

A registry record's `served_by` names the server; two forms:

    ollama:MODEL[@URL]      Ollama's native /api/chat (NDJSON streaming), e.g. "ollama:pumps-v3" or
                            "ollama:qwen2.5:7b@http://gpu-box:11434". URL defaults to $OLLAMA_HOST,
                            else http://127.0.0.1:11434.
    openai:MODEL@URL        any OpenAI-compatible server's /v1/chat/completions (SSE streaming):
                            vLLM, llama.cpp's llama-server, LM Studio, Ollama's /v1, ... e.g.
                            "openai:pumps@http://127.0.0.1:8000/v1". URL is the base URL ending in
                            /v1; without "@URL", $OPENAI_BASE_URL. A bearer key comes from $OPENAI_API_KEY.

The model name may itself hold ':' (Ollama tags); only an '@' followed by http(s):// starts the URL.

Both backends always stream, and pass the text through the runtime's StopFilter, so the
contract holds even against a server that ignores `stop`: no stop string, and no part of one,
ever reaches the caller. Ollama is always sent `num_ctx`: without it Ollama silently truncates
prompts to its default context (2048 or 4096 tokens), dropping the system prompt first. The value
sent is the configured one capped by the model's own window (its Modelfile's `num_ctx`, else its
trained context length, asked once with /api/show): a small specialist exported with
`num_ctx 512` is never asked to stretch to 8192.
Every remote call is logged with the URL it reaches.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any, Literal, NamedTuple

from atelier.errors import AtelierError
from specialists.generation import (
    FinishReason,
    Generation,
    GenerationParams,
    Producer,
    StopFilter,
    TokenStream,
    Usage,
    run_to_completion,
)

log = logging.getLogger(__name__)

DEFAULT_OLLAMA_URL = "http://127.0.0.1:11434"
DEFAULT_NUM_CTX = 8192
DEFAULT_TIMEOUT_S = 300.0


class ServedSpec(NamedTuple):
    """A parsed `served_by` value."""

    provider: Literal["ollama", "openai"]
    model: str
    url: str


def _with_scheme(url: str) -> str:
    url = url.strip().rstrip("/")
    return url if url.startswith(("http://", "https://")) else f"http://{url}"


def parse_served_by(spec: str) -> ServedSpec:
    """'ollama:MODEL[@URL]' or 'openai:MODEL@URL' -> ServedSpec (see the module docstring)."""
    provider, _, rest = spec.partition(":")
    model, at, url = rest.rpartition("@")
    if not (at and url.startswith(("http://", "https://"))):
        model, url = rest, ""
    if provider not in ("ollama", "openai") or not model:
        raise AtelierError(f"served_by {spec!r} is not understood; use 'ollama:MODEL[@http://HOST:PORT]' or "
                           "'openai:MODEL@http://HOST:PORT/v1'")
    if provider == "ollama":
        return ServedSpec("ollama", model, _with_scheme(url or os.environ.get("OLLAMA_HOST") or DEFAULT_OLLAMA_URL))
    url = url or os.environ.get("OPENAI_BASE_URL", "")
    if not url:
        raise AtelierError(f"served_by {spec!r} names no server; write 'openai:{model}@http://HOST:PORT/v1' "
                           "or set OPENAI_BASE_URL")
    return ServedSpec("openai", model, _with_scheme(url))


def backend_for(spec: str, *, num_ctx: int = DEFAULT_NUM_CTX, timeout: float = DEFAULT_TIMEOUT_S):
    """The backend a `served_by` value names."""
    parsed = parse_served_by(spec)
    if parsed.provider == "ollama":
        return OllamaBackend(parsed.model, parsed.url, num_ctx=num_ctx, timeout=timeout)
    return OpenAICompatibleBackend(parsed.model, parsed.url, api_key=os.environ.get("OPENAI_API_KEY"),
                                   timeout=timeout)


class _Contract:
    """generate/stream on top of a backend's `producer`, as SpecialistRuntime offers them."""

    model: str

    def producer(self, messages: list[dict], params: GenerationParams) -> Producer:
        raise NotImplementedError

    def generate(self, messages: list[dict], params: GenerationParams | None = None) -> Generation:
        return run_to_completion(self.producer(messages, params or GenerationParams()), self.model, None)

    def stream(self, messages: list[dict], params: GenerationParams | None = None) -> TokenStream:
        return TokenStream(self.producer(messages, params or GenerationParams()), self.model, None)


def _finish(reason: str | None) -> FinishReason:
    return "length" if reason == "length" else "stop"


# ----------------------------------------------------------------------------- Ollama


class OllamaBackend(_Contract):
    """A model served by Ollama, through the official `ollama` client (native /api/chat, NDJSON)."""

    def __init__(self, model: str, url: str = DEFAULT_OLLAMA_URL, *, num_ctx: int = DEFAULT_NUM_CTX,
                 timeout: float = DEFAULT_TIMEOUT_S):
        import ollama

        self.model, self.url, self.num_ctx, self.timeout = model, _with_scheme(url), num_ctx, timeout
        self._client = ollama.Client(host=self.url, timeout=timeout)
        self._model_window: int | None = None  # the model's own context window, once /api/show answered

    def context_window(self) -> int:
        """num_ctx to send: the configured window, capped by the model's own.

        Asked once per backend; when /api/show fails (old server, model not there yet) the
        configured window is used and the question is asked again on the next request.
        """
        if self._model_window is None:
            try:
                self._model_window = _model_context_window(self._client.show(self.model)) or 0
            except Exception as exc:  # noqa: BLE001 - any failure here leaves the chat call to report it
                log.debug("could not read the context window of %s from %s: %s", self.model, self.url, exc)
                return self.num_ctx
        return min(self.num_ctx, self._model_window) if self._model_window else self.num_ctx

    def options(self, params: GenerationParams) -> dict[str, Any]:
        """Ollama options for one request; num_ctx always, so nothing is silently truncated."""
        options: dict[str, Any] = {"num_ctx": self.context_window(), "num_predict": params.max_tokens,
                                   "temperature": params.temperature, "top_p": params.top_p}
        if params.stop:
            options["stop"] = list(params.stop)
        if params.seed is not None:
            options["seed"] = params.seed
        return options

    def producer(self, messages: list[dict], params: GenerationParams) -> Producer:
        def produce(emit, cancelled: threading.Event) -> tuple[FinishReason, Usage]:
            log.info("calling Ollama at %s (model %s)", self.url, self.model)
            stops, finish, usage, chunks = StopFilter(params.stop), "length", Usage(), 0
            with self._errors():
                parts = self._client.chat(self.model, messages=messages, stream=True, options=self.options(params))
                try:
                    for part in parts:
                        chunks += 1
                        if piece := stops.push(part.message.content or ""):
                            emit(piece)
                        if stops.stopped or cancelled.is_set():
                            return "stop", Usage(completion_tokens=chunks)
                        if part.done:
                            finish = _finish(part.done_reason)
                            usage = Usage(prompt_tokens=part.prompt_eval_count or 0,
                                          completion_tokens=part.eval_count or chunks)
                            break
                finally:
                    parts.close()  # ends the HTTP stream when we stop early
            if tail := stops.flush():
                emit(tail)
            return finish, usage

        return produce

    def _errors(self):
        return _translate_errors(f"Ollama at {self.url}", self.url, self.timeout,
                                 start=f"start it with `ollama serve` and `ollama pull {self.model}`, or set "
                                       "OLLAMA_HOST / the @URL of served_by",
                                 missing=f"pull or create it: `ollama pull {self.model}` "
                                         f"(or `ollama create {self.model} -f Modelfile`)")


def _model_context_window(info: Any) -> int | None:
    """The window a model was made for, from Ollama's /api/show: its Modelfile's `num_ctx` when it sets
    one, else the architecture's `<arch>.context_length`; None when neither is given."""
    for line in (getattr(info, "parameters", None) or "").splitlines():
        key, _, value = line.strip().partition(" ")
        if key == "num_ctx" and value.strip().isdigit():
            return int(value.strip())
    lengths = [v for k, v in (getattr(info, "modelinfo", None) or {}).items()
               if k.endswith(".context_length") and isinstance(v, int) and v > 0]
    return min(lengths) if lengths else None


# ----------------------------------------------------------------------------- OpenAI-compatible


class OpenAICompatibleBackend(_Contract):
    """A model behind any OpenAI-compatible /v1/chat/completions, streamed as server-sent events."""

    def __init__(self, model: str, url: str, *, api_key: str | None = None, timeout: float = DEFAULT_TIMEOUT_S):
        import httpx

        self.model, self.url, self.timeout = model, _with_scheme(url), timeout
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(timeout=httpx.Timeout(timeout, connect=min(10.0, timeout)), headers=headers)

    def payload(self, messages: list[dict], params: GenerationParams) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "messages": messages, "stream": True,
                                "max_tokens": params.max_tokens, "temperature": params.temperature,
                                "top_p": params.top_p, "stream_options": {"include_usage": True}}
        if params.stop:
            body["stop"] = list(params.stop)
        if params.seed is not None:
            body["seed"] = params.seed
        return body

    def producer(self, messages: list[dict], params: GenerationParams) -> Producer:
        def produce(emit, cancelled: threading.Event) -> tuple[FinishReason, Usage]:
            endpoint = f"{self.url}/chat/completions"
            log.info("calling OpenAI-compatible server at %s (model %s)", endpoint, self.model)
            stops, finish, usage = StopFilter(params.stop), "length", Usage()
            with self._errors(), self._client.stream("POST", endpoint, json=self.payload(messages, params)) as reply:
                if reply.status_code >= 400:
                    reply.read()
                    raise _http_error(endpoint, reply.status_code, reply.text, self.model)
                for data in _sse_data(reply.iter_lines()):
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if chunk.get("error"):
                        raise AtelierError(f"{endpoint} reported an error mid-stream: {_message(chunk)}")
                    if chunk.get("usage"):
                        usage = Usage(prompt_tokens=chunk["usage"].get("prompt_tokens") or 0,
                                      completion_tokens=chunk["usage"].get("completion_tokens") or 0)
                    for choice in chunk.get("choices") or []:
                        if piece := stops.push((choice.get("delta") or {}).get("content") or ""):
                            emit(piece)
                        if choice.get("finish_reason"):
                            finish = _finish(choice["finish_reason"])
                    if stops.stopped or cancelled.is_set():
                        return "stop", usage
            if tail := stops.flush():
                emit(tail)
            return finish, usage

        return produce

    def _errors(self):
        return _translate_errors(f"the OpenAI-compatible server at {self.url}", self.url, self.timeout,
                                 start=f"start one serving {self.model!r} (e.g. `vllm serve MODEL --port 8000`, "
                                       "`llama-server -m MODEL.gguf --port 8080`, or Ollama's http://HOST:11434/v1), "
                                       "or fix the @URL of served_by",
                                 missing="check the model name in served_by against the server's /v1/models")


def _sse_data(lines: Iterator[str]) -> Iterator[str]:
    """The data of each server-sent event (multi-line data joined by newlines; comments skipped)."""
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
            data = []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
    if data:
        yield "\n".join(data)


def _message(body: Any) -> str:
    """The human part of an error body: OpenAI's {"error": {"message"}}, Ollama's {"error": "..."}, or text."""
    if isinstance(body, str):
        try:
            body = json.loads(body)
        except ValueError:
            return body.strip()[:300] or "(empty body)"
    error = body.get("error", body) if isinstance(body, dict) else body
    return str(error.get("message", error) if isinstance(error, dict) else error)[:300]


def _http_error(where: str, status: int, body: str, model: str) -> AtelierError:
    hint = {401: "set OPENAI_API_KEY to a key the server accepts", 403: "the key lacks access to this model",
            404: f"the server has no model {model!r} (check its /v1/models)",
            429: "the server is overloaded or rate-limited; retry later"}.get(status, "see the server's log")
    return AtelierError(f"{where} answered HTTP {status}: {_message(body)}; {hint}")


class _translate_errors:
    """Turn connection, timeout and HTTP failures of one call into an AtelierError that names the fix."""

    def __init__(self, what: str, url: str, timeout: float, *, start: str, missing: str):
        self.what, self.url, self.timeout, self.start, self.missing = what, url, timeout, start, missing

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        import httpx

        ollama = sys.modules.get("ollama")  # imported already when an Ollama backend is in use
        if exc is None or isinstance(exc, AtelierError):
            return False
        if isinstance(exc, (ConnectionError, httpx.ConnectError, httpx.ConnectTimeout)):
            raise AtelierError(f"no server reachable at {self.url} ({self.what}); {self.start}") from None
        if isinstance(exc, httpx.TimeoutException):
            raise AtelierError(f"{self.what} did not answer within {self.timeout:g} s; check the server's load "
                               "or raise the timeout") from None
        if ollama is not None and isinstance(exc, ollama.ResponseError):
            if exc.status_code == 404:
                raise AtelierError(f"{self.what} has no such model ({exc.error}); {self.missing}") from None
            raise AtelierError(f"{self.what} failed: {_message(exc.error)} (HTTP {exc.status_code})") from None
        if isinstance(exc, (httpx.HTTPError, json.JSONDecodeError)):
            raise AtelierError(f"{self.what} broke off or sent a malformed reply ({type(exc).__name__}: {exc}); "
                               "see the server's log") from None
        return False
