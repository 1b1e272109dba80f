"""The orchestrator model through the one model-server layer, its bounds, and router-only mode.

`--model llamacpp:smollm2-135m` (or `llamacpp:PATH.gguf`) starts llama.cpp in-process;
`ollama:qwen2.5:7b` and `openai:MODEL` reach their servers (see `atelier.servers`). The chat
model itself comes from LangChain's `init_chat_model`. When no model is configured, or the
configured one does not answer, Atelier runs in router-only mode: the route's own output is
the answer. It says so once per process.

A weak model must not cost the user anything, so generation is bounded and watched: a short
default `max_tokens` for the answer, the template's end-of-turn markers as stop sequences, a
time limit, and `looping()` that ends an answer repeating itself (`bounded_stream`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import Field

from atelier.errors import AtelierError
from atelier.servers import ServerConfig, chat_model, endpoint, probe

log = logging.getLogger(__name__)
_warned: set[str] = set()


class ModelConfig(ServerConfig):
    """The orchestrator model: where it is served, and the bounds of every answer it writes."""

    name: str | None = Field(None, description="Orchestrator chat model as provider:model (llamacpp:smollm2-135m, "
                             "llamacpp:PATH.gguf, ollama:qwen2.5:7b, openai:gpt-4o-mini); none: router-only mode.")
    temperature: float = Field(0.2, ge=0, le=2, description="Sampling temperature of the orchestrator.")
    max_tokens: int = Field(256, ge=1, description="Longest answer the orchestrator writes, in tokens.")
    time_limit_s: float = Field(30.0, gt=0, description="Seconds an answer may take before it is cut off.")
    repeat_penalty: float = Field(1.15, ge=1.0, le=2.0, description="Repetition penalty sent to llama.cpp and "
                                  "Ollama (1: none).")


@dataclass
class OrchestratorModel:
    """A chat model with what the graph needs to know about it."""

    chat: Any  # a LangChain chat model
    name: str  # provider:model
    tools: bool = True  # its template supports tool calls; otherwise routing asks for JSON-schema output
    stop: tuple[str, ...] = ()
    max_tokens: int = 256
    time_limit_s: float = 30.0


def load_chat_model(config: ModelConfig) -> OrchestratorModel | None:
    """The orchestrator model, or None for router-only mode (announced once)."""
    if not config.name:
        _say_once("router-only", "no orchestrator model configured (--model provider:model): router-only mode, "
                  "each route's own output is the answer")
        return None
    ep = endpoint(config)
    problem = None if ep.embedded else probe(ep)
    if problem:
        _say_once(config.name, f"orchestrator model {config.name} unavailable: {problem}; router-only mode "
                  f"(start the server, e.g. `ollama serve` and `ollama pull {ep.model}`, fix the URL, or use "
                  "--model llamacpp:smollm2-135m)")
        return None
    settings: dict[str, Any] = {"temperature": config.temperature, "max_tokens": config.max_tokens}
    if ep.embedded:
        settings["extra_body"] = {"repeat_penalty": config.repeat_penalty}
    elif ep.wire == "ollama":
        settings["repeat_penalty"] = config.repeat_penalty
    if ep.stop:
        settings["stop"] = list(ep.stop)
    # the time limit also bounds the wait for the first token (a long prefill on a busy CPU): the client
    # gives up then, and the route's output is the answer; no retry re-sends a request that timed out
    bounded = config.model_copy(update={"timeout_s": min(config.timeout_s, config.time_limit_s), "max_retries": 0})
    return OrchestratorModel(chat_model(ep, bounded, **settings), ep.name, ep.tools, ep.stop, config.max_tokens,
                             config.time_limit_s)


def looping(text: str, *, min_period: int = 8, max_period: int = 200, copies: int = 3) -> bool:
    """True when `text` ends in `copies` back-to-back copies of one stretch (a model stuck in a loop)."""
    text = text.rstrip()
    for period in range(min_period, min(max_period, len(text) // copies) + 1):
        tail = text[-period:]
        if text.endswith(tail * copies):
            return True
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return len(lines) >= copies and len(set(lines[-copies:])) == 1 and len(lines[-1]) >= 4


@dataclass
class Bounded:
    text: str
    finish: str  # "stop" | "length" | "loop" | "time" | "error"
    input_tokens: int = 0  # as the server reported them (0: it did not)
    output_tokens: int = 0


def bounded_stream(chunks: Iterable[Any], *, time_limit_s: float, clock: Callable[[], float] = time.monotonic,
                   check_every: int = 8) -> Bounded:
    """Collect a streamed answer, ending it on a loop or past the time limit."""
    start, parts, finish = clock(), [], "stop"
    usage = [0, 0]
    iterator = iter(chunks)
    try:
        for i, chunk in enumerate(iterator, start=1):
            parts.append(chunk.text if hasattr(chunk, "text") else str(chunk))
            counted = getattr(chunk, "usage_metadata", None)
            if counted:  # a chunk's usage is a delta (usually all on the last chunk)
                usage[0] += counted.get("input_tokens", 0)
                usage[1] += counted.get("output_tokens", 0)
            meta = getattr(chunk, "response_metadata", None) or {}
            if meta.get("finish_reason") == "length" or meta.get("done_reason") == "length":
                finish = "length"
            if clock() - start > time_limit_s:
                finish = "time"
                break
            if i % check_every == 0 and looping("".join(parts)):
                finish = "loop"
                break
    except AtelierError:
        raise
    except Exception as exc:
        log.warning("the orchestrator model failed mid-answer (%s: %s); keeping what it wrote",
                    type(exc).__name__, exc)
        finish = "error"
    finally:
        close = getattr(iterator, "close", None)
        if close:
            close()  # ends the HTTP stream when the answer was cut short
    return Bounded("".join(parts), finish, *usage)


def _say_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message)
