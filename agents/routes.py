"""The product's routes and their exemplars, and a cache that refits the router only when they change.

Routes and where their exemplars come from:

* `specialist:<name>`: the registry record's route exemplars (sample training instructions)
  and its one-line description;
* `tool:<name>`: the tool's description and examples (any object with `name`,
  `description` and `examples`);
* `search`: the indexed documents' titles, the markdown headings found in their chunks and
  the corpus's top domain keywords, plus a few phrasings of "look it up in the documents";
* `direct`: small talk and general requests the orchestrator model answers itself. It also
  gives the router a contrast class, so one specialist alone does not win every request.

`RouterCache.get()` fingerprints what the routes are built from (registry versions, the
search backend's own fingerprint, the tools, the config) and returns the fitted router for that
fingerprint: from memory, else from `ATELIER_HOME/router/`, else by refitting (reusing the
embeddings of exemplars it already had). Checking the fingerprint stats a few small files and
asks the backend one cheap question (its `fingerprint()`; its `summary()` only when refitting),
so `RouterCache.route(text)` can check on every request and a new specialist is routable at once.
The backend is the one the orchestrator searches with, embedded or Elasticsearch alike.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol, TypeVar, runtime_checkable

from pydantic import Field, model_validator

from agents.router import RouteDecision, RouterConfig, SemanticRouter
from atelier.config import StrictModel, retire_key
from atelier.errors import AtelierError
from atelier.home import atelier_home
from retrieval.types import IndexSummary, SearchBackend
from specialists.registry import Registry, SpecialistRecord

log = logging.getLogger(__name__)
_T = TypeVar("_T")

SEARCH, DIRECT = "search", "direct"
CACHE_FORMAT = 3

# Small talk and writing help: nothing a tool, the documents or a specialist covers (no arithmetic,
# dates or look-ups here, or the direct route would compete with the tools for them).
DIRECT_EXEMPLARS = [
    "hello", "hi there, how are you?", "thanks, that helps", "who are you?", "what can you do?",
    "good morning", "tell me a joke", "write a short poem about autumn", "translate this sentence into French",
    "summarise the text I pasted above", "rephrase my last message more politely", "explain recursion to a beginner",
    "help me write an email to my team", "give me three ideas for a team lunch",
]
SEARCH_PHRASES = [
    "search the documents for", "find the section that explains", "where in the documentation does it say",
    "look this up in our manuals", "which document describes", "show me the passage about",
]
_HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(.+?)[ \t#]*$", re.MULTILINE)


@runtime_checkable
class ToolSpec(Protocol):
    """What the router needs from a tool: its name, what it does, and example requests."""

    name: str
    description: str
    examples: list[str]


class RoutesConfig(StrictModel):
    """Which routes the orchestrator's router knows, and how their exemplars are gathered."""

    router: RouterConfig = Field(default_factory=RouterConfig, description="The semantic router fitted on the routes.")
    search_exemplars: int = Field(300, ge=1, description="At most this many titles, headings and keywords for the search route.")
    search_keywords: int = Field(40, ge=0, description="Top domain keywords of the indexed chunks added to the search route (needs wordfreq).")
    keyword_chars: int = Field(2_000_000, ge=1, description="Characters of chunk text read from the index for headings and keywords (bounds refit time).")
    direct_exemplars: list[str] = Field(default_factory=lambda: list(DIRECT_EXEMPLARS), description="Requests the orchestrator model answers itself; empty: no direct route.")

    @model_validator(mode="before")
    @classmethod
    def _drop_index(cls, data: Any) -> Any:
        """`routes.index` (older configs) never took effect: the orchestrator always replaced it with its own index."""
        return retire_key(data, "index", "routes.index is ignored and can be deleted: the search route describes "
                          "the index that retrieval.backend and retrieval.index name")


# ----------------------------------------------------------------------------- exemplars


def specialist_routes(records: Iterable[SpecialistRecord]) -> dict[str, list[str]]:
    return {f"specialist:{r.name}": [*r.route_exemplars, r.description] for r in records}


def tool_routes(tools: Iterable[ToolSpec]) -> dict[str, list[str]]:
    return {f"tool:{t.name}": [t.description, *t.examples] for t in tools}


def search_exemplars(summary: IndexSummary, config: RoutesConfig) -> list[str]:
    """Titles, markdown headings and domain keywords, interleaved so each kind survives the cap."""
    if not summary.titles and not summary.texts:
        return []
    headings = [h for text in summary.texts for h in _HEADING.findall(text)]
    kinds = [_unique(summary.titles), _unique(headings), _keywords(summary.texts, config)]
    mixed = [item for group in _interleave(kinds) for item in group]
    return _unique(mixed)[: config.search_exemplars] + SEARCH_PHRASES


def _keywords(texts: list[str], config: RoutesConfig) -> list[str]:
    if not config.search_keywords or not texts:
        return []
    try:
        from retrieval.keywords import extract_keywords

        sample, size = [], 0
        for text in texts:
            if size >= config.keyword_chars:
                break
            sample.append(text)
            size += len(text)
        return [k.term for k in extract_keywords(sample, top_k=config.search_keywords)]
    except ImportError as exc:  # wordfreq comes with the `train` extra
        log.info("search route without keywords (%s); install atelier[train] to add them", exc)
        return []


