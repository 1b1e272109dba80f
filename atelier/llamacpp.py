"""llama.cpp in-process: the embedded model server behind every `llamacpp:` name.

`llamacpp:smollm2-135m` (a catalogue name, see `atelier.catalog`) or `llamacpp:PATH.gguf` starts
llama.cpp's own C++ server (the `xllamacpp` wheel) inside this process, on 127.0.0.1 and a free
port, the first time it is used; it stops when the process exits. Everything else in Atelier
talks to it as to any OpenAI-compatible server, through the same client.

One server per (GGUF, context, adapters) triple, shared by every caller in the process. LoRA
adapters (GGUF adapter files) are loaded at start with scale 0 and chosen per request with the
request's `lora` field, so one base serves many specialists.
"""

from __future__ import annotations

import atexit
import json
import logging
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from atelier.errors import AtelierError

log = logging.getLogger(__name__)

DEFAULT_N_CTX = 4096


@dataclass(frozen=True)
class TemplateCaps:
    """What the model's chat template offers, as llama.cpp reports it in /props."""

    tools: bool = False
    stop: tuple[str, ...] = ()  # end-of-turn markers worth stopping at (besides EOG tokens)


@dataclass
class EmbeddedServer:
    gguf: Path
    n_ctx: int
    adapters: tuple[Path, ...] = ()
    url: str = ""  # base URL ending in /v1
    caps: TemplateCaps = field(default_factory=TemplateCaps)
    _server: object = None

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            log.info("stopping llama.cpp serving %s", self.gguf.name)
            del server  # xllamacpp stops the server loop in its destructor


_servers: dict[tuple, EmbeddedServer] = {}
_lock = threading.Lock()


def resolve_gguf(model: str) -> Path:
    """The GGUF file a `llamacpp:` model names: a catalogue name or a path to a .gguf file."""
    from atelier.catalog import catalog_gguf, catalog_names, is_catalog_name

    if is_catalog_name(model):
        return catalog_gguf(model)
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise AtelierError(f"GGUF file {path} not found; give an existing .gguf file (llamacpp:PATH.gguf)")
        return path.resolve()
    raise AtelierError(f"llamacpp:{model} is neither a GGUF file nor a known model; use llamacpp:PATH.gguf or one "
                       f"of {', '.join('llamacpp:' + n for n in catalog_names())}")


def embedded_server(model: str, *, n_ctx: int = DEFAULT_N_CTX, adapters: tuple[str | Path, ...] = (),
                    threads: int = 1) -> EmbeddedServer:
    """The running llama.cpp server for `model` (started on first use, on 127.0.0.1)."""
    gguf = resolve_gguf(model)
    adapter_paths = tuple(Path(a).resolve() for a in adapters)
    key = (str(gguf), n_ctx, adapter_paths)
    with _lock:
        server = _servers.get(key)
        if server is None or server._server is None:
            server = _servers[key] = _start(gguf, n_ctx, adapter_paths, threads)
        return server


def _start(gguf: Path, n_ctx: int, adapters: tuple[Path, ...], threads: int, exact: bool = False) -> EmbeddedServer:
    try:
        import xllamacpp
    except ImportError:
        raise AtelierError("the llamacpp: provider needs llama.cpp's server: `pip install xllamacpp` "
                           "(the `serve` extra has it)") from None
    params = xllamacpp.CommonParams()
    params.model.path = str(gguf)
    params.n_ctx = n_ctx
    params.use_jinja = True
    params.cpuparams.n_threads = threads
    params.cpuparams_batch.n_threads = threads
    params.hostnames = ["127.0.0.1"]  # never on a public interface
    params.port = 0  # a free port
    params.verbosity = -1
    if exact:  # a KV cache in f32 rather than f16, for parity checks of f32 files
        params.cache_type_k = params.cache_type_v = xllamacpp.ggml_type.GGML_TYPE_F32
    if adapters:
        infos = []
        for path in adapters:
            info = xllamacpp.CommonAdapterLoraInfo()
            info.path, info.scale = str(path), 0.0
            infos.append(info)
        params.lora_adapters = infos
        params.lora_init_without_apply = True
    log.info("starting llama.cpp on 127.0.0.1 serving %s (n_ctx %d, %d adapters)", gguf, n_ctx, len(adapters))
    try:
        raw = xllamacpp.Server(params)
    except Exception as exc:
        raise AtelierError(f"llama.cpp could not load {gguf} ({exc}); check that it is a GGUF model llama.cpp "
                           "supports (see the server log above)") from None
    address = raw.listening_address.rstrip("/")
    server = EmbeddedServer(gguf, n_ctx, adapters, url=address + "/v1", caps=_caps(address), _server=raw)
    atexit.register(server.stop)
    return server


def _caps(address: str) -> TemplateCaps:
    try:
        with urllib.request.urlopen(address + "/props", timeout=10) as reply:  # 127.0.0.1 only
            props = json.load(reply)
    except (OSError, ValueError):
        return TemplateCaps()
    caps = props.get("chat_template_caps") or {}
    template = props.get("chat_template") or ""
    stops = [t for t in ("<|im_start|>", "<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|endoftext|>")
             if t in template or t == props.get("eos_token")]
    return TemplateCaps(tools=bool(caps.get("supports_tool_calls")), stop=tuple(stops))


@contextmanager
def private_server(gguf: str | Path, *, n_ctx: int = 512, threads: int = 1, exact: bool = True,
                   adapters: tuple[str | Path, ...] = ()) -> Iterator[EmbeddedServer]:
    """A llama.cpp server of its own for one GGUF file (and GGUF LoRA adapters, at scale 0 until a
    request's `lora` field picks them), stopped on leaving (e.g. to check an export)."""
    server = _start(Path(gguf).resolve(), n_ctx, tuple(Path(a).resolve() for a in adapters), threads, exact)
    try:
        yield server
    finally:
        server.stop()
