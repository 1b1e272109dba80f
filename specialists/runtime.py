"""The specialist runtime: many specialists served from one process, each base model loaded once.

A request names a specialist; the runtime reads its active registry record and

* for a LoRA specialist, loads its base model (once, shared by every specialist on that base),
  attaches the adapter with PEFT's multi-adapter API (`load_adapter(adapter_name=...)`) and
  selects it with `set_adapter` for this request only;
* for a full-model specialist (`record.full_model`), loads that model as a base of its own;
* for a specialist with `served_by`, calls the external server (see `specialists/served.py`),
  through the same `generate` / `stream` contract.

Generation is a plain decode loop (KV cache, greedy or seeded top-p sampling) so that stop
sequences, `max_tokens` and per-request seeds behave the same streamed and not streamed: the
non-streamed text is, by construction, the concatenation of the streamed deltas.

Thread safety: one lock per base. Selecting an adapter changes the shared model, so a request
holds its base's lock from adapter selection to its last token; requests on different bases
run in parallel. At most `max_bases` bases stay loaded; asking for another unloads the least
recently used one (after its in-flight request, if any, finishes).

Supply chain (OWASP LLM03): weights load from safetensors only; an adapter folder holding
pickle weights (.bin/.pt/.pth/.pkl/.ckpt) is refused, and the adapter's SHA-256 must match
the one recorded at registration.
"""

from __future__ import annotations

import gc
import logging
import queue
import random
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import Field, field_validator

from atelier.config import StrictModel
from atelier.errors import AtelierError
from specialists.registry import Registry, SpecialistRecord, sha256_file

log = logging.getLogger(__name__)

FinishReason = Literal["stop", "length"]
DEFAULT_MAX_TOKENS_CAP = 4096
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
ROLES = ("system", "user", "assistant", "tool")
# transformers and PEFT build models under process-wide patches (meta-device init), so two
# loads at once in different threads can corrupt each other ("Cannot copy out of meta tensor").
# Loading is serialised; generation is not.
_LOADING = threading.Lock()


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


class LoadedBase(StrictModel):
    """What `SpecialistRuntime.loaded()` reports for one base model in memory."""

    path: str
    device: str
    adapters: dict[str, int] = Field(description="Attached LoRA adapters: specialist name -> version.")
    full_model: dict[str, int] = Field(description="Specialists served by this base itself (no adapter).")
    active_adapter: str | None
    parameter_bytes: int = Field(description="Bytes of parameters and buffers, adapters included.")
    last_used: float = Field(description="time.monotonic() of the last request.")


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
            except BaseException as exc:  # noqa: BLE001 (handed to the consumer, raised there)
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


# ----------------------------------------------------------------------------- local models


def resolve_device(device: str) -> str:
    """"auto" -> cuda, then mps, else cpu; anything else is passed to torch as is."""
    if device != "auto":
        return device
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _dtype_for(device: str):
    """fp32 on CPU (bf16 matmuls ran ~4x slower on this AVX2 machine), bf16/fp16 on CUDA."""
    import torch

    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def check_adapter_files(record: SpecialistRecord) -> Path:
    """The adapter folder of `record`, refused unless it is safetensors matching the registered hash."""
    folder = Path(record.adapter_path or "")
    if not record.adapter_path or not folder.is_dir():
        raise AtelierError(f"specialist {record.name!r} v{record.version} has no adapter folder ({folder}); "
                           "register it again with `atelier specialist add`")
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise AtelierError(f"adapter of {record.name!r} at {folder} holds pickle weights ({', '.join(pickles)}), "
                           "which can run code when loaded; Atelier loads safetensors only. Re-save the adapter "
                           "with save_pretrained(safe_serialization=True), delete the pickle files, register again")
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise AtelierError(f"adapter of {record.name!r} at {folder} has no adapter_model.safetensors; register again")
    if record.adapter_sha256 and sha256_file(weights) != record.adapter_sha256:
        raise AtelierError(f"adapter of {record.name!r} at {weights} does not match the SHA-256 recorded at "
                           "registration (changed or tampered with); register it again")
    return folder


