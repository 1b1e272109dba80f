import numpy as np
import pytest

from atelier.errors import AtelierError
from retrieval.embeddings import EmbeddingConfig, Encoder, resolve_model


def test_default_model_comes_from_the_package_offline(encoder):
    path, local = resolve_model("all-MiniLM-L6-v2")
    assert local and path.endswith("model")
    vectors = encoder.encode(["mechanical seal leakage", "seal leaking", "quarterly revenue report"])
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.2


def test_a_model_by_local_path_loads(encoder):
    path, _ = resolve_model("sentence-transformers/all-MiniLM-L6-v2")
    by_path = Encoder(EmbeddingConfig(model=path))
    assert np.allclose(by_path.encode(["pump"]), encoder.encode(["pump"]), atol=1e-5)


def test_unreachable_hub_model_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(AtelierError, match="could not load embedding model 'no-such-org/no-such-model'"):
        Encoder(EmbeddingConfig(model="no-such-org/no-such-model"))
