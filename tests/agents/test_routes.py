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


def test_old_configs_with_routes_index_load_and_say_it_is_ignored(caplog):
    with caplog.at_level("WARNING", logger="agents.routes"):
        config = RoutesConfig.model_validate({"index": "docs", "search_keywords": 5})
    assert config.search_keywords == 5 and "index" not in config.model_dump()
    assert "routes.index is ignored" in caplog.text and "retrieval.index" in caplog.text


def test_a_backend_that_cannot_be_read_costs_the_search_route_with_one_warning(encoder, caplog):
    from retrieval.elastic import ElasticsearchConfig, ElasticsearchIndex
    from retrieval.fusion import FusionConfig
    from tests.fake_elastic import FakeCluster

    cluster = FakeCluster()
    backend = ElasticsearchIndex(ElasticsearchConfig(url=cluster.url, max_retries=0), dim=encoder.dim,
                                 model_name="all-MiniLM-L6-v2", fusion=FusionConfig())
    cluster.backends.append(backend)
    index_documents(DOCS, backend, encoder.encode, chunking=ChunkConfig(), model="all-MiniLM-L6-v2", root="/docs")
    cache = RouterCache(RoutesConfig(router=RouterConfig(cv_folds=3)), index=backend, tools=[CALCULATOR],
                        registry=Registry(), encoder=encoder)
    try:
        assert SEARCH in cache.get().routes
        del cluster.existing["atelier-docs"]  # deleted behind the orchestrator's back
        with caplog.at_level("WARNING", logger="agents.routes"):
            assert set(cache.get().routes) == {"tool:calculator", DIRECT}
            assert cache.route("what is 20% of 80").route == "tool:calculator" and cache.refits == 2
    finally:
        cluster.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "search route left out: Elasticsearch at" in warnings[0]
    assert "index_not_found_exception" in warnings[0]


def test_cli_index_on_elasticsearch_then_ask_routes_to_search(tmp_path, monkeypatch, encoder):
    """`atelier index DIR --backend elasticsearch`, then `atelier ask`, router-only, on the stand-in cluster."""
    import json

    from typer.testing import CliRunner

    from atelier.cli import app
    from tests.fake_elastic import FakeCluster

    folder = tmp_path / "docs"
    folder.mkdir()
    for doc in DOCS:
        (folder / doc.doc_id).write_text(doc.text)
    config = tmp_path / "orchestrator.yaml"
    config.write_text("retrieval: {backend: elasticsearch}\nroutes: {router: {cv_folds: 3}}\n")
    cluster = FakeCluster()
    monkeypatch.setenv("ELASTICSEARCH_URL", cluster.url)
    try:
        runner = CliRunner()
        indexed = runner.invoke(app, ["index", str(folder), "--backend", "elasticsearch", "--quiet"])
        assert indexed.exit_code == 0, indexed.output
        assert "(elasticsearch)" in indexed.stdout and "now 2 documents" in indexed.stdout
        asked = runner.invoke(app, ["ask", "how many days of paid leave do I get", "--json", "--config", str(config)])
        assert asked.exit_code == 0, asked.output
    finally:
        cluster.close()
    answer = json.loads(asked.stdout)
    assert answer["route"] == "search" and answer["model"] is None
    assert "25 days" in answer["answer"] and answer["sources"][0]["doc_id"] == "hr.md"
    assert not list((tmp_path / "home").glob("indexes/*/index.sqlite"))  # no embedded index was involved


def test_an_index_that_cannot_be_opened_is_warned_about_unless_never_built(caplog):
    from agents.orchestrator import open_searcher
    from retrieval.config import RetrievalConfig

    with caplog.at_level("INFO", logger="agents.orchestrator"):
        assert open_searcher(RetrievalConfig()) is None  # never built: no search route, nothing to fix
        embedded_path("default").parent.mkdir(parents=True)
        embedded_path("default").write_bytes(b"\x00garbage" * 512)
        assert open_searcher(RetrievalConfig()) is None
    [never_built, corrupt] = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert never_built[0] == "INFO" and corrupt[0] == "WARNING" and "not a usable index" in corrupt[1]
