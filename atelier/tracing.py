"""Traces of every request, in OpenTelemetry's GenAI semantic conventions: one module every package may use.

    setup(config)        the process's tracer provider: the local SQLite trace store under ATELIER_HOME
                         (atelier/trace_store.py, with a retention limit) and, when OTEL_EXPORTER_OTLP_ENDPOINT is
                         set, OTLP/HTTP to any collector (Langfuse, Jaeger, an OpenTelemetry Collector)
    request(name, ...)   the root span of one request, and its RequestRecord (timings per kind, model calls)
    span(name, kind=...) a child span; `kind` ("route", "search", "model", "tool") adds its time to the record

Spans are exported off the request path by a BatchSpanProcessor, so a request pays only for the
span objects (microseconds). With tracing off `span` is a timer and nothing else. A broken store
or collector never fails a request: the exporter logs one warning and drops the batch.

Model calls carry the GenAI attributes (`gen_ai.operation.name`, `gen_ai.provider.name`,
`gen_ai.request.model`, `gen_ai.usage.*`, `gen_ai.conversation.id`, `gen_ai.agent.name`,
`gen_ai.tool.name`); what they do not cover is under `atelier.route.*` and `atelier.search.*`.
Prompts and answers (`gen_ai.input.messages`, `gen_ai.output.messages`, `atelier.route.question`) are
recorded only with `capture_content` on, and pass `clean` first: no credentials in a trace.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field

from atelier.config import StrictModel
from atelier.errors import AtelierError
from atelier.redact import scrub

log = logging.getLogger(__name__)

# -- attribute names: OpenTelemetry GenAI semantic conventions ----------------------------------------
OPERATION = "gen_ai.operation.name"  # chat, execute_tool, invoke_agent, retrieval
PROVIDER = "gen_ai.provider.name"
REQUEST_MODEL = "gen_ai.request.model"
RESPONSE_MODEL = "gen_ai.response.model"
INPUT_TOKENS = "gen_ai.usage.input_tokens"
OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
FINISH_REASONS = "gen_ai.response.finish_reasons"
CONVERSATION = "gen_ai.conversation.id"
AGENT = "gen_ai.agent.name"
TOOL = "gen_ai.tool.name"
INPUT_MESSAGES = "gen_ai.input.messages"  # content: only with capture_content
OUTPUT_MESSAGES = "gen_ai.output.messages"
# -- what they do not cover -------------------------------------------------------------------------
ROUTE = "atelier.route.chosen"  # the route that answered (after any fallback)
ROUTE_TOP = "atelier.route.top"  # the semantic router's best route ("none": out of scope)
CONFIDENCE = "atelier.route.confidence"
THRESHOLD = "atelier.route.threshold"  # the confident threshold the confidence was judged against
IN_SCOPE = "atelier.route.in_scope"
FALLBACK = "atelier.route.fallback"  # the router was not confident: the orchestrator model (or direct) decided
ALTERNATIVES = "atelier.route.alternatives"  # the top candidates, best first ...
ALTERNATIVE_CONFIDENCES = "atelier.route.alternative_confidences"  # ... and their confidences
QUESTION = "atelier.route.question"  # content: only with capture_content
SEARCH_MODE = "atelier.search.mode"
SEARCH_HITS = "atelier.search.hits"
SEARCH_TOP_SCORES = "atelier.search.top_scores"

ROUTE_SPAN = "atelier.route"
KINDS = ("route", "search", "model", "tool")  # the timing breakdown of an answer
STORE_FILE = "traces.sqlite"


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    try:
        return int(value) if value else default
    except ValueError:
        raise AtelierError(
            f"{name}={value!r} is not a whole number; set it to how many traces to keep (default {default})"
        ) from None


def _env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name, "").strip().lower()
    return default if not value else value not in ("0", "false", "off", "no")


class TracingConfig(StrictModel):
    """Whether and where request traces go. Defaults come from the environment, so every command agrees."""

    enabled: bool = Field(
        default_factory=lambda: _env_flag("ATELIER_TRACING", True) and not _env_flag("OTEL_SDK_DISABLED", False),
        description="Trace requests (ATELIER_TRACING=off or OTEL_SDK_DISABLED=true: no).",
    )
    store: bool = Field(
        default_factory=lambda: _env_flag("ATELIER_TRACE_STORE", True),
        description="Keep traces in the local SQLite store ATELIER_HOME/traces.sqlite (ATELIER_TRACE_STORE=off: no).",
    )
    keep_traces: int = Field(
        default_factory=lambda: _env_int("ATELIER_TRACE_KEEP", 10_000),
        ge=1,
        description="Most traces the local store keeps; older ones are deleted (ATELIER_TRACE_KEEP).",
    )
    capture_content: bool = Field(
        default_factory=lambda: _env_flag("ATELIER_TRACE_CONTENT", False),
        description="Record questions, prompts and answers in traces (privacy: off by "
        "default; ATELIER_TRACE_CONTENT=on). `atelier eval drift` lists fallback "
        "questions only when they were recorded.",
    )
    otlp_endpoint: str | None = Field(
        default_factory=lambda: os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or None,
        description="Also export over OTLP/HTTP to this collector "
        "(OTEL_EXPORTER_OTLP_ENDPOINT; /v1/traces is appended).",
    )


# -- the per-request record: timings and model calls, with tracing on or off ------------------------------


@dataclass
class ModelCall:
    model: str
    seconds: float
    input_tokens: int = 0
    output_tokens: int = 0


@dataclass
class RequestRecord:
    """What one request spent, by kind (milliseconds), and its model calls: for the answer and the metrics."""

    timings_ms: dict[str, float] = field(default_factory=lambda: dict.fromkeys(KINDS, 0.0))
    model_calls: list[ModelCall] = field(default_factory=list)
    fallback: bool = False

    def rounded(self) -> dict[str, float]:
        return {k: round(v, 2) for k, v in self.timings_ms.items()}


_record: ContextVar[RequestRecord | None] = ContextVar("atelier_request_record", default=None)


def current_record() -> RequestRecord | None:
    return _record.get()


# -- the provider ----------------------------------------------------------------------------------------


@dataclass
class _State:
    tracer: Any = None  # None: tracing off
    provider: Any = None
    capture: bool = False
    key: tuple | None = None


_state = _State()
_lock = threading.Lock()


def store_path(home: Path | None = None) -> Path:
    from atelier.home import HOME_ENV

    return Path(home or os.environ.get(HOME_ENV) or ".atelier").expanduser() / STORE_FILE


def setup(config: TracingConfig | None = None) -> None:
    """Trace this process's requests as `config` says (default: from the environment). Idempotent: the provider
    is replaced only when the config or ATELIER_HOME changed (tests move the home)."""
    config = config or TracingConfig()
    key = (config.model_dump_json(), str(store_path().resolve()) if config.store else None)
    with _lock:
        if _state.key == key or (_state.key and _state.key[0] == "use"):  # an explicit `use` wins (tests)
            return
        _shutdown_locked()
        _state.key, _state.capture = key, config.capture_content
        if not config.enabled:
            return
        exporters = []
        if config.store:
            from atelier.trace_store import SqliteSpanExporter

            exporters.append(SqliteSpanExporter(store_path(), keep=config.keep_traces))
        if config.otlp_endpoint:
            exporters.append(_otlp_exporter(config.otlp_endpoint))
        if exporters:
            _install_locked(_provider(exporters), config.capture_content, key)


def _otlp_exporter(endpoint: str):
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    from atelier.redact import redact_url

    url = endpoint.rstrip("/")
    url = url if url.endswith("/v1/traces") else url + "/v1/traces"
    log.info("exporting traces over OTLP/HTTP to %s", redact_url(url))
    return OTLPSpanExporter(endpoint=url, timeout=5)


def _provider(exporters: list, batch: bool = True):
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    from atelier import __version__

    provider = TracerProvider(resource=Resource.create({"service.name": "atelier", "service.version": __version__}))
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter))
    return provider


def use(exporters: list, *, capture_content: bool = False, batch: bool = False) -> Any:
    """Trace into these exporters (tests: the SDK's InMemorySpanExporter; `batch=False` exports as spans end).
    Returns the provider; `shutdown()` undoes it."""
    provider = _provider(exporters, batch=batch)
    with _lock:
        _shutdown_locked()
        _install_locked(provider, capture_content, ("use", id(provider)))
    return provider


def _install_locked(provider: Any, capture: bool, key: tuple) -> None:
    from atelier import __version__

    _state.provider, _state.tracer = provider, provider.get_tracer("atelier", __version__)
    _state.capture, _state.key = capture, key


def _shutdown_locked() -> None:
    provider, _state.provider, _state.tracer, _state.key = _state.provider, None, None, None
    if provider is not None:
        try:
            provider.shutdown()  # flushes what is still queued
        except Exception as exc:
            log.warning("trace export failed at shutdown: %s", exc)


def shutdown() -> None:
    """Flush and stop tracing (at exit; tests)."""
    with _lock:
        _shutdown_locked()


def flush(timeout_ms: int = 5000) -> None:
    """Export what is queued now (the CLI before it exits; tests before reading the store)."""
    provider = _state.provider
    if provider is not None:
        provider.force_flush(timeout_ms)


def pause(paused: bool = True) -> None:
    """Stop (or resume) tracing new spans, keeping the provider and its exporters (a bench interleaves on and off)."""
    with _lock:
        provider = _state.provider
        if provider is not None:
            from atelier import __version__

            _state.tracer = None if paused else provider.get_tracer("atelier", __version__)


def enabled() -> bool:
    return _state.tracer is not None


def capture_content() -> bool:
    return _state.tracer is not None and _state.capture


# -- spans -----------------------------------------------------------------------------------------------


class Span:
    """A span to annotate; with tracing off every method does nothing."""

    __slots__ = ("_span",)

    def __init__(self, span: Any = None):
        self._span = span

    @property
    def recording(self) -> bool:
        return self._span is not None

    def set(self, key: str, value: Any) -> None:
        if self._span is not None and value is not None:
            self._span.set_attribute(key, value)

    def update(self, attributes: dict[str, Any]) -> None:
        if self._span is not None:
            self._span.set_attributes({k: v for k, v in attributes.items() if v is not None})

    def content(self, key: str, value: Any) -> None:
        """Set a content attribute (a prompt, an answer) only when content capture is on; credentials removed."""
        if self._span is not None and _state.capture and value is not None:
            text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
            self._span.set_attribute(key, clean(text))

    def error(self, exc: BaseException) -> None:
        if self._span is not None:
            from opentelemetry.trace import Status, StatusCode

            self._span.set_status(Status(StatusCode.ERROR, type(exc).__name__))


_OFF = Span()


@contextmanager
def span(
    name: str, kind: str | None = None, attributes: dict[str, Any] | None = None, span_kind: str = "INTERNAL"
) -> Iterator[Span]:
    """A child span of the current one; `kind` adds its wall time to the request's timings."""
    started = time.perf_counter()
    tracer = _state.tracer
    try:
        if tracer is None:
            yield _OFF
        else:
            yield from _traced(tracer, name, attributes, span_kind)
    finally:
        record = _record.get() if kind else None
        if record is not None:
            record.timings_ms[kind] = record.timings_ms.get(kind, 0.0) + (time.perf_counter() - started) * 1000


def _traced(tracer: Any, name: str, attributes: dict[str, Any] | None, span_kind: str) -> Iterator[Span]:
    """start_span + attach, by hand: what start_as_current_span does, without its two generator frames."""
    from opentelemetry import context, trace

    attrs = {k: v for k, v in attributes.items() if v is not None} if attributes else None
    otel_span = tracer.start_span(name, kind=trace.SpanKind[span_kind], attributes=attrs)
    token = context.attach(trace.set_span_in_context(otel_span))
    try:
        yield Span(otel_span)
    except BaseException as exc:
        if isinstance(exc, Exception):
            otel_span.record_exception(exc)
            otel_span.set_status(trace.Status(trace.StatusCode.ERROR, type(exc).__name__))
        raise
    finally:
        context.detach(token)
        otel_span.end()


@contextmanager
def request(
    name: str, attributes: dict[str, Any] | None = None, span_kind: str = "INTERNAL"
) -> Iterator[tuple[Span, RequestRecord]]:
    """The span of one request and its record. Nested (the orchestrator inside an API request), it is a child
    span and shares the outer request's record."""
    outer = _record.get()
    record = outer or RequestRecord()
    token = _record.set(record) if outer is None else None
    try:
        with span(name, attributes=attributes, span_kind=span_kind) as s:
            yield s, record
    finally:
        if token is not None:
            _record.reset(token)


@contextmanager
def model_call(
    model: str, operation: str = "chat", provider: str | None = None, attributes: dict[str, Any] | None = None
) -> Iterator[Span]:
    """A model call's span, `{operation} {model}` (a CLIENT span as the GenAI conventions say), timed as "model".
    Set its usage with `usage(span, model, input_tokens, output_tokens)`."""
    provider = provider or (model.split(":", 1)[0] if ":" in model else "atelier")
    started = time.perf_counter()
    with span(
        f"{operation} {model}",
        kind="model",
        span_kind="CLIENT",
        attributes={OPERATION: operation, PROVIDER: provider, REQUEST_MODEL: model, **(attributes or {})},
    ) as s:
        call = ModelCall(model, 0.0)
        s_call = _CallSpan(s, call)
        try:
            yield s_call
        finally:
            call.seconds = time.perf_counter() - started
            record = _record.get()
            if record is not None:
                record.model_calls.append(call)


class _CallSpan(Span):
    __slots__ = ("call",)

    def __init__(self, inner: Span, call: ModelCall):
        super().__init__(inner._span)
        self.call = call

    def usage(self, input_tokens: int | None, output_tokens: int | None, response_model: str | None = None) -> None:
        self.call.input_tokens, self.call.output_tokens = int(input_tokens or 0), int(output_tokens or 0)
        self.update(
            {
                INPUT_TOKENS: self.call.input_tokens,
                OUTPUT_TOKENS: self.call.output_tokens,
                RESPONSE_MODEL: response_model or self.call.model,
            }
        )


_SECRETS = re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=-]{8,}|\b(sk-|hf_|ghp_|xox[bp]-)[A-Za-z0-9_-]{8,}")


def clean(text: str) -> str:
    """`text` without credentials: URL user:password (atelier.redact.scrub), bearer tokens and API-key shapes."""
    return _SECRETS.sub(lambda m: (m.group(1) or m.group(2)) + "[redacted]", scrub(text))
