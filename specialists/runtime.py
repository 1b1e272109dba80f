"""The specialist runtime: many specialists served from one process, each base model loaded once.

A request names a specialist; the runtime reads its active registry record and

* for a LoRA specialist, loads its base model (once, shared by every specialist on that base),
  attaches the adapter with PEFT's multi-adapter API (`load_adapter(adapter_name=...)`) and
  selects it with `set_adapter` for this request only;
* for a full-model specialist (`record.full_model`), loads that model as a base of its own;
* for a specialist with `served_by`, calls its model server (see `specialists/served.py`): llama.cpp
  in this process (`llamacpp:EXPORT_DIR`: base GGUF + GGUF LoRA adapter, the adapter chosen per
  request), Ollama or any OpenAI-compatible server, through the same `generate` / `stream` contract.

Generating one answer (request and result types, stop strings, streams, the decode loop) lives
in `specialists/generation.py`.

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
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from pydantic import Field

from atelier.config import StrictModel
from atelier.errors import AtelierError
from specialists.generation import (
    Emit,
    FinishReason,
    Generation,
    GenerationParams,
    Producer,
    TokenStream,
    Usage,
    chat_messages,
    decode,
    run_to_completion,
)
from specialists.loading import attach_adapter, load_model, load_tokenizer, pick_device
from specialists.registry import Registry, SpecialistRecord, check_adapter_files
from specialists.served import DEFAULT_NUM_CTX, backend_for

log = logging.getLogger(__name__)

# transformers and PEFT build models under process-wide patches (meta-device init), so two
# loads at once in different threads can corrupt each other ("Cannot copy out of meta tensor").
# Loading is serialised; generation is not.
_LOADING = threading.Lock()


# ----------------------------------------------------------------------------- config and results


class RuntimeConfig(StrictModel):
    """How the specialist runtime serves: where models run, how many stay loaded, how long answers may be."""

    device: str = Field("auto", pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$", description="Where local specialists run: "
                        "auto (CUDA, then MPS, else CPU), cpu, cuda, cuda:N or mps.")
    max_bases: int = Field(2, ge=1, description="Base models kept in memory at once; asking for another unloads "
                           "the least recently used one.")
    max_tokens_cap: int = Field(1024, ge=1, le=1_000_000, description="Largest max_tokens one request may ask a "
                                "specialist for; a larger request is refused (the API answers 400).")
    served_num_ctx: int = Field(DEFAULT_NUM_CTX, ge=1, description="Context window of specialists on a model "
                                "server: sent to Ollama with every request (it truncates silently otherwise), and "
                                "the window of an in-process llama.cpp server.")


class LoadedBase(StrictModel):
    """What `SpecialistRuntime.loaded()` reports for one base model in memory."""

    path: str
    device: str
    adapters: dict[str, int] = Field(description="Attached LoRA adapters: specialist name -> version.")
    full_model: dict[str, int] = Field(description="Specialists served by this base itself (no adapter).")
    active_adapter: str | None
    parameter_bytes: int = Field(description="Bytes of parameters and buffers, adapters included.")
    last_used: float = Field(description="time.monotonic() of the last request.")


# ----------------------------------------------------------------------------- local models


def _load_base(path: str, device: str):
    """(model, tokenizer) for a base folder or a locally cached hub id; safetensors only, no downloads."""
    tokenizer = load_tokenizer(path)
    if not tokenizer.chat_template:
        raise AtelierError(f"the tokenizer of {path} has no chat template; specialists are built on bases with one "
                           "(`atelier specialist add` writes it)")
    return load_model(path, device=device, use_safetensors=True), tokenizer


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
        model = self.model if self.peft is None else self.peft
        self.peft = attach_adapter(model, folder, name=name, device=self.device)

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


# ----------------------------------------------------------------------------- the runtime


class SpecialistRuntime:
    """Serve registered specialists: `generate` / `stream` by name, any number of threads.

    registry: where records come from (default: the one in ATELIER_HOME).
    config:   device, loaded bases, the max_tokens cap and the served context window (`RuntimeConfig`).
    """

    def __init__(self, registry: Registry | None = None, config: RuntimeConfig | None = None):
        self.registry = registry or Registry()
        self.config = config or RuntimeConfig()
        self.device = pick_device(self.config.device)
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
        if params.max_tokens > self.config.max_tokens_cap:
            raise AtelierError(f"max_tokens {params.max_tokens} exceeds this runtime's cap of "
                               f"{self.config.max_tokens_cap}; ask for fewer tokens or raise max_tokens_cap")
        record = self.registry.get(name)
        chat = chat_messages(messages)
        if record.served_by:
            return record, self._served_producer(record, chat, params)
        return record, lambda emit, cancelled: self._local(record, chat, params, emit, cancelled)

    def _served_producer(self, record: SpecialistRecord, chat: list[dict[str, str]],
                         params: GenerationParams) -> Producer:
        with self._lock:
            backend = self._served.get(record.served_by)
            if backend is None:
                backend = self._served[record.served_by] = backend_for(record.served_by,
                                                                      num_ctx=self.config.served_num_ctx)
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
                if len(self._bases) < self.config.max_bases:
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
