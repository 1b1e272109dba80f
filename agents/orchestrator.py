"""The orchestrator, assembled: router, tools, search, specialists and model behind one graph.

`Orchestrator` is what the CLI (and the API) talk to. It builds each service once per
process — the router refits itself when the registry or the index changes — compiles the
graph with a SQLite checkpointer under ATELIER_HOME (conversation memory by thread id),
and answers with `ask` or, event by event, with `stream`.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from langchain_core.messages import AIMessageChunk, HumanMessage

from agents.config import OrchestratorConfig
from agents.graph import Services, build_graph
from agents.llm import load_chat_model
from agents.routes import RouterCache
from agents.tools import load_tools
from atelier import tracing
from atelier.errors import AtelierError
from atelier.home import atelier_home
from atelier.sqlite import connect
from retrieval.config import RetrievalConfig
from specialists.runtime import SpecialistRuntime

log = logging.getLogger(__name__)


@dataclass
class Answer:
    text: str
    route: str
    confidence: float
    sources: list[dict] = field(default_factory=list)
    thread_id: str = "default"
    model: str | None = None  # provider:model that wrote the answer; None in router-only mode
    route_output: str = ""  # the route's own output, always part of `text`
    finish: str = ""  # how the model's answer ended ("stop", "length", "loop", "time", "error"); "" without one
    timings: dict[str, float] = field(default_factory=dict)  # milliseconds spent on route, search, model, tool

    def to_dict(self) -> dict[str, Any]:
        return {"answer": self.text, "route": self.route, "confidence": self.confidence, "sources": self.sources,
                "thread_id": self.thread_id, "model": self.model, "route_output": self.route_output,
                "finish": self.finish, "timings": self.timings}


class Orchestrator:
    def __init__(self, config: OrchestratorConfig | None = None, *, checkpointer: Any = None):
        self.config = config or OrchestratorConfig()
        tracing.setup()  # the local trace store under ATELIER_HOME (and OTLP when configured)
        tools = load_tools(self.config.tools)
        searcher = open_searcher(self.config.retrieval)
        # the router describes the search route from the very backend the route searches
        self.router = RouterCache(self.config.routes, index=searcher.backend if searcher else None, tools=tools)
        from specialists.registry import Registry

        self.registry = Registry()
        model = load_chat_model(self.config.model)
        self.model_name = model.name if model else None
        self.services = Services(
            router=self.router, tools={t.name: t for t in tools},
            runtime=SpecialistRuntime(self.registry, self.config.runtime),
            searcher=searcher, model=model.chat if model else None,
            search_k=self.config.search_k, max_steps=self.config.max_steps,
            specialists=self._specialists(), generation=lambda: self.config.generation,
            model_name=self.model_name, model_tools=model.tools if model else True,
            time_limit_s=self.config.model.time_limit_s, encoder=self._encoder)
        self._db = None
        if checkpointer is None:
            checkpointer = self._sqlite_checkpointer()
        self.checkpointer = checkpointer
        self.graph = build_graph(self.services, checkpointer=checkpointer)

    def _sqlite_checkpointer(self):
        """Memory in ATELIER_HOME/memory.sqlite; a file that cannot be opened costs memory, not the answer."""
        from langgraph.checkpoint.memory import InMemorySaver
        from langgraph.checkpoint.sqlite import SqliteSaver

        path = atelier_home() / "memory.sqlite"
        try:  # synchronous=NORMAL with WAL: durable across a process crash, and a checkpoint costs no fsync
            self._db = connect(path, what="memory", fix="move it aside", autocommit=False,
                               probe="SELECT count(*) FROM sqlite_master")
            saver = SqliteSaver(self._db)
            saver.setup()
            return saver
        except (AtelierError, sqlite3.Error) as exc:
            if self._db is not None:
                self._db.close()
                self._db = None
            log.warning("conversation memory %s cannot be read (%s): answering without memory across requests. "
                        "Move the file aside (or delete it) to start a new memory; `atelier doctor` checks it", path, exc)
            return InMemorySaver()

    def _specialists(self) -> list[str]:
        """Specialists whose active record reads; a broken one is skipped (with one warning), not fatal."""
        return [record.name for record in self.registry.list()]

    def _encoder(self):
        from retrieval.embeddings import get_encoder

        return get_encoder(self.config.routes.router.embedding)

    @property
    def router_only(self) -> bool:
        return self.services.model is None

    def stream(self, question: str, thread_id: str = "default") -> Iterator[dict]:
        """Events of one request: {"type": "route"}, {"type": "token"}*, then {"type": "done", ...}."""
        self.services.specialists = self._specialists()
        config = {"configurable": {"thread_id": thread_id}, "recursion_limit": 4 * self.config.max_steps + 10}
        final: dict = {}
        with tracing.request("invoke_agent atelier", {tracing.OPERATION: "invoke_agent", tracing.AGENT: "atelier",
                                                      tracing.CONVERSATION: thread_id}) as (span, record):
            span.content(tracing.INPUT_MESSAGES, question)
            # durability="exit": one checkpoint per request instead of one per node; a turn cut short by a
            # crash is simply not remembered, and the user asks again
            for mode, payload in self.graph.stream({"messages": [HumanMessage(question)]}, config,
                                                   stream_mode=["custom", "messages", "values"], durability="exit"):
                if mode == "custom":
                    yield payload
                elif mode == "messages":
                    chunk, meta = payload
                    if isinstance(chunk, AIMessageChunk) and chunk.text and meta.get("langgraph_node") in (
                            "respond", "agent"):
                        yield {"type": "token", "text": chunk.text}
                else:
                    final = payload
            answer = Answer(text=final["messages"][-1].text, route=final.get("route", "direct"),
                            confidence=final.get("confidence", 0.0), sources=final.get("sources", []),
                            thread_id=thread_id, model=self.model_name, route_output=final.get("route_output", ""),
                            finish=final.get("finish", ""), timings=record.rounded())
            span.update({tracing.ROUTE: answer.route, tracing.CONFIDENCE: round(float(answer.confidence), 4),
                         tracing.RESPONSE_MODEL: self.model_name, tracing.FALLBACK: record.fallback})
        yield {"type": "done", "answer": answer}

    def ask(self, question: str, thread_id: str = "default") -> Answer:
        for event in self.stream(question, thread_id):
            if event["type"] == "done":
                return event["answer"]
        raise RuntimeError("the graph ended without an answer")

    def reset(self, thread_id: str) -> None:
        """Forget a conversation."""
        self.checkpointer.delete_thread(thread_id)

    def close(self) -> None:
        if self.services.searcher is not None:
            self.services.searcher.close()
        if self._db is not None:
            self._db.close()


def open_searcher(config: RetrievalConfig):
    """The search index, or None when it cannot be opened: no search route then, and a warning unless
    the embedded index was simply never built."""
    from retrieval.config import BackendName, Searcher, embedded_path

    try:
        return Searcher.open(config)
    except AtelierError as exc:
        never_built = config.backend is BackendName.embedded and not embedded_path(config.index).exists()
        (log.info if never_built else log.warning)("search route left out: %s", exc)
        return None
