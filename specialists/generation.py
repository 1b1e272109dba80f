"""Generating one answer: request and result types, stop strings, streams and the local decode loop.

Generation is a plain decode loop (KV cache, greedy or seeded top-p sampling) so that stop
sequences, `max_tokens` and per-request seeds behave the same streamed and not streamed: the
non-streamed text is, by construction, the concatenation of the streamed deltas.
"""

from __future__ import annotations

import queue
import random
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any, Literal, Self

from pydantic import Field, field_validator

from atelier.config import StrictModel
from atelier.errors import AtelierError

FinishReason = Literal["stop", "length"]
ROLES = ("system", "user", "assistant", "tool")


# ----------------------------------------------------------------------------- request and result types


class GenerationParams(StrictModel):
    """How to generate one answer. The runtime's `max_tokens_cap` bounds `max_tokens` (OWASP LLM10)."""

    max_tokens: int = Field(256, ge=1, description="Most tokens to generate; the answer ends with "
                            "finish_reason 'length' when it is reached (or when the context is full).")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 = greedy (deterministic); higher = more random.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling: keep the smallest set of tokens whose "
                         "probability reaches top_p (used only when temperature > 0).")
    stop: list[str] = Field(default_factory=list, max_length=8, description="Strings that end the answer; the "
                            "stop string itself is not returned (OpenAI semantics).")
    seed: int | None = Field(None, description="Seed for sampling, so that temperature > 0 is reproducible.")

    @field_validator("stop", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        value = [value] if isinstance(value, str) else (value or [])
        return [s for s in value if s != ""]  # an empty stop string would stop before the first token


class Usage(StrictModel):
    prompt_tokens: int = Field(0, description="Tokens in the rendered prompt.")
    completion_tokens: int = Field(0, description="Tokens generated (counting an end-of-turn token).")


class Generation(StrictModel):
    """One finished answer."""

    text: str
    finish_reason: FinishReason = Field(description="'stop': end of turn or a stop string; 'length': max_tokens "
                                        "or the context was reached.")
    usage: Usage
    specialist: str = Field(description="The specialist (or served model) that answered.")
    version: int | None = Field(None, description="Its registry version (None for a bare served backend).")


# ----------------------------------------------------------------------------- stop strings and streams


class StopFilter:
    """Cuts generated text at the first stop string without ever emitting part of one.

    `push(delta)` returns the text that is safe to emit: a tail that could still grow into a
    stop string is held back until it either completes one (then the text ends before it) or
    cannot any more (then it is released). Text already emitted never contains the start of a
    stop string, so searching only the held-back text is enough.
    """

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def push(self, delta: str) -> str:
        if self.stopped:
            return ""
        self.pending += delta
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending, self.stopped = self.pending[:min(hits)], "", True
            return out
        hold = max((k for s in self.stops for k in range(min(len(s) - 1, len(self.pending)), 0, -1)
                    if self.pending.endswith(s[:k])), default=0)
        out, self.pending = self.pending[:len(self.pending) - hold], self.pending[len(self.pending) - hold:]
        return out

    def flush(self) -> str:
        """The held-back tail, at the end of a generation that did not stop on a stop string."""
        out, self.pending = self.pending, ""
        return out


# A producer generates one answer: it calls emit(delta) for each piece of text, checks
# `cancelled` between tokens, and returns how it finished. Both the local decode loop and the
# served backends are producers, so `generate` and `stream` share one code path.
Emit = Callable[[str], None]
Producer = Callable[[Emit, threading.Event], tuple[FinishReason, Usage]]


def run_to_completion(producer: Producer, specialist: str, version: int | None) -> Generation:
    """Run `producer` in this thread and collect its answer."""
    parts: list[str] = []
    finish, usage = producer(parts.append, threading.Event())
    return Generation(text="".join(parts), finish_reason=finish, usage=usage, specialist=specialist, version=version)


_END = object()


class TokenStream(Iterator[str]):
    """Text deltas of one answer, produced by a worker thread; `.generation` once exhausted.

    Iterate it for the deltas; afterwards `.generation` holds the whole answer with its
    `finish_reason` and `usage`. An error in the worker is raised from the iteration.
    `close()` (or leaving a `with` block, or dropping the stream) cancels the generation
    between two tokens and frees the base model for the next request.
    """

    def __init__(self, producer: Producer, specialist: str, version: int | None):
        self.generation: Generation | None = None
        self._queue: queue.Queue = queue.Queue()
        self._cancelled = threading.Event()
        self._parts: list[str] = []
        weakref.finalize(self, self._cancelled.set)  # an abandoned stream stops its worker
        out, cancelled = self._queue, self._cancelled  # the worker must not keep `self` alive

        def work() -> None:
            try:
                finish, usage = producer(out.put, cancelled)
                out.put((_END, finish, usage))
            except BaseException as exc:
                out.put((_END, exc, None))

        self._label = (specialist, version)
        threading.Thread(target=work, name=f"atelier-stream-{specialist}", daemon=True).start()

    def __next__(self) -> str:
        if self.generation is not None:
            raise StopIteration
        item = self._queue.get()
        if isinstance(item, str):
            self._parts.append(item)
            return item
        _, outcome, usage = item
        if isinstance(outcome, BaseException):
            self.generation = Generation(text="".join(self._parts), finish_reason="stop", usage=Usage(),
                                         specialist=self._label[0], version=self._label[1])
            raise outcome
        self.generation = Generation(text="".join(self._parts), finish_reason=outcome, usage=usage,
                                     specialist=self._label[0], version=self._label[1])
        raise StopIteration

    def close(self) -> None:
        self._cancelled.set()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------- messages and the decode loop


def chat_messages(messages: list[dict]) -> list[dict[str, str]]:
    """Validated {role, content} messages; OpenAI-style content parts are joined into text."""
    if not messages:
        raise AtelierError("no messages to answer; send at least one {'role': 'user', 'content': ...}")
    clean = []
    for i, message in enumerate(messages):
        role, content = (message.get("role"), message.get("content")) if isinstance(message, dict) else (None, None)
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if role not in ROLES or not isinstance(content, str):
            raise AtelierError(f"message {i} must be {{'role': one of {', '.join(ROLES)}, 'content': text}}; "
                               f"got {message!r:.120}")
        clean.append({"role": role, "content": content})
    return clean


def _pick(logits, params: GenerationParams, generator) -> int:
    """The next token: argmax at temperature 0, else top-p sampling with the request's generator."""
    import torch

    if params.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float().cpu() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        sorted_probs[(sorted_probs.cumsum(0) - sorted_probs) >= params.top_p] = 0.0  # keep the nucleus
        return int(order[torch.multinomial(sorted_probs, 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))


def decode(model, tokenizer, prompt_ids: list[int], params: GenerationParams, budget: int,
           emit: Emit, cancelled: threading.Event) -> tuple[FinishReason, Usage]:
    """Generate up to `budget` tokens after `prompt_ids`, emitting text deltas that never hold a stop string.

    Each step decodes all generated ids (so multi-byte characters split across tokens come out
    whole: a trailing U+FFFD is held back) and feeds the new text through a StopFilter.
    """
    import torch

    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
    generator = torch.Generator().manual_seed(params.seed if params.seed is not None else random.getrandbits(63))
    stops, ids, seen, count, finish = StopFilter(params.stop), [], "", 0, "length"
    device = next(model.parameters()).device
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([prompt_ids], device=device), use_cache=True, logits_to_keep=1)
        while count < budget and not cancelled.is_set():
            token = _pick(out.logits[0, -1], params, generator)
            count += 1
            if token in eos_ids:
                finish = "stop"
                break
            ids.append(token)
            text = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False).rstrip("\ufffd")
            if piece := stops.push(text[len(seen):]):
                emit(piece)
            seen = text
            if stops.stopped:
                return "stop", Usage(prompt_tokens=len(prompt_ids), completion_tokens=count)
            if count < budget:
                out = model(input_ids=torch.tensor([[token]], device=device), past_key_values=out.past_key_values,
                            use_cache=True)
    text = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    tail = stops.push(text[len(seen):])
    tail += "" if stops.stopped else stops.flush()
    if tail:
        emit(tail)
    return ("stop" if stops.stopped else finish), Usage(prompt_tokens=len(prompt_ids), completion_tokens=count)
