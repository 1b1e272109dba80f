"""Route exemplars from specialists, tools and the search index; the router cache refits only on change."""

import time
from dataclasses import dataclass, field

import numpy as np
import pytest

from agents.router import RouterConfig
from agents.routes import (
    DIRECT,
    SEARCH,
    SEARCH_PHRASES,
    RouterCache,
    RoutesConfig,
    ToolSpec,
    collect_routes,
)
from retrieval.chunking import ChunkConfig
from retrieval.config import embedded_path
from retrieval.documents import Document
from retrieval.embedded import EmbeddedIndex
from retrieval.indexer import index_documents
from retrieval.types import IndexSummary
from specialists.registry import Registry, SpecialistRecord

PUMP_EXEMPLARS = ["How do I bleed air out of the pump?", "What torque for the impeller nut?",
                  "Why does the mechanical seal leak?", "How often should the pump bearings be greased?"]
DOCS = [
    Document("hr.md", "Holiday policy", "# Holiday policy\n\nStaff get 25 days of paid leave a year.\n\n"
             "## Carrying over leave\n\nUp to five unused days move to the next year.", "hr.md"),
    Document("expenses.md", "Travel expenses", "# Travel expenses\n\nKeep every receipt.\n\n"
             "## Mileage claims\n\nClaim 45 pence per mile for business trips by car.", "expenses.md"),
]


@dataclass
class Tool:
    name: str
    description: str
    examples: list[str] = field(default_factory=list)


CALCULATOR = Tool("calculator", "Evaluate arithmetic expressions and percentages.",
                  ["what is 15% of 240", "compute 1234 * 56", "divide 7 by 3"])
CLOCK = Tool("clock", "Tell the current date and time in a time zone.", ["what time is it in Tokyo", "today's date"])


def _record(name="pumps", version=1, exemplars=PUMP_EXEMPLARS):
    return SpecialistRecord(name=name, version=version, description="Specialist in pump, impeller, mechanical seal",
                            base_model="tiny", route_exemplars=exemplars, created_at="2026-01-01T00:00:00+00:00")


def _adapter(folder):
    from safetensors.numpy import save_file

    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text('{"r": 4}')
    save_file({"lora_A": np.ones((16, 32), dtype=np.float32)}, str(folder / "adapter_model.safetensors"))
    return folder


def _index(encoder, docs, keep_open=False):
    store = EmbeddedIndex(embedded_path("docs"), dim=encoder.dim, model_name="all-MiniLM-L6-v2")
    index_documents(docs, store, encoder.encode, chunking=ChunkConfig(), model="all-MiniLM-L6-v2", root="/docs")
    if keep_open:
        return store
    store.close()


def test_collect_routes_from_records_tools_and_index():
    assert isinstance(CALCULATOR, ToolSpec)
    summary = IndexSummary(["Holiday policy"], ["# Holiday policy\nText.\n## Carrying over leave\nMore text."])
    routes = collect_routes([_record()], [CALCULATOR], summary, RoutesConfig(search_keywords=0))
    assert set(routes) == {"specialist:pumps", "tool:calculator", SEARCH, DIRECT}
    assert routes["specialist:pumps"] == [*PUMP_EXEMPLARS, "Specialist in pump, impeller, mechanical seal"]
    assert routes["tool:calculator"][0] == CALCULATOR.description
    assert routes[SEARCH] == ["Holiday policy", "Carrying over leave", *SEARCH_PHRASES]  # title = first heading: once
    assert collect_routes([], [], None, RoutesConfig(direct_exemplars=[])) == {}


def test_the_backend_summary_gives_titles_and_headings(encoder):
    store = _index(encoder, DOCS, keep_open=True)
    summary = store.summary(max_titles=10, max_chars=10_000)
    store.close()
    assert summary.titles == ["Travel expenses", "Holiday policy"]  # by doc_id
    exemplars = collect_routes([], [], summary, RoutesConfig())[SEARCH]
    assert {"Holiday policy", "Carrying over leave", "Mileage claims"} <= set(exemplars)


def test_router_cache_refits_only_when_the_fingerprint_changes(encoder, tmp_path, atelier_home):
    registry = Registry()
    adapter = _adapter(tmp_path / "adapter")
    registry.register("pumps", base_model="tiny", eval_report={"beats_base": True}, adapter_dir=adapter,
                      keywords=["pump", "impeller"], route_exemplars=PUMP_EXEMPLARS)
    store = _index(encoder, DOCS, keep_open=True)  # the backend the orchestrator opened
    config = RoutesConfig(router=RouterConfig(cv_folds=3))
    cache = RouterCache(config, index=store, registry=registry, encoder=encoder)

    router = cache.get([CALCULATOR])
    assert cache.refits == 1
    assert set(router.routes) == {"specialist:pumps", "tool:calculator", SEARCH, DIRECT}
    assert router.route("what is 20% of 80").route == "tool:calculator"
    assert router.route("how many days of paid leave do I get").route == SEARCH
    assert router.route("the impeller nut came loose, what torque?").route == "specialist:pumps"
    assert cache.get([CALCULATOR]) is router and cache.refits == 1  # nothing changed: same router

    restarted = RouterCache(config, index=store, tools=[CALCULATOR], registry=registry,
                            encoder=encoder)  # a server restarting
    decision = restarted.route("what is 20% of 80")  # the graph's Router protocol
    assert restarted.refits == 0 and restarted.get().routes == router.routes
    vector = encoder.encode_query("what is 20% of 80")
    assert decision.candidates == router.route_vector(vector).candidates
    started = time.perf_counter()
    restarted.get()
    assert time.perf_counter() - started < 0.5  # checking the fingerprint is cheap: no refit, no embedding

    registry.register("pumps", base_model="tiny", eval_report={"beats_base": True}, adapter_dir=adapter,
                      route_exemplars=[*PUMP_EXEMPLARS, "How do I align the pump shaft?"])
    cache.get([CALCULATOR])
    assert cache.refits == 2  # a new specialist version

    cache.get([CALCULATOR, CLOCK])
    assert cache.refits == 3 and "tool:clock" in cache.get([CALCULATOR, CLOCK]).routes  # a new tool

    _index(encoder, [Document("it.md", "Laptop setup", "# Laptop setup\n\nInstall the VPN client first.", "it.md")])
    refitted = cache.get([CALCULATOR, CLOCK])  # written by another connection (another process: `atelier index`)
    assert cache.refits == 4 and "Laptop setup" in refitted.embeddings_by_text()  # the index moved on
    assert refitted.metadata["specialists"]["pumps"][0] == 2  # [version, record mtime, size]
    assert refitted.metadata["index_fingerprint"] == store.fingerprint()
    assert (atelier_home / "router" / "router.json").is_file()
    store.close()


def test_a_damaged_saved_router_is_refitted(encoder, atelier_home):
    config = RoutesConfig()
    cache = RouterCache(config, registry=Registry(), encoder=encoder)
    with pytest.raises(Exception, match="at least two routes"):
        cache.get()  # only the direct route: nothing to choose between
    cache.get([CALCULATOR])
    (atelier_home / "router" / "router.npz").write_bytes(b"broken")
    again = RouterCache(config, registry=Registry(), encoder=encoder)
    assert set(again.get([CALCULATOR]).routes) == {"tool:calculator", DIRECT} and again.refits == 1
