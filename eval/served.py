"""One chat completion from a served model, through the openai SDK: the single place `eval` reaches a server.

Kept to one small function on purpose: when Atelier's model-server layer (one parser, one server
config, one probe) lands, `served_chat` becomes a call into it. Until then: `openai:MODEL` uses
OPENAI_BASE_URL / OPENAI_API_KEY as the SDK does; `ollama:MODEL` uses OLLAMA_HOST (default
http://127.0.0.1:11434) and its OpenAI-compatible /v1; `llamacpp:MODEL` uses LLAMACPP_BASE_URL
(default http://127.0.0.1:8080/v1, a `llama-server`).
"""

from __future__ import annotations

import logging
import os
from functools import lru_cache

from atelier.errors import AtelierError

log = logging.getLogger(__name__)


def _endpoint(spec: str) -> tuple[str | None, str, str]:
    """(base_url, api_key, model) for a `provider:model` name."""
    provider, _, model = spec.partition(":")
    if not model:
        raise AtelierError(f"{spec!r} names no model; write provider:model, e.g. ollama:qwen2.5:7b")
    if provider == "openai":
        return os.environ.get("OPENAI_BASE_URL"), os.environ.get("OPENAI_API_KEY", ""), model
    if provider == "ollama":
        host = os.environ.get("OLLAMA_HOST", "http://127.0.0.1:11434")
        host = host if "://" in host else f"http://{host}"
        return host.rstrip("/") + "/v1", "ollama", model
    if provider == "llamacpp":
        return os.environ.get("LLAMACPP_BASE_URL", "http://127.0.0.1:8080/v1"), "none", model
    raise AtelierError(f"unknown provider in {spec!r}; use ollama:, openai: or llamacpp:")


@lru_cache(maxsize=8)
def _client(base_url: str | None, api_key: str):
    from openai import OpenAI

    if not api_key:
        raise AtelierError("openai: models need OPENAI_API_KEY (and OPENAI_BASE_URL for a compatible server)")
    return OpenAI(base_url=base_url, api_key=api_key, max_retries=1, timeout=120)


def served_chat(spec: str, messages: list[dict[str, str]], max_tokens: int) -> str:
    """The greedy (temperature 0) answer of the served model `spec` to `messages`."""
    import openai

    base_url, api_key, model = _endpoint(spec)
    log.info("eval: asking %s at %s", model, base_url or "api.openai.com")
    try:
        reply = _client(base_url, api_key).chat.completions.create(
            model=model, messages=messages, max_tokens=max_tokens, temperature=0)
    except openai.APIConnectionError:
        raise AtelierError(f"no model server reachable for {spec} at {base_url}; start it "
                           "(e.g. `ollama serve`) or set the provider's base URL") from None
    except openai.APIStatusError as exc:
        raise AtelierError(f"{spec} refused the request ({exc.status_code}: {exc.message})") from None
    return (reply.choices[0].message.content or "").strip()
