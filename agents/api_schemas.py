"""Request and response bodies of the HTTP API, in OpenAI's Chat Completions shapes.

Requests ignore unknown fields (extra="ignore"): clients such as LibreChat and Open WebUI send
parameters we do not use, and a strict server would force their users to drop them by hand.
Responses are built as plain dicts (see `agents/api.py`); the models here document them in
the OpenAPI schema.

Every string a request carries is valid Unicode (`Text`: JSON may spell a lone UTF-16 surrogate,
"\\ud800", which no tokenizer or database accepts: 400), and every number has bounds.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

INT64_MAX = 2**63 - 1


def _valid_unicode(value: Any) -> Any:
    """`value` (a string, or lists and dicts of them, walked without recursion) when it holds no lone
    surrogate; ValueError otherwise."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")  # fails exactly on lone surrogates, at C speed
            except UnicodeEncodeError:
                raise ValueError("contains a lone UTF-16 surrogate (such as \\ud800), which is not valid Unicode; "
                                 "send the text as UTF-8 or as surrogate pairs") from None
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return value


Text = Annotated[str, AfterValidator(_valid_unicode)]


class Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ContentPart(Lenient):
    type: str = Field(max_length=64, description="'text' parts are read; other kinds (images) are ignored.")
    text: Text | None = None


class ChatMessage(Lenient):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart] | None = Field(None, description="Text, or OpenAI content parts.")

    _content_is_unicode = field_validator("content")(lambda cls, value: _valid_unicode(value))

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text or "" for p in self.content if p.type == "text")
        return self.content or ""


class StreamOptions(Lenient):
    include_usage: bool = Field(False, description="Send a last chunk with empty choices and the usage.")


class ChatCompletionRequest(Lenient):
    model: Text = Field(max_length=200, description="'atelier' (the orchestrator) or 'specialist/NAME' (one "
                        "specialist directly).")
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1, le=INT64_MAX, description="Most tokens to generate (specialists); "
                                   "capped by the server (orchestrator.runtime.max_tokens_cap).")
    max_completion_tokens: int | None = Field(None, ge=1, le=INT64_MAX, description="Newer name of max_tokens; "
                                              "wins when both are set.")
    temperature: float | None = Field(None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    stop: Annotated[str, Field(max_length=200)] | list[Annotated[str, Field(max_length=200)]] | None = None
    seed: int | None = Field(None, ge=0, le=INT64_MAX, description="Sampling seed, 0 to 2**63 - 1.")
    user: Text | None = Field(None, max_length=255, description="Used as the conversation (thread) id when no "
                              "X-Atelier-Thread header is sent.")
    metadata: Annotated[dict[str, Any], AfterValidator(_valid_unicode)] | None = Field(
        None, description="metadata.thread_id is the last fallback for the thread id.")

    @field_validator("stop")
    @classmethod
    def _at_most_eight(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 8:
            raise ValueError("at most 8 stop strings")
        return _valid_unicode(value)

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class AtelierInfo(BaseModel):
    """Atelier's extra top-level field on completions and on the first and last stream chunks."""

    route: str = Field(description="What answered: search, tool:NAME, specialist:NAME, direct, ...")
    confidence: float
    sources: list[dict[str, Any]] = Field(default_factory=list, description="Passages behind the [n] markers.")
    thread_id: str
    model: str | None = Field(None, description="provider:model that wrote the answer; null in router-only mode.")
    route_output: str = Field("", description="The route's own output (tool result, cited passages, specialist "
                              "answer), unaltered; the answer always contains it.")
    timings: dict[str, float] = Field(default_factory=dict, description="Milliseconds this answer spent on route, "
                                      "search, model and tool (the web chat's timing breakdown).")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: ResponseMessage
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    atelier: AtelierInfo


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "atelier"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class SpecialistInfo(BaseModel):
    name: str
    version: int
    description: str
    base_model: str
    keywords: list[str]
    metrics: dict[str, float] = Field(description="Key evaluation metrics of the final stage (perplexity, "
                                      "mcq_accuracy, ...), empty when not evaluated.")
    beats_base: bool | None = None


class SpecialistList(BaseModel):
    object: Literal["list"] = "list"
    data: list[SpecialistInfo]


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    router_only: bool
    model: str | None = Field(None, description="The orchestrator model as provider:model; null: router-only mode.")
    specialists: int
    index: bool = Field(description="Whether a search index is open (the search route exists).")


class FeedbackRequest(Lenient):
    thread_id: Text | None = Field(None, max_length=255, description="Checked against the completion's thread "
                                   "when given.")
    completion_id: Text = Field(min_length=1, max_length=100, description="The `id` of the rated chat.completion.")
    rating: Literal["up", "down"] = Field(description="up: the answer is good; down: it is not.")
    comment: Text | None = Field(None, max_length=4000)
    correction: Text | None = Field(None, min_length=1, max_length=4000, description="With rating 'down': what "
                                    "the answer should have said (`atelier specialist improve` trains on it).")

    @model_validator(mode="after")
    def _correction_with_down(self) -> FeedbackRequest:
        if self.correction is not None and (self.rating != "down" or not self.correction.strip()):
            raise ValueError("a correction goes with rating 'down' (what the answer should have said) and must "
                             "not be blank; drop `correction` or send rating 'down'")
        return self


class FeedbackItem(BaseModel):
    id: int
    completion_id: str
    thread_id: str
    rating: Literal["up", "down"]
    comment: str | None
    correction: str | None = None
    question: str
    answer: str
    route: str
    specialist_version: int | None = None
    model: str
    created_at: str


class FeedbackList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FeedbackItem]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
