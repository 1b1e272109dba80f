"""Specialists served by a model server, behind the runtime's generate/stream contract.

A registry record's `served_by` names the server, as any model name of the one model-server layer
(`atelier.servers`): provider:model[@URL].

    llamacpp:EXPORT_DIR     llama.cpp in this process (atelier.llamacpp): the folder that
                            `atelier specialist export NAME --to gguf --serve` wrote, whose export.json
                            names the base GGUF and the specialist's GGUF LoRA adapter. The adapter is
                            loaded beside the base and applied per request (the request's `lora` field).
    llamacpp:PATH.gguf      a whole model (a merged export, say), no adapter.
    ollama:MODEL[@URL]      Ollama, through the official `ollama` client (native /api/chat), e.g.
                            "ollama:pumps-v3" or "ollama:qwen2.5:7b@http://gpu-box:11434". URL defaults to
                            $OLLAMA_HOST, else http://127.0.0.1:11434.
    openai:MODEL@URL        any OpenAI-compatible server (vLLM, llama-server, LM Studio, Ollama's /v1, ...)
                            through the official `openai` SDK, e.g. "openai:pumps@http://127.0.0.1:8000/v1".
                            Without "@URL", $OPENAI_BASE_URL. A bearer key comes from $OPENAI_API_KEY.

The model name may itself hold ':' (Ollama tags); only an '@' followed by http(s):// starts the URL.

Every backend streams, and passes the text through the runtime's StopFilter, so the contract holds
even against a server that ignores `stop`: no stop string, and no part of one, ever reaches the
caller. Ollama is always sent `num_ctx`: without it Ollama silently truncates prompts to its default
context (2048 or 4096 tokens), dropping the system prompt first. The value sent is the configured
one capped by the model's own window (its Modelfile's `num_ctx`, else its trained context length,
asked once with /api/show): a small specialist exported with `num_ctx 512` is never asked to
stretch to 8192. Every remote call is logged with the URL it reaches (credentials redacted).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any, Literal, NamedTuple

from atelier.errors import AtelierError
from atelier.redact import redact_url
from atelier.servers import Endpoint, ollama_client, openai_client, parse_model, with_scheme
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
LLAMACPP_MANIFEST = "export.json"  # the export folder's manifest; its "llamacpp" entry names base + adapter


class ServedSpec(NamedTuple):
    """A parsed `served_by` value (url is empty for llamacpp: the server starts in this process)."""

    provider: Literal["llamacpp", "ollama", "openai"]
    model: str
    url: str


def parse_served_by(spec: str) -> ServedSpec:
    """'llamacpp:DIR|PATH.gguf', 'ollama:MODEL[@URL]' or 'openai:MODEL@URL' -> ServedSpec (see the module docstring)."""
    try:
        parsed = parse_model(spec, what="served_by")
    except AtelierError:
        raise AtelierError(f"served_by {spec!r} is not understood; use 'llamacpp:EXPORT_DIR' (from `specialist export "
                           "--to gguf --serve`), 'ollama:MODEL[@http://HOST:PORT]' or "
                           "'openai:MODEL@http://HOST:PORT/v1'") from None
    if parsed.provider == "llamacpp":
        return ServedSpec("llamacpp", parsed.model, "")
    if parsed.provider == "ollama":
        return ServedSpec("ollama", parsed.model, with_scheme(parsed.url or os.environ.get("OLLAMA_HOST")
                                                              or DEFAULT_OLLAMA_URL))
    url = parsed.url or os.environ.get("OPENAI_BASE_URL", "")
    if not url:
        raise AtelierError(f"served_by {spec!r} names no server; write 'openai:{parsed.model}@http://HOST:PORT/v1' "
                           "or set OPENAI_BASE_URL")
    return ServedSpec("openai", parsed.model, with_scheme(url))


def backend_for(spec: str, *, num_ctx: int = DEFAULT_NUM_CTX, timeout: float = DEFAULT_TIMEOUT_S):
    """The backend a `served_by` value names."""
    parsed = parse_served_by(spec)
    if parsed.provider == "llamacpp":
        return LlamacppBackend(parsed.model, num_ctx=num_ctx, timeout=timeout)
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
        self.model, self.url, self.num_ctx, self.timeout = model, with_scheme(url), num_ctx, timeout
        self._client = ollama_client(Endpoint(f"ollama:{model}", "ollama", model, self.url), timeout=timeout)
        self._model_window: int | None = None  # the model's own context window, once /api/show answered

    def context_window(self) -> int:
        """num_ctx to send: the configured window, capped by the model's own.

        Asked once per backend; when /api/show fails (old server, model not there yet) the
        configured window is used and the question is asked again on the next request.
        """
        if self._model_window is None:
            try:
                self._model_window = _model_context_window(self._client.show(self.model)) or 0
            except Exception as exc:
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
            log.info("calling Ollama at %s (model %s)", redact_url(self.url), self.model)
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
        return _translate_errors(f"Ollama at {self.url}", self.url, self.timeout, self.model,
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
    """A model behind any OpenAI-compatible /v1/chat/completions, streamed through the official openai SDK.

    extra_body: fields the server understands beyond OpenAI's (llama.cpp's per-request `lora`).
    """

    def __init__(self, model: str, url: str, *, api_key: str | None = None, timeout: float = DEFAULT_TIMEOUT_S,
                 max_retries: int = 1, extra_body: dict[str, Any] | None = None, label: str | None = None):
        self.model, self.url, self.timeout, self.extra_body = model, with_scheme(url), timeout, extra_body
        endpoint = Endpoint(label or f"openai:{model}", "openai", model, self.url, api_key)
        self._client = openai_client(endpoint, timeout=timeout, max_retries=max_retries)

    def request(self, messages: list[dict], params: GenerationParams) -> dict[str, Any]:
        """The keyword arguments of chat.completions.create for one streamed request."""
        body: dict[str, Any] = {"model": self.model, "messages": messages, "stream": True,
                                "max_tokens": params.max_tokens, "temperature": params.temperature,
                                "top_p": params.top_p, "stream_options": {"include_usage": True}}
        if params.stop:
            body["stop"] = list(params.stop)
        if params.seed is not None:
            body["seed"] = params.seed
        if self.extra_body:
            body["extra_body"] = self.extra_body
        return body

    def producer(self, messages: list[dict], params: GenerationParams) -> Producer:
        def produce(emit, cancelled: threading.Event) -> tuple[FinishReason, Usage]:
            log.info("calling OpenAI-compatible server at %s (model %s)", redact_url(self.url), self.model)
            stops, finish, usage = StopFilter(params.stop), "length", Usage()
            with self._errors():
                chunks = self._client.chat.completions.create(**self.request(messages, params))
                try:
                    for chunk in chunks:
                        if chunk.usage:
                            usage = Usage(prompt_tokens=chunk.usage.prompt_tokens or 0,
                                          completion_tokens=chunk.usage.completion_tokens or 0)
                        for choice in chunk.choices or []:
                            if piece := stops.push((choice.delta.content if choice.delta else None) or ""):
                                emit(piece)
                            if choice.finish_reason:
                                finish = _finish(choice.finish_reason)
                        if stops.stopped or cancelled.is_set():
                            return "stop", usage
                finally:
                    chunks.close()  # ends the HTTP stream when we stop early
            if tail := stops.flush():
                emit(tail)
            return finish, usage

        return produce

    def _errors(self):
        return _translate_errors(f"the OpenAI-compatible server at {self.url}", self.url, self.timeout, self.model,
                                 start=f"start one serving {self.model!r} (e.g. `vllm serve MODEL --port 8000`, "
                                       "`llama-server -m MODEL.gguf --port 8080`, or Ollama's http://HOST:11434/v1), "
                                       "or fix the @URL of served_by",
                                 missing="check the model name in served_by against the server's /v1/models")


# ----------------------------------------------------------------------------- llama.cpp in this process


def llamacpp_files(model: str) -> tuple[Path, Path | None]:
    """(base GGUF, GGUF LoRA adapter or None) that a `llamacpp:` served_by names.

    An export folder (its export.json has a "llamacpp" entry: {"base": ..., "adapter": ...}) gives
    both; a .gguf path or a catalogue name gives a whole model without adapter.
    """
    from atelier.llamacpp import resolve_gguf

    folder = Path(model).expanduser()
    if folder.is_dir():
        manifest = folder / LLAMACPP_MANIFEST
        entry = json.loads(manifest.read_text(encoding="utf-8")).get("llamacpp") if manifest.is_file() else None
        if not entry:
            raise AtelierError(f"served_by llamacpp:{model} is a folder without an export manifest naming a base GGUF; "
                               "write one with `atelier specialist export NAME --to gguf --serve`")
        base, adapter = Path(entry["base"]), Path(entry["adapter"]) if entry.get("adapter") else None
        for path in (base, adapter):
            if path is not None and not path.is_file():
                raise AtelierError(f"served_by llamacpp:{model} needs {path}, which is gone; export the specialist "
                                   "again with `atelier specialist export NAME --to gguf --serve`")
        return base, adapter
    return resolve_gguf(model), None


class LlamacppBackend(OpenAICompatibleBackend):
    """A specialist served by llama.cpp in this process: its base GGUF with its GGUF LoRA adapter.

    The adapter is loaded at scale 0 (atelier.llamacpp) and every request turns it on with
    `"lora": [{"id": 0, "scale": 1.0}]`, llama.cpp's per-request adapter choice; `adapter_scale`
    0 asks the bare base through the same server.
    """

    def __init__(self, model: str, *, num_ctx: int = DEFAULT_NUM_CTX, timeout: float = DEFAULT_TIMEOUT_S,
                 adapter_scale: float = 1.0, threads: int = 1):
        from atelier.llamacpp import embedded_server

        self.gguf, self.adapter = llamacpp_files(model)
        server = embedded_server(str(self.gguf), n_ctx=num_ctx, adapters=(self.adapter,) if self.adapter else (),
                                 threads=threads)
        self.server = server
        lora = {"lora": [{"id": 0, "scale": adapter_scale}]} if self.adapter else None
        super().__init__(self.gguf.stem, server.url, timeout=timeout, max_retries=0, extra_body=lora,
                         label=f"llamacpp:{model}")


# ----------------------------------------------------------------------------- errors


def _message(body: Any) -> str:
    """The human part of an error body: OpenAI's {"error": {"message"}}, Ollama's {"error": "..."}, or text."""
    if isinstance(body, str):
        try:
            body = json.loads(body)
        except ValueError:
            return body.strip()[:300] or "(empty body)"
    error = body.get("error", body) if isinstance(body, dict) else body
    return str(error.get("message", error) if isinstance(error, dict) else error)[:300]


def _http_error(where: str, status: int, body: Any, model: str) -> AtelierError:
    hint = {401: "set OPENAI_API_KEY to a key the server accepts", 403: "the key lacks access to this model",
            404: f"the server has no model {model!r} (check its /v1/models)",
            429: "the server is overloaded or rate-limited; retry later"}.get(status, "see the server's log")
    return AtelierError(f"{where} answered HTTP {status}: {_message(body)}; {hint}")


class _translate_errors:
    """Turn connection, timeout and HTTP failures of one call into an AtelierError that names the fix."""

    def __init__(self, what: str, url: str, timeout: float, model: str, *, start: str, missing: str):
        self.what, self.url, self.timeout, self.model = what, url, timeout, model
        self.start, self.missing = start, missing

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        import httpx

        ollama = sys.modules.get("ollama")  # imported already when an Ollama backend is in use
        openai = sys.modules.get("openai")  # likewise for the OpenAI-compatible ones
        if exc is None or isinstance(exc, AtelierError):
            return False
        if openai is not None and isinstance(exc, openai.APITimeoutError):
            raise AtelierError(f"{self.what} did not answer within {self.timeout:g} s; check the server's load "
                               "or raise the timeout") from None
        if openai is not None and isinstance(exc, openai.APIConnectionError):
            raise AtelierError(f"no server reachable at {redact_url(self.url)} ({self.what}); {self.start}") from None
        if openai is not None and isinstance(exc, openai.APIStatusError):
            raise _http_error(self.what, exc.status_code, exc.body if exc.body is not None else exc.message,
                              self.model) from None
        if openai is not None and isinstance(exc, openai.APIError):
            raise AtelierError(f"{self.what} reported an error mid-stream: {exc.message}; "
                               "see the server's log") from None
        if isinstance(exc, (ConnectionError, httpx.ConnectError, httpx.ConnectTimeout)):
            raise AtelierError(f"no server reachable at {redact_url(self.url)} ({self.what}); {self.start}") from None
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
