"""The orchestrator model, named the LangChain way (`provider:model`), and router-only mode.

`ollama:qwen2.5:7b` goes through langchain-ollama with `num_ctx` always sent (Ollama
silently truncates prompts at its small default otherwise); `openai:MODEL` through
langchain-openai against any OpenAI-compatible server (`base_url`, or $OPENAI_BASE_URL).
When no model is configured, or the configured one does not answer, Atelier runs in
router-only mode: the route's own output is the answer. It says so once per process.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import httpx
from pydantic import Field

from atelier.config import StrictModel
from atelier.errors import AtelierError

log = logging.getLogger(__name__)
_warned: set[str] = set()


class ModelConfig(StrictModel):
    name: str | None = Field(None, description="Orchestrator chat model as provider:model (ollama:qwen2.5:7b, "
                             "openai:gpt-4o-mini); none: router-only mode.")
    base_url: str | None = Field(None, description="Server URL; default $OLLAMA_HOST or http://127.0.0.1:11434 "
                                 "for ollama, $OPENAI_BASE_URL or https://api.openai.com/v1 for openai.")
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable with the API key (openai).")
    num_ctx: int = Field(8192, ge=512, description="Ollama context window, always sent.")
    temperature: float = Field(0.2, ge=0, le=2, description="Sampling temperature of the orchestrator.")
    max_tokens: int = Field(1024, ge=1, description="Longest answer the orchestrator writes.")
    timeout_s: float = Field(120.0, gt=0, description="Seconds to wait for the orchestrator.")


def split_name(name: str) -> tuple[str, str]:
    provider, sep, model = name.partition(":")
    if not sep or not model or provider not in ("ollama", "openai"):
        raise AtelierError(f"model {name!r} must be provider:model with provider ollama or openai "
                           "(e.g. ollama:qwen2.5:7b or openai:gpt-4o-mini)")
    return provider, model


def _base_url(provider: str, config: ModelConfig) -> str:
    if config.base_url:
        return config.base_url.rstrip("/")
    if provider == "ollama":
        host = os.environ.get("OLLAMA_HOST", "http://127.0.0.1:11434")
        return (host if host.startswith("http") else f"http://{host}").rstrip("/")
    return os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1").rstrip("/")


def reachable(config: ModelConfig) -> str | None:
    """None when the server answers; otherwise why not (logged where the network is reached)."""
    provider, _ = split_name(config.name)
    url = _base_url(provider, config) + ("/api/tags" if provider == "ollama" else "/models")
    log.info("checking orchestrator model server at %s", url)
    headers = {}
    if provider == "openai" and os.environ.get(config.api_key_env):
        headers["Authorization"] = f"Bearer {os.environ[config.api_key_env]}"
    try:
        response = httpx.get(url, headers=headers, timeout=5.0)
    except httpx.HTTPError as exc:
        return f"{url} not reachable ({type(exc).__name__})"
    return None if response.status_code < 500 else f"{url} answered {response.status_code}"


def load_chat_model(config: ModelConfig) -> Any | None:
    """A LangChain chat model, or None for router-only mode (announced once)."""
    if not config.name:
        _say_once("router-only", "no orchestrator model configured (--model provider:model): router-only mode, "
                  "each route's own output is the answer")
        return None
    provider, model = split_name(config.name)
    problem = reachable(config)
    if problem:
        _say_once(config.name, f"orchestrator model {config.name} unavailable: {problem}; router-only mode "
                  f"(start the server, e.g. `ollama serve` and `ollama pull {model}`, or fix the URL)")
        return None
    if provider == "ollama":
        from langchain_ollama import ChatOllama

        return ChatOllama(model=model, base_url=_base_url(provider, config), num_ctx=config.num_ctx,
                          temperature=config.temperature, num_predict=config.max_tokens)
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(model=model, base_url=_base_url(provider, config), temperature=config.temperature,
                      api_key=os.environ.get(config.api_key_env) or "not-needed", max_tokens=config.max_tokens,
                      timeout=config.timeout_s, max_retries=1)


def _say_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message)
