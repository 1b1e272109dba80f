"""The systems an exam is put to: local models, search over the documents, served models.

A system is a small contract: `choose(items)` gives each multiple-choice item's option scores
(None when the system exposes no logits), `answer(items)` gives a short greedy answer per
item, and `perplexity(texts)` the perplexity on general text (None when it cannot). Local models
are loaded on first use and released by `close()`, so one run holds one model at a time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from atelier.errors import AtelierError
from eval.exam import ExamItem

Passages = Callable[[ExamItem], list[str]]
SERVED_PREFIXES = ("ollama:", "openai:", "llamacpp:")


class System(Protocol):
    name: str
    kind: str  # "local", "search" or "served"

    def choose(self, items: list[ExamItem]) -> list[list[float]] | None: ...
    def answer(self, items: list[ExamItem]) -> list[str]: ...
    def perplexity(self, texts: list[str]) -> float | None: ...
    def close(self) -> None: ...


@dataclass
class LocalModel:
    """A causal LM on this machine (a base, or a base with the specialist's adapter merged in)."""

    name: str
    model_dir: Path
    adapters: list[Path] = field(default_factory=list)
    config: object = None  # SpecialistEvalConfig
    passages: Passages | None = None  # retrieved passages go into the prompt (specialist+search)
    kind: str = "local"
    _loaded: tuple | None = None

    def _model(self):
        if self._loaded is None:
            from eval.specialist import load_for_eval

            self._loaded = load_for_eval(Path(self.model_dir), self.adapters or None, self.config.device)
        return self._loaded

    def _messages(self, item: ExamItem) -> list[dict[str, str]]:
        return item.messages(self.passages(item) if self.passages else None)

    def choose(self, items: list[ExamItem]) -> list[list[float]]:
        from eval.specialist import choice_scores

        model, tokenizer = self._model()
        return choice_scores(model, tokenizer, [self._messages(i) for i in items], [i.options for i in items],
                             self.config)

    def answer(self, items: list[ExamItem]) -> list[str]:
        from eval.specialist import generate_answers

        model, tokenizer = self._model()
        return generate_answers(model, tokenizer, [self._messages(i) for i in items], self.config,
                                self.config.exam_max_new_tokens)

    def perplexity(self, texts: list[str]) -> float | None:
        from eval.specialist import perplexity

        model, tokenizer = self._model()
        return perplexity(model, tokenizer, texts, self.config).get("perplexity")

    def close(self) -> None:
        self._loaded = None


@dataclass
class SearchSystem:
    """Search alone: the answer is the retrieved passages, as the orchestrator's search route
    returns them when no orchestrator model writes an answer (so "contains" asks: did search
    surface the fact?). No logits, so no multiple choice."""

    passages: Passages
    name: str = "search"
    kind: str = "search"

    def choose(self, items: list[ExamItem]) -> None:
        return None

    def answer(self, items: list[ExamItem]) -> list[str]:
        return ["\n".join(self.passages(i)) for i in items]

    def perplexity(self, texts: list[str]) -> None:
        return None

    def close(self) -> None:
        pass


@dataclass
class ServedModel:
    """A model behind an OpenAI-compatible server (`ollama:`, `openai:`, `llamacpp:`): open QA only."""

    spec: str
    max_tokens: int = 48
    kind: str = "served"

    @property
    def name(self) -> str:
        return self.spec

    def choose(self, items: list[ExamItem]) -> None:
        return None

    def answer(self, items: list[ExamItem]) -> list[str]:
        from eval.served import served_chat

        return [served_chat(self.spec, i.messages(), self.max_tokens) for i in items]

    def perplexity(self, texts: list[str]) -> None:
        return None

    def close(self) -> None:
        pass


class RetrievedPassages:
    """Top-k passages per exam question from an Atelier search index, retrieved once and cached."""

    def __init__(self, searcher, k: int = 3, max_chars: int = 400):
        self.searcher, self.k, self.max_chars, self._cache = searcher, k, max_chars, {}
        self.seconds = 0.0

    def _snippet(self, text: str) -> str:
        text = " ".join(text.split())
        return text if len(text) <= self.max_chars else text[:self.max_chars] + "…"

    def __call__(self, item: ExamItem) -> list[str]:
        if item.id not in self._cache:
            started = time.perf_counter()
            hits = self.searcher.search(item.question, k=self.k)
            self._cache[item.id] = [self._snippet(h.text) for h in hits]
            self.seconds += time.perf_counter() - started
        return self._cache[item.id]

    def close(self) -> None:
        self.searcher.close()


def open_passages(docs: Path | None, index: str | None, k: int, max_chars: int = 400) -> RetrievedPassages:
    """Passages from `docs` (indexed into `eval-<folder>` first; unchanged files are skipped) or from
    an existing index (the configured default when neither is given), each cut to `max_chars`
    as the orchestrator's search route quotes them."""
    import re

    from retrieval.config import RetrievalConfig, Searcher, index_with_progress, open_backend
    from retrieval.documents import load_folder
    from retrieval.embeddings import get_encoder

    if docs is None:
        config = RetrievalConfig(**({"index": index} if index else {}))
        return RetrievedPassages(Searcher.open(config), k, max_chars)
    folder = Path(docs)
    if not folder.is_dir():
        raise AtelierError(f"--docs {folder} is not a folder; pass the documents the specialist was built from")
    name = index or "eval-" + (re.sub(r"[^a-z0-9_.-]+", "-", folder.resolve().name.lower()).strip("-.") or "docs")
    config = RetrievalConfig(index=name)
    encoder = get_encoder(config.embedding)
    store = open_backend(config, dim=encoder.dim)
    index_with_progress(load_folder(folder).documents, store, encoder, config, root=str(folder.resolve()),
                        prune=True, show=False)
    return RetrievedPassages(Searcher(store, encoder, config.embedding), k, max_chars)


def resolve_local(name: str, work_dir: Path) -> Path:
    """A local model folder for `--against NAME` or a specialist's base: through `training.models.resolve_base`
    (catalogue names such as gemma3-270m, .gguf files, Hugging Face folders or ids)."""
    from training.models import resolve_base

    if name.startswith("scratch:"):
        raise AtelierError(f"{name} is built from a specialist's documents and has nothing to compare; "
                           "pass a pretrained base (e.g. smollm2-135m, gemma3-270m) or a model folder")
    return Path(resolve_base(name, work_dir=work_dir, corpus_texts=None, seed=0))
