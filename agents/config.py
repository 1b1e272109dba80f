"""The configs of the orchestrator and of `atelier serve`, in a module light enough for the CLI to
read their fields (help, defaults, types) without loading the graph or the web server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from agents.auth import check_plain_key
from agents.llm import ModelConfig
from agents.routes import RoutesConfig
from atelier.config import StrictModel, retire_key
from atelier.errors import AtelierError
from retrieval.config import RetrievalConfig
from specialists.generation import GenerationParams
from specialists.runtime import RuntimeConfig

MOVED = "{old} has moved to orchestrator.runtime.{key}: this config still works, but move the key there"


class OrchestratorConfig(StrictModel):
    """The orchestrator: its chat model, the search index, the routes, and how specialists answer."""

    model: ModelConfig = Field(default_factory=ModelConfig, description="The orchestrator chat model; none: "
                               "router-only mode.")
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig, description="The search index the search "
                                       "route uses.")
    routes: RoutesConfig = Field(default_factory=RoutesConfig, description="Routes and the semantic router fitted "
                                 "on them.")
    tools: list[str] = Field(default_factory=list, description="Extra tools as module:function (entry points in "
                             "group atelier.tools load too).")
    search_k: int = Field(5, ge=1, le=50, description="Passages the search route returns.")
    max_steps: int = Field(4, ge=1, le=20, description="Most tool-calling rounds of the orchestrator model per request.")
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig, description="The specialist runtime: device, "
                                   "loaded bases, the max_tokens cap, the context window of served specialists.")
    generation: GenerationParams = Field(default_factory=lambda: GenerationParams(max_tokens=128),
                                         description="How specialists generate (max_tokens, temperature, stop).")

    @model_validator(mode="before")
    @classmethod
    def _older_runtime_keys(cls, data: Any) -> Any:
        return retire_key(data, "max_bases", MOVED.format(old="orchestrator.max_bases", key="max_bases"), "runtime")


class ServeConfig(StrictModel):
    """`atelier serve`: where to listen, who may call, and the limits every request obeys (OWASP LLM10)."""

    host: str = Field("127.0.0.1", description="Interface to listen on; anything but loopback needs an API key "
                      "(api_keys, api_keys_file or $ATELIER_API_KEYS).")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0: any free port).")
    api_keys: list[str] = Field(default_factory=list, description="Accepted Bearer keys (each at least 16 "
                                "printable ASCII characters), besides those in ATELIER_API_KEYS (comma-separated) "
                                "and api_keys_file; none at all: no authentication (loopback only).")
    api_keys_file: Path | None = Field(None, description="YAML mapping NAME: sha256:HEX of accepted keys, so the "
                                       "server stores no key; `python -m agents.auth NAME` makes a key and its line.")
    orchestrator: OrchestratorConfig = Field(default_factory=OrchestratorConfig, description="The orchestrator "
                                             "behind model 'atelier' (its model, index, routes, specialists).")
    max_body_bytes: int = Field(1_000_000, ge=1024, le=100_000_000, description="Largest request body; bigger "
                                "ones get 413.")
    body_timeout_s: float = Field(30.0, gt=0, le=3600, description="A request body still arriving after this "
                                  "gets 408 and the connection is closed (slow clients cannot hold it).")
    max_messages: int = Field(200, ge=1, le=100_000, description="Most messages in one chat request (400 above).")
    max_message_chars: int = Field(32_000, ge=1, le=10_000_000, description="Longest message content in "
                                   "characters (400 above).")
    max_concurrency: int = Field(4, ge=1, le=1024, description="Requests answered at once; more wait in the queue.")
    max_queue: int = Field(128, ge=0, le=100_000, description="Requests waiting for a free slot, served in order "
                           "(like OLLAMA_MAX_QUEUE); one more gets 429 + Retry-After.")
    retry_after_s: int = Field(1, ge=1, le=3600, description="Seconds sent in Retry-After when the queue is full.")
    key_requests_per_minute: int = Field(600, ge=0, le=1_000_000, description="Chat requests per minute per API "
                                         "key (0: unlimited; none without keys); past it 429 with Retry-After.")
    key_tokens_per_minute: int = Field(200_000, ge=0, le=1_000_000_000, description="Prompt + completion tokens "
                                       "per minute per API key (0: unlimited); past it 429 with Retry-After.")
    request_timeout_s: float = Field(120.0, gt=0, le=86_400, description="A request still unanswered after this "
                                     "(queue wait included) gets 504 (a stream: an error event, then [DONE]).")

    @model_validator(mode="before")
    @classmethod
    def _older_runtime_keys(cls, data: Any) -> Any:
        """`max_tokens_cap` was a serve setting before the runtime's one cap replaced it."""
        if not isinstance(data, dict) or "max_tokens_cap" not in data:
            return data
        orchestrator = {"max_tokens_cap": data["max_tokens_cap"], **dict(data.get("orchestrator") or {})}
        return {**{k: v for k, v in data.items() if k != "max_tokens_cap"}, "orchestrator": retire_key(
            orchestrator, "max_tokens_cap", MOVED.format(old="max_tokens_cap (serve)", key="max_tokens_cap"), "runtime")}

    @field_validator("api_keys")
    @classmethod
    def _keys_are_keys(cls, keys: list[str]) -> list[str]:
        for i, key in enumerate(keys):
            try:
                check_plain_key(key, f"api_keys[{i}]")
            except AtelierError as exc:
                raise ValueError(str(exc)) from None
        return keys
