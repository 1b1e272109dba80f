"""The one model-server layer: every model Atelier talks to is `provider:model`, reached from here.

    llamacpp:smollm2-135m      llama.cpp in this process (see atelier.llamacpp), no server to install
    llamacpp:PATH.gguf         the same for any GGUF file
    ollama:qwen2.5:7b          an Ollama server ($OLLAMA_HOST, default http://127.0.0.1:11434)
    openai:gpt-4o-mini         any OpenAI-compatible server ($OPENAI_BASE_URL, default api.openai.com)

Any name may end in `@URL` (`ollama:pumps@http://gpu-box:11434`, `openai:m@http://host:8000/v1`);
an explicit `base_url` does the same. The model name may itself hold ':' (Ollama tags): only an
'@' followed by http(s):// starts the URL.

What callers get: `parse_model` (the one parser), `ServerConfig` (the one config), `endpoint`
(where a name is served, starting llama.cpp when it is a `llamacpp:` name), `probe` (the one
reachability check, logging the URL with credentials redacted), and the official clients:
`openai_client` (the openai SDK, for llama.cpp too), `ollama_client` and `chat_model`
(LangChain's `init_chat_model`, for the orchestrator graph).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field

from atelier.config import StrictModel
from atelier.errors import AtelierError
from atelier.redact import redact_url

log = logging.getLogger(__name__)

PROVIDERS = ("llamacpp", "ollama", "openai")
OLLAMA_DEFAULT_URL = "http://127.0.0.1:11434"
OPENAI_DEFAULT_URL = "https://api.openai.com/v1"


@dataclass(frozen=True)
class ModelName:
    provider: Literal["llamacpp", "ollama", "openai"]
    model: str
    url: str | None = None  # from an @URL suffix

    def __str__(self) -> str:
        return f"{self.provider}:{self.model}"


def parse_model(name: str, *, what: str = "model") -> ModelName:
    """'ollama:qwen2.5:7b@http://h:11434' -> ModelName('ollama', 'qwen2.5:7b', 'http://h:11434')."""
    provider, _, rest = (name or "").strip().partition(":")
    model, at, url = rest.rpartition("@")
    if not (at and url.startswith(("http://", "https://"))):
        model, url = rest, ""
    if provider not in PROVIDERS or not model:
        raise AtelierError(f"{what} {name!r} must be provider:model with provider {', '.join(PROVIDERS)} "
                           "(e.g. llamacpp:smollm2-135m, llamacpp:PATH.gguf, ollama:qwen2.5:7b, openai:gpt-4o-mini)")
    return ModelName(provider, model, url.rstrip("/") or None)  # type: ignore[arg-type]


def with_scheme(url: str) -> str:
    url = url.strip().rstrip("/")
    return url if url.startswith(("http://", "https://")) else f"http://{url}"


def ollama_host(url: str | None = None) -> str:
    """The Ollama server URL: `url`, else $OLLAMA_HOST (host:port or a URL), else 127.0.0.1:11434."""
    return with_scheme(url or os.environ.get("OLLAMA_HOST") or OLLAMA_DEFAULT_URL)


class ServerConfig(StrictModel):
    """Where a model is served and how to talk to it: the same fields for every provider."""

    name: str | None = Field(None, description="The model as provider:model (llamacpp:smollm2-135m, "
                             "llamacpp:PATH.gguf, ollama:qwen2.5:7b, openai:gpt-4o-mini).")
    base_url: str | None = Field(None, description="Server URL; default $OLLAMA_HOST or http://127.0.0.1:11434 for "
                                 "ollama, $OPENAI_BASE_URL or https://api.openai.com/v1 for openai; llamacpp "
                                 "starts its own on 127.0.0.1.")
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable with the API key (openai).")
    num_ctx: int = Field(4096, ge=512, description="Context window: always sent to Ollama (it truncates silently "
                         "otherwise); the window llama.cpp is started with.")
    timeout_s: float = Field(120.0, gt=0, description="Seconds to wait for one answer.")
    max_retries: int = Field(2, ge=0, description="Retries of a request after a transient error (connection, "
                             "timeout, 429, 5xx), with exponential backoff.")


@dataclass(frozen=True)
class Endpoint:
    """A model at a reachable address: what the clients are built from."""

    name: str  # provider:model as the user wrote it (without @URL)
    wire: Literal["openai", "ollama"]  # the protocol spoken
    model: str  # the model id sent with each request
    base_url: str
    api_key: str | None = None
    tools: bool = True  # the model's template supports tool calls
    stop: tuple[str, ...] = ()  # template end-of-turn markers

    @property
    def embedded(self) -> bool:
        return self.name.startswith("llamacpp:")


def endpoint(config: ServerConfig, *, adapters: tuple = ()) -> Endpoint:
    """Where `config.name` is served; a `llamacpp:` name starts llama.cpp in-process on first use."""
    if not config.name:
        raise AtelierError("no model named; pass provider:model (e.g. --model llamacpp:smollm2-135m)")
    parsed = parse_model(config.name)
    label = str(parsed)
    if parsed.provider == "llamacpp":
        from atelier.llamacpp import embedded_server

        server = embedded_server(parsed.model, n_ctx=config.num_ctx, adapters=adapters)
        return Endpoint(label, "openai", parsed.model, server.url, None, server.caps.tools, server.caps.stop)
    url = config.base_url or parsed.url
    if parsed.provider == "ollama":
        return Endpoint(label, "ollama", parsed.model, ollama_host(url))
    key = os.environ.get(config.api_key_env) or None
    return Endpoint(label, "openai", parsed.model, with_scheme(url or os.environ.get("OPENAI_BASE_URL")
                                                               or OPENAI_DEFAULT_URL), key)


def probe(ep: Endpoint, timeout: float = 5.0) -> str | None:
    """None when the server answers its model list; otherwise why not. Logs the (redacted) URL reached."""
    import httpx

    url = ep.base_url + ("/api/tags" if ep.wire == "ollama" else "/models")
    log.info("checking model server %s at %s", ep.name, redact_url(url))
    headers = {"Authorization": f"Bearer {ep.api_key}"} if ep.api_key else {}
    try:
        response = httpx.get(url, headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        return f"{redact_url(url)} not reachable ({type(exc).__name__})"
    if response.status_code in (401, 403):
        return f"{redact_url(url)} refused the API key (HTTP {response.status_code})"
    return None if response.status_code < 500 else f"{redact_url(url)} answered HTTP {response.status_code}"


def openai_client(ep: Endpoint, *, timeout: float = 120.0, max_retries: int = 2):
    """The official openai SDK client for an OpenAI-compatible endpoint (llama.cpp included)."""
    import openai

    log.info("openai client for %s at %s", ep.name, redact_url(ep.base_url))
    return openai.OpenAI(base_url=ep.base_url, api_key=ep.api_key or "not-needed", timeout=timeout,
                         max_retries=max_retries)


def ollama_client(ep: Endpoint, *, timeout: float = 120.0):
    import ollama

    log.info("ollama client for %s at %s", ep.name, redact_url(ep.base_url))
    return ollama.Client(host=ep.base_url, timeout=timeout)


def chat_model(ep: Endpoint, config: ServerConfig, **settings: Any):
    """A LangChain chat model for the endpoint, through `init_chat_model` (temperature, max_tokens...)."""
    from langchain.chat_models import init_chat_model

    if ep.wire == "ollama":
        max_tokens = settings.pop("max_tokens", None)
        return init_chat_model(ep.model, model_provider="ollama", base_url=ep.base_url, num_ctx=config.num_ctx,
                               num_predict=max_tokens, **settings)
    settings.setdefault("stream_usage", True)  # token counts on the last chunk (for traces and metrics)
    return init_chat_model(ep.model, model_provider="openai", base_url=ep.base_url,
                           api_key=ep.api_key or "not-needed", timeout=config.timeout_s,
                           max_retries=config.max_retries, **settings)
