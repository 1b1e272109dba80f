"""The HTTP API: OpenAI-compatible chat completions in front of the orchestrator and the specialists.

    POST /v1/chat/completions   model "atelier" (the orchestrator) or "specialist/NAME"; stream or not
    GET  /v1/models             those model ids
    GET  /v1/specialists        registered specialists with their key evaluation metrics
    POST /v1/feedback           thumbs up/down on an answer; GET lists them
    GET  /health                liveness, mode, specialists, index
    GET  /metrics               Prometheus metrics (agents/metrics.py); behind the key like /v1

Any OpenAI client works (the official SDK, LangChain's ChatOpenAI, LibreChat, Open WebUI).
What answered travels three ways: `[n]` markers in the text (search answers), the header
X-Atelier-Route, and an extra top-level field "atelier" {route, confidence, sources, thread_id, model, route_output,
timings}
on the completion (and on the first and last stream chunks), which standard clients ignore.

The orchestrator is blocking code, so each request runs in a worker thread that hands its
events to the event loop through an asyncio queue (agents/api_stream.py, with the SSE chunks);
the loop never blocks. A request holds one of `max_concurrency` slots until its worker finishes
(even past its timeout, so abandoned work still counts); when none is free it waits its turn in a
queue of at most `max_queue`, and only past that (or past its deadline) gets 429 with Retry-After.
Each key also has requests and tokens per minute (agents/limits.py).

Keys (agents/auth.py) are checked at start; each names an owner, and threads, exchanges and
ratings belong to the owner that made them: another key gets 404. Nothing leaves with an absolute
server path, and a client-given thread id goes into a header only percent-encoded when it is not
plain ASCII (agents/api_redact.py). /docs and /redoc are off (they load scripts from a CDN);
/openapi.json needs the key like /v1.

Errors use OpenAI's shape {"error": {message, type, param, code}} with honest status codes:
client mistakes are 4xx (the SDK retries 408/409/429/5xx, so those must mean "try again").
`AtelierError`s are 400: they name a fix on the caller's side or the server's, and retrying
without that fix cannot help. Every response carries X-Request-Id; an unexpected exception is
logged under it and answers a bare 500 naming it, never the exception's text.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from agents.api_redact import header_value, public_model_name, public_path
from agents.api_schemas import (
    ChatCompletion,
    ChatCompletionRequest,
    ErrorResponse,
    FeedbackList,
    FeedbackRequest,
    Health,
    ModelList,
    SpecialistList,
)
from agents.api_stream import (
    ApiError,
    Worker,
    atelier_info,
    drain,
    internal_error,
    orchestrator_events,
    specialist_events,
    stream_response,
    usage_of,
)
from agents.api_threads import THREAD_HEADER, claim_thread, thread_of
from agents.auth import ANONYMOUS, KEYS_ENV, ApiKey, load_keys, owner_of
from agents.config import ServeConfig
from agents.limits import Admission, BodyGuard, RateLimits
from agents.metrics import CONTENT_TYPE, Metrics
from agents.orchestrator import Orchestrator
from atelier import tracing
from atelier.errors import AtelierError
from atelier.feedback import FeedbackStore, UnknownCompletion

WEB_DIR = Path(__file__).resolve().parent / "web"
ORCHESTRATOR_MODEL = "atelier"
SPECIALIST_PREFIX = "specialist/"
log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- errors and security


def api_keys(config: ServeConfig) -> list[ApiKey]:
    """Every accepted key (config, ATELIER_API_KEYS, api_keys_file); AtelierError for a bad one."""
    return load_keys(config.api_keys, config.api_keys_file)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(config: ServeConfig) -> list[ApiKey]:
    """The accepted keys; refuse to listen beyond this machine without one."""
    keys = api_keys(config)
    if not is_loopback(config.host) and not keys:
        raise AtelierError(f"refusing to listen on {config.host} without an API key; set {KEYS_ENV}=KEY "
                           "(or api_keys / api_keys_file in the config), or listen on 127.0.0.1")
    return keys


class RequestIds:
    """ASGI middleware: every response carries X-Request-Id; an exception no handler took is logged under that
    id and answers a generic OpenAI-shaped 500 naming it (never the exception's text)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        started = False

        async def send_with_id(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("request %s failed", request_id)
            if started:  # too late for an error response: the connection is closed
                raise
            await internal_error(request_id).response()(scope, receive, send_with_id)


# ----------------------------------------------------------------------------- the app


def create_app(config: ServeConfig | None = None, *, orchestrator: Orchestrator | None = None,
               feedback: FeedbackStore | None = None) -> FastAPI:
    """The API app. Pass an orchestrator to share one (it is then not closed with the app)."""
    config = config or ServeConfig()
    keys = check_exposure(config)
    owned = orchestrator is None
    orchestrator = orchestrator or Orchestrator(config.orchestrator)
    feedback = feedback or FeedbackStore()

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        feedback.close()
        if owned:
            orchestrator.close()

    app = FastAPI(title="Atelier", version="1", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None,
                  description="OpenAI-compatible chat completions over Atelier's orchestrator and specialists.")
    app.state.config, app.state.orchestrator, app.state.feedback = config, orchestrator, feedback
    app.state.started, app.state.keys = now(), keys
    app.state.admission = Admission(config.max_concurrency, config.max_queue, config.retry_after_s)
    per_key = (config.key_requests_per_minute, config.key_tokens_per_minute) if keys else (0, 0)  # no keys: one user
    app.state.limits = RateLimits(*per_key)
    app.state.metrics = Metrics(orchestrator.services.runtime)
    app.add_middleware(BodyGuard, limit=config.max_body_bytes, timeout_s=config.body_timeout_s)
    app.add_middleware(RequestIds)
    _error_handlers(app)
    authenticate = Depends(_authenticator(keys))
    v1 = APIRouter(prefix="/v1", dependencies=[authenticate],
                   responses={400: {"model": ErrorResponse}, 401: {"model": ErrorResponse},
                              429: {"model": ErrorResponse}})
    _routes(v1)
    app.include_router(v1)
    app.add_api_route("/health", _health, methods=["GET"], response_model=Health)
    app.add_api_route("/metrics", _metrics, methods=["GET"], dependencies=[authenticate], include_in_schema=False)
    app.add_api_route("/openapi.json", lambda: JSONResponse(app.openapi()), methods=["GET"],
                      dependencies=[authenticate], include_in_schema=False)
    _web(app)
    return app


def _authenticator(keys: list[ApiKey]):
    def authenticate(request: Request) -> str:
        """The caller's owner name (ANONYMOUS without keys), also at request.state.owner; 401 without a valid key."""
        owner = ANONYMOUS if not keys else owner_of(request.headers.get("authorization", ""), keys)
        if owner is None:
            raise ApiError(401, "missing or invalid API key; send Authorization: Bearer KEY", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        request.state.owner = owner
        return owner

    return authenticate


def _health(request: Request) -> dict:
    orchestrator = request.app.state.orchestrator
    return {"status": "ok", "router_only": orchestrator.router_only, "model": public_model_name(orchestrator.model_name),
            "specialists": len(orchestrator.registry.names()),
            "index": orchestrator.services.searcher is not None}


def _metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        message = "; ".join(f"{_field(e.get('loc', ())) or 'body'}: {e.get('msg')}" for e in errors[:5])
        return ApiError(400, message, param=_field(first.get("loc", ())) or None, code="invalid_value").response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return ApiError(exc.status_code, str(exc.detail), type=kind, headers=exc.headers).response()

    @app.exception_handler(Exception)
    async def crash(request: Request, exc: Exception) -> JSONResponse:  # RequestIds answers first; a fallback
        request_id = getattr(request.state, "request_id", "") or uuid.uuid4().hex
        log.error("request %s failed: %s", request_id, type(exc).__name__)
        return internal_error(request_id).response()


_UNION_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _field(loc: tuple) -> str:
    """A validation error's location as a dotted field path, without "body" and pydantic's union member tags
    ("constrained-str", "list[ContentPart]")."""
    return ".".join(str(p) for p in loc if p != "body" and not (
        isinstance(p, str) and (p in _UNION_TAGS or "[" in p or "-" in p)))


def _web(app: FastAPI) -> None:
    """The browser chat page (agents/web/), when that folder exists."""
    if not WEB_DIR.is_dir():
        return
    from fastapi.staticfiles import StaticFiles

    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")
    if (WEB_DIR / "index.html").is_file():
        app.add_api_route("/", lambda: FileResponse(WEB_DIR / "index.html"), methods=["GET"], include_in_schema=False)


# ----------------------------------------------------------------------------- routes


def now() -> int:
    return int(time.time())


def new_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def _routes(v1: APIRouter) -> None:
    v1.add_api_route("/chat/completions", chat_completions, methods=["POST"], response_model=None,
                     responses={200: {"model": ChatCompletion, "description": "A chat.completion, or with "
                                      "stream: true, text/event-stream of chat.completion.chunk objects."},
                                404: {"model": ErrorResponse}, 413: {"model": ErrorResponse},
                                504: {"model": ErrorResponse}},
                     openapi_extra={"parameters": [{
                         "name": THREAD_HEADER, "in": "header", "required": False, "schema": {"type": "string"},
                         "description": "The conversation to continue (one this key started); its memory is kept by "
                                        "the server."}]})
    v1.add_api_route("/models", list_models, methods=["GET"], response_model=ModelList)
    v1.add_api_route("/specialists", list_specialists, methods=["GET"], response_model=SpecialistList)
    v1.add_api_route("/feedback", add_feedback, methods=["POST"], status_code=201,
                     responses={404: {"model": ErrorResponse}})
    v1.add_api_route("/feedback", list_feedback, methods=["GET"], response_model=FeedbackList)


def _check_limits(body: ChatCompletionRequest, config: ServeConfig) -> None:
    if len(body.messages) > config.max_messages:
        raise ApiError(400, f"{len(body.messages)} messages; at most {config.max_messages} per request "
                       "(start a new thread: the server remembers the conversation)", param="messages")
    for i, message in enumerate(body.messages):
        if len(message.text()) > config.max_message_chars:
            raise ApiError(400, f"message {i} has {len(message.text())} characters; at most "
                           f"{config.max_message_chars}", param=f"messages.{i}.content")
    limit, cap = body.token_limit(), config.orchestrator.runtime.max_tokens_cap
    if limit is not None and limit > cap:
        raise ApiError(400, f"max_tokens {limit} is above this server's cap of {cap}",
                       param="max_tokens", code="max_tokens_too_large")


def _producer(body: ChatCompletionRequest, orchestrator: Orchestrator, thread_id: str
              ) -> tuple[str, Callable[[], Iterator[dict]]]:
    """(question, the event iterator's factory) for the requested model; 404 for an unknown model."""
    if body.model == ORCHESTRATOR_MODEL:
        last = body.messages[-1]
        if last.role != "user" or not last.text().strip():
            raise ApiError(400, "the last message must be a non-empty user message (the question); earlier turns "
                           "come from the thread's memory", param="messages")
        question = last.text()
        return question, lambda: orchestrator_events(orchestrator, question, thread_id)
    name = body.model.removeprefix(SPECIALIST_PREFIX)
    if not body.model.startswith(SPECIALIST_PREFIX) or name not in orchestrator.registry.names():
        raise ApiError(404, f"model {body.model!r} does not exist; use 'atelier' or one of GET /v1/models",
                       param="model", code="model_not_found")
    from specialists.generation import GenerationParams

    params = GenerationParams(**{k: v for k, v in {
        "max_tokens": body.token_limit(), "temperature": body.temperature, "top_p": body.top_p,
        "stop": body.stop, "seed": body.seed}.items() if v is not None})
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    question = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    return question, lambda: specialist_events(orchestrator, name, messages, params, thread_id)


def _recorded(events: Callable[[], Iterator[dict]], state, completion_id: str, model: str, question: str,
              owner: str, thread_id: str, stream: bool, deadline: float) -> Callable[[], Iterator[dict]]:
    """The same events, inside the request's trace (in the worker thread); the finished exchange is written to
    the feedback store, its tokens charged to the key and its route, latency and model calls counted."""
    def produce() -> Iterator[dict]:
        started, route, status = time.perf_counter(), "none", 500
        attributes = {tracing.OPERATION: "invoke_agent" if model == ORCHESTRATOR_MODEL else "chat",
                      tracing.REQUEST_MODEL: model, tracing.CONVERSATION: thread_id, "http.request.method": "POST",
                      "http.route": "/v1/chat/completions", "atelier.stream": stream,
                      "atelier.completion_id": completion_id}
        with tracing.request("POST /v1/chat/completions", attributes, span_kind="SERVER") as (span, record):
            try:
                for event in events():
                    if event["type"] == "done":
                        answer, route, status = event["answer"], event["answer"].route, 200
                        _trace_done(span, event)
                        state.limits.charge(owner, sum(event["usage"]))
                        try:
                            state.feedback.record_exchange(completion_id, answer.thread_id, model, question,
                                                           answer.text, answer.route, owner,
                                                           _answering_version(state, answer.route))
                        except Exception:
                            log.warning("could not record exchange %s", completion_id, exc_info=True)
                    yield event
            except GeneratorExit:  # cut short: past its deadline (the client got 504), or the client left
                status = 504 if time.monotonic() >= deadline else 499
                raise
            except AtelierError as exc:
                status = 400
                span.error(exc)
                raise
            except Exception as exc:
                span.error(exc)
                raise
            finally:
                span.set("http.response.status_code", status)
                state.metrics.request(route, status, time.perf_counter() - started, record)

    return produce


def _answering_version(state, route: str) -> int | None:
    """The active version of the specialist that answered on `route` (None for other routes, or unreadable)."""
    if not route.startswith("specialist:"):
        return None
    try:
        return state.orchestrator.registry.current_version(route.removeprefix("specialist:"))
    except AtelierError:
        return None


def _trace_done(span: tracing.Span, event: dict) -> None:
    """The answer's route and token counts on the request's span: the same figures the response carries."""
    answer, (prompt_tokens, completion_tokens) = event["answer"], event["usage"]
    span.update({tracing.ROUTE: answer.route, tracing.CONFIDENCE: round(float(answer.confidence), 4),
                 tracing.INPUT_TOKENS: prompt_tokens, tracing.OUTPUT_TOKENS: completion_tokens,
                 tracing.RESPONSE_MODEL: getattr(answer, "model", None) or None,
                 tracing.FINISH_REASONS: [event.get("finish_reason") or "stop"]})


def _only_done(events: Callable[[], Iterator[dict]]) -> Callable[[], Iterator[dict]]:
    return lambda: (event for event in events() if event["type"] == "done")


async def chat_completions(body: ChatCompletionRequest, request: Request):
    """Chat completions; model 'atelier' answers the last user message from the thread's memory."""
    try:
        return await _chat_completions(body, request)
    except ApiError as exc:  # refused before its worker ran (a worker's own errors are counted by _recorded)
        if not exc.counted:
            request.app.state.metrics.refused(exc.status, exc.code)
        raise


async def _chat_completions(body: ChatCompletionRequest, request: Request):
    state, owner, request_id = request.app.state, request.state.owner, request.state.request_id
    loop = asyncio.get_running_loop()
    deadline = loop.time() + state.config.request_timeout_s
    _check_limits(body, state.config)
    thread_id, chosen = thread_of(request, body)
    question, events = _producer(body, state.orchestrator, thread_id)
    claim_thread(state, owner, thread_id, chosen)
    state.limits.admit(owner)
    try:
        await state.admission.enter(deadline - loop.time())  # waits its turn; 429 when the queue is full
    except ApiError:
        state.limits.refund(owner)  # refused by the server, not by this key's budget
        raise
    completion_id, created = new_completion_id(), now()
    produce = _recorded(events, state, completion_id, body.model, question, owner, thread_id, bool(body.stream),
                        deadline)
    if not body.stream:  # only the last event crosses threads: each wake-up of the loop costs a GIL hand-over
        produce = _only_done(produce)
    worker = Worker(produce, state.admission.leave, deadline, request_id)
    try:
        if body.stream:
            return await stream_response(worker, body, completion_id, created, thread_id)
        done = None
        async for event in drain(worker):
            done = event
    except BaseException:
        worker.cancelled.set()
        raise
    answer = done["answer"]
    completion = {"id": completion_id, "object": "chat.completion", "created": created, "model": body.model,
                  "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text},
                               "finish_reason": done["finish_reason"]}],
                  "usage": usage_of(done["usage"]), "atelier": atelier_info(answer, thread_id)}
    return JSONResponse(completion, headers={"X-Atelier-Route": header_value(answer.route),
                                             THREAD_HEADER: header_value(thread_id)})


def list_models(request: Request) -> dict:
    registry = request.app.state.orchestrator.registry
    data = [{"id": ORCHESTRATOR_MODEL, "object": "model", "created": request.app.state.started, "owned_by": "atelier"}]
    for record in registry.list():
        data.append({"id": f"{SPECIALIST_PREFIX}{record.name}", "object": "model", "owned_by": "atelier",
                     "created": _timestamp(record.created_at)})
    return {"object": "list", "data": data}


def _timestamp(iso: str) -> int:
    from datetime import datetime

    try:
        return int(datetime.fromisoformat(iso).timestamp())
    except ValueError:
        return 0


def list_specialists(request: Request) -> dict:
    data = []
    for record in request.app.state.orchestrator.registry.list():
        report = record.eval_report
        data.append({"name": record.name, "version": record.version, "description": record.description,
                     "base_model": public_path(record.base_model), "keywords": record.keywords,
                     "metrics": report.final_metrics() if report else {},
                     "beats_base": report.beats_base if report else None})
    return {"object": "list", "data": data}


def add_feedback(body: FeedbackRequest, request: Request) -> dict:
    """Rate an answer (by its completion id): stored with the question and answer for preference training."""
    try:
        feedback_id = request.app.state.feedback.add(body.completion_id, body.rating, body.comment, body.thread_id,
                                                     owner=request.state.owner, correction=body.correction)
    except UnknownCompletion as exc:
        raise ApiError(404, str(exc), param="completion_id", code="completion_not_found") from None
    return {"id": feedback_id, "object": "feedback", "completion_id": body.completion_id, "rating": body.rating}


def list_feedback(request: Request, limit: int = Query(100, ge=1, le=1000)) -> dict:
    return {"object": "list", "data": request.app.state.feedback.list(limit, owner=request.state.owner)}