def _interleave(groups: list[list[str]]) -> Iterable[tuple[str, ...]]:
    longest = max((len(g) for g in groups), default=0)
    for i in range(longest):
        yield tuple(g[i] for g in groups if i < len(g))


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(s.strip() for s in items if s and s.strip()))


def collect_routes(records: Iterable[SpecialistRecord], tools: Iterable[ToolSpec], index: IndexSummary | None,
                   config: RoutesConfig) -> dict[str, list[str]]:
    """{route: exemplars} for every route that has at least one exemplar."""
    routes = {**specialist_routes(records), **tool_routes(tools)}
    if index is not None:
        routes[SEARCH] = search_exemplars(index, config)
    routes[DIRECT] = list(config.direct_exemplars)
    return {name: items for name, items in ((n, _unique(i)) for n, i in routes.items()) if items}


# ----------------------------------------------------------------------------- the cache


def registry_versions(registry: Registry) -> dict[str, list[int]]:
    """name -> [active version, its record's mtime and size] of every specialist: `stat`s, no reading.

    A record damaged in place changes the fingerprint, so the routes are rebuilt without it.
    """
    versions = {}
    for name in registry.names():
        try:
            version = registry.current_version(name)
            stat = (registry.root / name / f"v{version}" / "record.json").stat()
        except (AtelierError, OSError):  # reported (once) when the records are read for the routes
            continue
        versions[name] = [version, stat.st_mtime_ns, stat.st_size]
    return versions


def fingerprint(versions: dict[str, list[int]], tools: Sequence[ToolSpec], index: str | None,
                config: RoutesConfig) -> str:
    """Changes whenever anything the routes are built from changes (`index`: the backend's fingerprint)."""
    payload = {"format": CACHE_FORMAT, "specialists": sorted(versions.items()), "index": index,
               "tools": sorted([t.name, t.description, list(t.examples)] for t in tools),
               "config": config.model_dump(mode="json")}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


class RouterCache:
    """The fitted router for the current specialists, tools and index, kept under `ATELIER_HOME/router/`.

    `index` is the opened search backend the search route searches; None: no search route.
    """

    def __init__(self, config: RoutesConfig | None = None, *, index: SearchBackend | None = None,
                 tools: Sequence[ToolSpec] = (), registry: Registry | None = None, encoder=None):
        self.config = config or RoutesConfig()
        self.index = index
        self.tools = list(tools)
        self.registry = registry or Registry()
        self.folder = atelier_home() / "router"
        self.encoder = encoder
        self.refits = 0  # how many times this cache fitted a router (0 after a load from disk)
        self._router: SemanticRouter | None = None
        self._lock = threading.Lock()
        self._warned: set[str] = set()

    def route(self, text: str) -> RouteDecision:
        """Route `text` with the router for the current state (what the graph's `Router` protocol asks)."""
        return self.get().route(text)

    def get(self, tools: Sequence[ToolSpec] | None = None) -> SemanticRouter:
        """The router for the current state: from memory, from disk, or refitted when the fingerprint moved.

        `tools` replaces the tools given at construction (and is kept for later calls).
        """
        if tools is not None:
            self.tools = list(tools)
        tools = self.tools
        versions = registry_versions(self.registry)
        index = self._from_index(lambda backend: backend.fingerprint())
        key = fingerprint(versions, tools, index, self.config)
        with self._lock:
            if self._router is None or self._router.metadata.get("fingerprint") != key:
                self._router = self._load_or_refit(key, tools, versions, index)
            return self._router

    def _load_or_refit(self, key: str, tools: Sequence[ToolSpec], versions: dict[str, list[int]],
                       index: str | None) -> SemanticRouter:
        saved = self._load()
        if saved is not None and saved.metadata.get("fingerprint") == key:
            return saved
        previous = self._router or saved  # its exemplar embeddings are reused when the model is the same
        same_model = previous is not None and previous.config.embedding.model == self.config.router.embedding.model
        summary = None
        if index is not None:
            summary = self._from_index(lambda backend: backend.summary(self.config.search_exemplars,
                                                                       self.config.keyword_chars))
            if summary is None:  # fitted without the search route: saved under "no index", so the next request retries
                index, key = None, fingerprint(versions, tools, None, self.config)
        routes = collect_routes(self.registry.list(), tools, summary, self.config)
        router = SemanticRouter(self.config.router, self.encoder)
        router.fit(routes, known=previous.embeddings_by_text() if same_model else None)
        router.save(self.folder, {"fingerprint": key, "specialists": versions, "index_fingerprint": index,
                                  "tools": sorted(t.name for t in tools)})
        self.refits += 1
        log.info("router refitted on %d routes (%d exemplars)", len(router.routes), router.stats["exemplars"])
        return router

    def _from_index(self, read: Callable[[SearchBackend], _T]) -> _T | None:
        """`read(backend)`; a backend that cannot be read counts as none (no search route), with one warning."""
        if self.index is None:
            return None
        try:
            return read(self.index)
        except AtelierError as exc:
            if str(exc) not in self._warned:
                self._warned.add(str(exc))
                log.warning("search route left out: %s", exc)
            return None

    def _load(self) -> SemanticRouter | None:
        if not (self.folder / "router.json").is_file():
            return None
        try:
            return SemanticRouter.load(self.folder, self.encoder)
        except AtelierError as exc:
            log.warning("ignoring the saved router (%s); refitting", exc)
            return None