def _load_base(path: str, device: str):
    """(model, tokenizer) for a base folder or a locally cached hub id; safetensors only, no downloads."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(path).exists()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=not local)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=_dtype_for(device), use_safetensors=True,
                                                     local_files_only=not local)
    except (OSError, ValueError) as exc:
        raise AtelierError(f"cannot load base model {path} ({exc}); it must be a local folder (or a cached hub "
                           "model) with config.json, tokenizer and *.safetensors weights") from None
    if not tokenizer.chat_template:
        raise AtelierError(f"the tokenizer of {path} has no chat template; specialists are built on bases with one "
                           "(`atelier specialist add` writes it)")
    return model.to(device).eval(), tokenizer


class _Base:
    """One base model in memory and the adapters attached to it. Call its methods with `lock` held."""

    def __init__(self, path: str, device: str):
        self.path, self.device = path, device
        self.lock = threading.Lock()
        self.model: Any = None
        self.tokenizer: Any = None
        self.peft: Any = None  # the PeftModel wrapping `model` once the first adapter is attached
        self.adapters: dict[str, tuple[str, int]] = {}  # specialist -> (adapter sha256, version)
        self.full_model: dict[str, int] = {}
        self.active: str | None = None
        self.layers: list[Any] = []  # PEFT's LoRA layers in the model, for switching adapters
        self.fast_switch = False
        self.bytes = 0  # parameter bytes, refreshed after every change (read by loaded() without the lock)
        self.users = 0  # requests that reserved this base and have not finished; guarded by the runtime's lock
        self.closed = False
        self.last_used = time.monotonic()

    def ensure_loaded(self) -> None:
        if self.model is None:
            started = time.perf_counter()
            with _LOADING:
                self.model, self.tokenizer = _load_base(self.path, self.device)
            self.bytes = self.parameter_bytes()
            log.info("loaded base %s on %s in %.2f s", self.path, self.device, time.perf_counter() - started)

    def attach(self, record: SpecialistRecord) -> None:
        """Attach `record`'s adapter, replacing an older version's (the registry hash changed)."""
        if self.adapters.get(record.name, (None,))[0] == record.adapter_sha256:
            self.adapters[record.name] = (record.adapter_sha256, record.version)
            return
        folder = check_adapter_files(record)
        if record.name in self.adapters:
            self.detach(record.name)
        try:
            with _LOADING:
                self._load_adapter(folder, record.name)
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            if self.peft is not None and record.name in self.peft.peft_config:  # half-added: take it out again
                self.peft.delete_adapter(record.name)
            raise AtelierError(f"adapter of {record.name!r} at {folder} does not fit base {self.path} ({exc}); "
                               "was it trained on another base? register it with the right --base") from None
        self.peft.eval()
        self.adapters[record.name] = (record.adapter_sha256 or "", record.version)
        self._changed()
        log.info("attached adapter %s v%d to %s", record.name, record.version, self.path)

    def _load_adapter(self, folder: Path, name: str) -> None:
        if self.peft is None:
            from peft import PeftModel

            self.peft = PeftModel.from_pretrained(self.model, str(folder), adapter_name=name, is_trainable=False,
                                                  torch_device=self.device)
        else:
            self.peft.load_adapter(str(folder), adapter_name=name, is_trainable=False, torch_device=self.device)

    def detach(self, name: str) -> None:
        if name in self.adapters:
            self.peft.delete_adapter(name)
            del self.adapters[name]
            self._changed()
        self.full_model.pop(name, None)

    def _changed(self) -> None:
        """After an adapter came or went: note what switching needs, and the new size."""
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper

        modules = list(self.model.modules())
        self.layers = [m for m in modules if isinstance(m, BaseTunerLayer)]
        plain_lora = all(c.peft_type == "LORA" for c in self.peft.peft_config.values())
        self.fast_switch = plain_lora and not any(isinstance(m, AuxiliaryTrainingWrapper) for m in modules)
        self.active = None  # loading or deleting may change PEFT's active adapter: select again before use
        self.bytes = self.parameter_bytes()

    def _switch(self, adapter: str) -> None:
        """Make `adapter` the active one: what `PeftModel.set_adapter(adapter, inference_mode=True)` does.

        PEFT's set_adapter also re-freezes every adapter's weights in every layer, O(adapters x
        layers): 13 ms with 20 adapters on a 6-layer model here, against a 5 ms budget. Ours are
        loaded frozen (is_trainable=False), so for plain LoRA adapters setting the active adapter
        of each LoRA layer is all that is left to do; anything else takes PEFT's own path.
        """
        if not self.fast_switch:
            self.peft.set_adapter(adapter, inference_mode=True)
            return
        self.peft.base_model.active_adapter = adapter
        for layer in self.layers:
            layer._active_adapter = [adapter]  # the attribute BaseTunerLayer.set_adapter assigns

    @contextmanager
    def selected(self, adapter: str | None) -> Iterator[None]:
        """The model answers with `adapter`, or as the bare base when None."""
        if adapter is None:
            with self.peft.disable_adapter() if self.adapters else nullcontext():
                yield
            return
        if self.active != adapter:
            self._switch(adapter)
            self.active = adapter
        yield

    def parameter_bytes(self) -> int:
        tensors = list(self.model.parameters()) + list(self.model.buffers()) if self.model is not None else []
        return sum(t.numel() * t.element_size() for t in tensors)

    def close(self) -> None:
        """Unload (waits for an in-flight request on this base to finish)."""
        with self.lock:
            self.closed = True
            self.model = self.tokenizer = self.peft = None
            self.adapters.clear()
            self.full_model.clear()
        gc.collect()
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()
        log.info("unloaded base %s", self.path)


def _chat_messages(messages: list[dict]) -> list[dict[str, str]]:
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


# ----------------------------------------------------------------------------- the runtime


class SpecialistRuntime:
    """Serve registered specialists: `generate` / `stream` by name, any number of threads.

    registry:       where records come from (default: the one in ATELIER_HOME).
    max_bases:      how many base models stay in memory; the least recently used is unloaded.
    device:         "auto" (cuda, mps, cpu), or a torch device string.
    max_tokens_cap: hard upper bound on GenerationParams.max_tokens (bigger requests are refused).
    served_num_ctx: context window sent to Ollama with every request (it truncates silently otherwise).
    """

    def __init__(self, registry: Registry | None = None, *, max_bases: int = 2, device: str = "auto",
                 max_tokens_cap: int = DEFAULT_MAX_TOKENS_CAP, served_num_ctx: int = 8192):
        if max_bases < 1:
            raise AtelierError(f"max_bases must be at least 1, got {max_bases}")
        self.registry = registry or Registry()
        self.max_bases, self.max_tokens_cap, self.served_num_ctx = max_bases, max_tokens_cap, served_num_ctx
        self.device = resolve_device(device)
        self._lock = threading.Lock()  # guards the dicts below and users counts; never held while loading/generating
        self._room = threading.Condition(self._lock)  # notified when a base becomes idle or goes away
        self._bases: OrderedDict[str, _Base] = OrderedDict()  # least recently used first
        self._served: dict[str, Any] = {}

    # --- the contract

    def generate(self, name: str, messages: list[dict], params: GenerationParams | None = None) -> Generation:
        """The whole answer of specialist `name` to `messages` (OpenAI-style role/content dicts)."""
        record, producer = self._prepare(name, messages, params or GenerationParams())
        return run_to_completion(producer, record.name, record.version)

    def stream(self, name: str, messages: list[dict], params: GenerationParams | None = None) -> TokenStream:
        """The answer as text deltas; `.generation` (finish_reason, usage) once the iteration ends."""
        record, producer = self._prepare(name, messages, params or GenerationParams())
        return TokenStream(producer, record.name, record.version)

    def loaded(self) -> dict[str, LoadedBase]:
        """Base models in memory (path -> what is attached), least recently used first."""
        with self._lock:
            bases = list(self._bases.values())
        return {b.path: LoadedBase(path=b.path, device=b.device,
                                   adapters={n: v for n, (_, v) in b.adapters.copy().items()},
                                   full_model=b.full_model.copy(), active_adapter=b.active,
                                   parameter_bytes=b.bytes, last_used=b.last_used)
                for b in bases if b.model is not None}

    def unload(self, name: str | None = None) -> None:
        """Unload everything (no name), or one specialist: its adapter, and its base if nothing else uses it."""
        with self._lock:
            bases = list(self._bases.values())
        for base in bases:
            if name is None:
                self._drop(base)
            else:
                self._detach(base, name)

    # --- internals

    def _prepare(self, name: str, messages: list[dict], params: GenerationParams) -> tuple[SpecialistRecord, Producer]:
        """Check the request now (errors surface before any streaming starts) and build its producer."""
        if params.max_tokens > self.max_tokens_cap:
            raise AtelierError(f"max_tokens {params.max_tokens} exceeds this runtime's cap of {self.max_tokens_cap}; "
                               "ask for fewer tokens or raise max_tokens_cap")
        record = self.registry.get(name)
        chat = _chat_messages(messages)
        if record.served_by:
            return record, self._served_producer(record, chat, params)
        return record, lambda emit, cancelled: self._local(record, chat, params, emit, cancelled)

    def _served_producer(self, record: SpecialistRecord, chat: list[dict[str, str]],
                         params: GenerationParams) -> Producer:
        from specialists.served import backend_for

        with self._lock:
            backend = self._served.get(record.served_by)
            if backend is None:
                backend = self._served[record.served_by] = backend_for(record.served_by, num_ctx=self.served_num_ctx)
        inner = backend.producer(chat, params)

        def produce(emit: Emit, cancelled: threading.Event) -> tuple[FinishReason, Usage]:
            try:
                return inner(emit, cancelled)
            except AtelierError as exc:
                raise AtelierError(f"specialist {record.name!r} (served_by {record.served_by}): {exc}") from None

        return produce

    def _local(self, record: SpecialistRecord, chat: list[dict[str, str]], params: GenerationParams,
               emit: Emit, cancelled: threading.Event) -> tuple[FinishReason, Usage]:
        with self._using(record) as base:
            prompt = base.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
            prompt_ids = base.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            context = getattr(base.model.config, "max_position_embeddings", None) or 2048
            if len(prompt_ids) >= context:
                raise AtelierError(f"the prompt is {len(prompt_ids)} tokens but {record.name!r} has a context of "
                                   f"{context}; shorten the conversation or the retrieved passages")
            budget = min(params.max_tokens, context - len(prompt_ids))
            return decode(base.model, base.tokenizer, prompt_ids, params, budget, emit, cancelled)

    @contextmanager
    def _using(self, record: SpecialistRecord) -> Iterator[_Base]:
        """`record`'s base, loaded, its adapter attached and selected, with the base's lock held."""
        path = str(Path(record.model_path if record.full_model else record.base_model))
        if record.full_model and not record.model_path:
            raise AtelierError(f"specialist {record.name!r} is a full model without model_path; register it again")
        while True:
            base, evicted, moved = self._reserve(path, record.name)
            try:
                for old in evicted:
                    old.close()
                for old in moved:  # the specialist now lives on another base (a new version changed it)
                    self._detach(old, record.name)
                with base.lock:
                    if base.closed:  # unloaded explicitly between reserving and locking: reserve again
                        continue
                    try:
                        base.ensure_loaded()
                    except BaseException:
                        self._forget(base)
                        raise
                    if record.full_model:
                        base.full_model[record.name] = record.version
                    else:
                        base.attach(record)
                    base.last_used = time.monotonic()
                    with base.selected(None if record.full_model else record.name):
                        yield base
                    return
            finally:
                self._release(base)

    def _reserve(self, path: str, name: str) -> tuple[_Base, list[_Base], list[_Base]]:
        """Reserve the entry for `path` (created, not yet loaded, if new) and mark it most recently used.

        Also returns the bases to unload to make room, and other bases that still hold `name`. Only
        idle bases (no reserved request) are unloaded, least recently used first; when every base
        is busy, this waits for one to become idle, so memory never holds more than max_bases.
        """
        evicted: list[_Base] = []
        with self._room:
            while (base := self._bases.get(path)) is None:
                if len(self._bases) < self.max_bases:
                    base = self._bases[path] = _Base(path, self.device)
                elif idle := next((b for b in self._bases.values() if b.users == 0), None):
                    evicted.append(self._bases.pop(idle.path))
                else:
                    self._room.wait()
            base.users += 1
            self._bases.move_to_end(path)
            moved = [b for b in self._bases.values() if b is not base and (name in b.adapters or name in b.full_model)]
        return base, evicted, moved

    def _release(self, base: _Base) -> None:
        with self._room:
            base.users -= 1
            self._room.notify_all()

    def _detach(self, base: _Base, name: str) -> None:
        """Remove `name` from `base`; unload the base when no specialist and no request uses it any more."""
        with base.lock:
            if base.closed:
                return
            base.detach(name)
            unused = not base.adapters and not base.full_model
        with self._lock:
            unused = unused and base.users == 0
        if unused:
            self._drop(base)

    def _forget(self, base: _Base) -> None:
        with self._room:
            if self._bases.get(base.path) is base:
                del self._bases[base.path]
            self._room.notify_all()
        base.closed = True

    def _drop(self, base: _Base) -> None:
        self._forget(base)
        base.close()
