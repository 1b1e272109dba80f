"""The Elasticsearch backend, driven through the real client against a fake cluster.

`FakeElasticsearch` (tests/fake_elastic.py) is a stdlib HTTP server on 127.0.0.1 that answers
like Elasticsearch and records every request, so the tests check the exact request bodies the
backend sends and how it handles per-item bulk errors, licence refusals and auth failures;
`FakeCluster` also keeps what is written, for the fingerprint and summary the router reads.
`TestLiveCluster` runs the same backend against a real cluster when ELASTICSEARCH_URL is set.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import uuid

import numpy as np
import pytest

from atelier.errors import AtelierError
from atelier.redact import redact_url
from retrieval.elastic import BulkReport, ElasticsearchConfig, ElasticsearchIndex
from retrieval.fusion import FusionConfig, FusionMethod, fuse
from retrieval.types import Chunk, DocumentEntry, Hit, IndexSummary, Mode
from tests.fake_elastic import (
    FakeCluster,
    FakeElasticsearch,
    Request,
    Response,
    bulk_items,
    bulk_response,
    es_error,
    search_response,
)

DIM = 8
MODEL = "test-model"


def unit_vectors(n: int, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def entry(doc_id: str, n_chunks: int, content_hash: str = "h1", root: str = "/docs") -> DocumentEntry:
    chunks = [Chunk(doc_id=doc_id, index=i, text=f"chunk {i} of {doc_id}", start=i * 10, end=i * 10 + 9,
                    title=f"Title {doc_id}", source=f"{doc_id}.md") for i in range(n_chunks)]
    return DocumentEntry(doc_id=doc_id, content_hash=content_hash, title=f"Title {doc_id}", source=f"{doc_id}.md",
                         chunks=chunks, vectors=unit_vectors(n_chunks, seed=sum(map(ord, doc_id))), root=root)


@pytest.fixture
def fake():
    server = FakeElasticsearch()
    yield server
    server.close()


@pytest.fixture
def cluster():
    server = FakeCluster()
    yield server
    server.close()


def make_config(url: str, **overrides) -> ElasticsearchConfig:
    settings = dict(url=url, index="atelier", api_key=None, username=None, password=None, ca_certs=None,
                    max_retries=2, retry_backoff=0.01, request_timeout=5)
    settings.update(overrides)
    return ElasticsearchConfig(**settings)


def open_index(fake: FakeElasticsearch, fusion: FusionConfig | None = None, **overrides) -> ElasticsearchIndex:
    backend = ElasticsearchIndex(make_config(fake.url, **overrides), dim=DIM, model_name=MODEL,
                                 fusion=fusion or FusionConfig(method=FusionMethod.convex))
    fake.backends.append(backend)
    return backend


def searches(fake: FakeElasticsearch) -> list[dict]:
    return [r.body for r in fake.named("POST", "/atelier/_search")]


# -- config -----------------------------------------------------------------------------------


def test_config_reads_environment_at_construction_and_hides_secrets(monkeypatch):
    monkeypatch.setenv("ELASTICSEARCH_URL", "https://es.example.com:9243/")
    monkeypatch.setenv("ELASTICSEARCH_API_KEY", "c2VjcmV0LWtleQ==")
    monkeypatch.setenv("ELASTICSEARCH_PASSWORD", "hunter2")
    config = ElasticsearchConfig()
    assert config.url == "https://es.example.com:9243"
    assert config.api_key.get_secret_value() == "c2VjcmV0LWtleQ=="
    assert "c2VjcmV0LWtleQ==" not in repr(config) and "hunter2" not in repr(config)
    assert "hunter2" not in str(config.model_dump())
    monkeypatch.delenv("ELASTICSEARCH_URL")
    assert ElasticsearchConfig().url == "http://localhost:9200"


def test_config_rejects_bad_url_and_index_name(monkeypatch):
    with pytest.raises(ValueError, match="ELASTICSEARCH_URL"):
        ElasticsearchConfig(url="localhost:9200")
    monkeypatch.setenv("ELASTICSEARCH_URL", "es.local:9200")
    with pytest.raises(ValueError, match="not an http"):
        ElasticsearchConfig()
    with pytest.raises(ValueError, match="lowercase"):
        ElasticsearchConfig(index="My Index")


def test_display_url_drops_credentials():
    assert redact_url("https://elastic:changeme@es.local:9200") == "https://es.local:9200"


# -- opening ----------------------------------------------------------------------------------


def test_open_creates_chunk_and_docs_indices_with_mappings(fake):
    open_index(fake)
    created = {r.path: r.body for r in fake.requests if r.method == "PUT"}
    assert set(created) == {"/atelier", "/atelier-docs"}
    chunks = created["/atelier"]["mappings"]
    assert chunks["_meta"]["model"] == MODEL and chunks["_meta"]["dim"] == DIM
    props = chunks["properties"]
    assert props["vector"] == {"type": "dense_vector", "dims": DIM, "index": True, "similarity": "cosine"}
    assert props["body"]["type"] == "text" and props["title"]["type"] == "text"
    assert props["text"] == {"type": "text", "index": False}
    assert {props[f]["type"] for f in ("doc_id", "chunk_id", "source", "root")} == {"keyword"}
    assert {props[f]["type"] for f in ("start", "end", "chunk_index")} == {"integer"}
    docs = created["/atelier-docs"]["mappings"]["properties"]
    assert docs["content_hash"]["type"] == "keyword" and docs["n_chunks"]["type"] == "integer"


def test_open_reuses_an_index_built_with_the_same_model(fake):
    fake.existing = {"atelier": {"_meta": {"model": MODEL, "dim": DIM}}, "atelier-docs": {}}
    open_index(fake)
    assert [r for r in fake.requests if r.method == "PUT"] == []
    assert len(fake.named("GET", "/atelier/_mapping")) == 1


@pytest.mark.parametrize("meta, needle", [({"model": "other-model", "dim": DIM}, "other-model"),
                                          ({"model": MODEL, "dim": 384}, "384-d"),
                                          ({}, "not created by Atelier")])
def test_open_refuses_an_index_built_with_another_model_or_dim(fake, meta, needle):
    fake.existing = {"atelier": {"_meta": meta}}
    with pytest.raises(AtelierError, match=needle) as caught:
        open_index(fake)
    assert "delete index atelier" in str(caught.value) and "another index name" in str(caught.value)
    assert [r for r in fake.requests if r.method == "PUT"] == []


def test_open_without_dim_takes_it_from_the_index_and_never_creates(fake):
    fake.existing = {"atelier": {"_meta": {"model": MODEL, "dim": 384}}, "atelier-docs": {}}
    config = make_config(fake.url)
    assert ElasticsearchIndex(config, dim=None, model_name=MODEL, fusion=FusionConfig(), create=False).dim == 384
    fake.existing = {}
    with pytest.raises(AtelierError, match="build it first"):
        ElasticsearchIndex(config, dim=DIM, model_name=MODEL, fusion=FusionConfig(), create=False)
    assert [r for r in fake.requests if r.method == "PUT"] == []


def test_authentication_failure_says_which_credentials_to_set(fake):
    fake.on("HEAD", "/atelier", (401, None))
    with pytest.raises(AtelierError, match="401") as caught:
        open_index(fake, api_key="wrong")
    assert "ELASTICSEARCH_API_KEY" in str(caught.value) and fake.url in str(caught.value)
    assert fake.requests[0].headers["authorization"] == "ApiKey wrong"


def test_basic_auth_is_sent_when_no_api_key(fake):
    open_index(fake, username="elastic", password="changeme")
    assert fake.requests[0].headers["authorization"] == "Basic ZWxhc3RpYzpjaGFuZ2VtZQ=="


def test_connection_refused_names_the_url_to_check():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with pytest.raises(AtelierError, match="cannot reach") as caught:
        ElasticsearchIndex(make_config(url, max_retries=0), dim=DIM, model_name=MODEL, fusion=FusionConfig())
    message = str(caught.value)
    assert url in message and "ELASTICSEARCH_URL" in message and "\n" not in message


def test_tls_failure_points_at_the_ca_certificate(fake):
    with pytest.raises(AtelierError, match="ELASTICSEARCH_CA_CERTS") as caught:
        ElasticsearchIndex(make_config(fake.url.replace("http://", "https://"), max_retries=0), dim=DIM,
                           model_name=MODEL, fusion=FusionConfig())
    assert "[SSL: WRONG_VERSION_NUMBER]" in str(caught.value) and "TlsError" not in str(caught.value)


def test_missing_ca_certificate_file_is_reported():
    with pytest.raises(AtelierError, match="ELASTICSEARCH_CA_CERTS"):
        ElasticsearchIndex(make_config("https://127.0.0.1:9", ca_certs="/nonexistent/ca.pem"),
                           dim=DIM, model_name=MODEL, fusion=FusionConfig())


# -- writing ----------------------------------------------------------------------------------


def test_upsert_writes_chunks_by_id_removes_stale_then_records_documents_last(fake):
    index = open_index(fake)
    fake.requests.clear()
    doc = entry("a", 2, content_hash="hash-a")
    index.upsert([doc])
    steps = [(r.method, r.path) for r in fake.requests]
    assert steps == [("PUT", "/_bulk"), ("POST", "/atelier/_delete_by_query"), ("PUT", "/_bulk"),
                     ("POST", "/atelier,atelier-docs/_refresh"), ("PUT", "/atelier-docs/_mapping")]
    chunk_items = bulk_items(fake.requests[0])
    assert [(op, item_id) for op, item_id, _ in chunk_items] == [("index", "a#0"), ("index", "a#1")]
    assert fake.requests[0].body[0]["index"]["_index"] == "atelier"
    source = chunk_items[1][2]
    assert source["body"] == doc.chunks[1].search_text() and source["text"] == "chunk 1 of a"
    assert np.allclose(source["vector"], doc.vectors[1], atol=1e-6)
    assert (source["chunk_index"], source["start"], source["end"], source["root"]) == (1, 10, 19, "/docs")
    stale = fake.requests[1].body["query"]["bool"]["should"][0]["bool"]["filter"]
    assert stale == [{"term": {"doc_id": "a"}}, {"range": {"chunk_index": {"gte": 2}}}]
    [(op, item_id, record)] = bulk_items(fake.requests[2])
    assert fake.requests[2].body[0]["index"]["_index"] == "atelier-docs"
    assert (item_id, record["content_hash"], record["n_chunks"], record["root"]) == ("a", "hash-a", 2, "/docs")


def test_bulk_accounts_for_every_item_and_retries_only_429(fake):
    index = open_index(fake)
    fake.requests.clear()
    rejected = (400, {"type": "mapper_parsing_exception", "reason": "failed to parse field [vector]"})
    busy = (429, {"type": "es_rejected_execution_exception", "reason": "queue full"})
    fake.on("PUT", "/_bulk", lambda r: bulk_response(r, {"a#1": busy, "b#0": rejected}), bulk_response)
    with pytest.raises(AtelierError) as caught:
        index.upsert([entry("a", 2), entry("b", 1)])
    message = str(caught.value)
    assert "1 of" in message and "b#0" in message and "mapper_parsing_exception" in message
    bulks = [bulk_items(r) for r in fake.named("PUT", "/_bulk")]
    assert [item_id for _, item_id, _ in bulks[0]] == ["a#0", "a#1", "b#0"]
    assert [item_id for _, item_id, _ in bulks[1]] == ["a#1"]  # the 429 item alone is retried
    assert [item_id for _, item_id, _ in bulks[2]] == ["a"]  # b failed: no document record
    assert len(bulks) == 3
    stale = fake.named("POST", "/atelier/_delete_by_query")[0].body["query"]["bool"]["should"]
    assert [clause["bool"]["filter"][0]["term"]["doc_id"] for clause in stale] == ["a"]
    assert fake.named("POST", "/atelier,atelier-docs/_refresh"), "what did land must be visible"


def test_bulk_report_counts_successes_and_failures(fake):
    index = open_index(fake)
    bad = (400, {"type": "mapper_parsing_exception", "reason": "bad"})
    busy = (429, {"type": "es_rejected_execution_exception", "reason": "busy"})
    fake.on("PUT", "/_bulk", lambda r: bulk_response(r, {"x#1": bad, "x#2": busy}),
            lambda r: bulk_response(r, {"x#2": busy}))
    actions = [{"_index": "atelier", "_id": f"x#{i}", "_source": {"doc_id": "x"}} for i in range(4)]
    report = index._bulk(actions)
    assert isinstance(report, BulkReport)
    assert report.succeeded == 2 and report.failed == 2
    assert report.failed_ids == {"x#1", "x#2"}
    reasons = {item_id: (status, reason) for item_id, status, reason in report.failures}
    assert reasons["x#1"] == (400, "mapper_parsing_exception: bad")
    assert reasons["x#2"][0] == 429  # still busy after max_retries=2
    assert len(fake.named("PUT", "/_bulk")) == 3  # first try + 2 retries of x#2


def test_delete_removes_chunks_then_records_and_counts_present(fake):
    index = open_index(fake)
    fake.requests.clear()
    fake.on("POST", "/atelier-docs/_delete_by_query", (200, {"deleted": 1, "failures": []}))
    assert index.delete(["a", "gone", "a"]) == 1
    paths = [r.path for r in fake.named("POST", "/_delete_by_query")]
    assert paths == ["/atelier/_delete_by_query", "/atelier-docs/_delete_by_query"]
    assert fake.requests[0].body["query"] == {"terms": {"doc_id": ["a", "gone"]}}
    assert fake.requests[0].query["refresh"] == ["true"]


def test_document_hashes_pages_through_records_of_a_root(fake):
    index = open_index(fake)
    fake.requests.clear()
    page = [{"_id": f"d{i:04d}", "_source": {"doc_id": f"d{i:04d}", "content_hash": f"h{i}"}, "sort": [f"d{i:04d}"]}
            for i in range(1000)]
    last = [{"_id": "z", "_source": {"doc_id": "z", "content_hash": "hz"}, "sort": ["z"]}]
    fake.on("POST", "/atelier-docs/_search", (200, {"hits": {"hits": page}}), (200, {"hits": {"hits": last}}))
    hashes = index.document_hashes(root="/docs")
    assert len(hashes) == 1001 and hashes["d0007"] == "h7" and hashes["z"] == "hz"
    first, second = (r.body for r in fake.named("POST", "/atelier-docs/_search"))
    assert first["query"] == {"term": {"root": "/docs"}} and "search_after" not in first
    assert second["search_after"] == ["d0999"]


def test_stats_counts_and_hides_credentials(fake):
    fake.on("POST", "/atelier-docs/_count", (200, {"count": 3}))
    fake.on("POST", "/atelier/_count", (200, {"count": 7}))
    url = fake.url.replace("http://", "http://elastic:s3cret@")
    index = ElasticsearchIndex(make_config(url), dim=DIM, model_name=MODEL, fusion=FusionConfig())
    fake.backends.append(index)
    stats = index.stats()
    assert (stats["documents"], stats["chunks"], stats["dim"], stats["model"]) == (3, 7, DIM, MODEL)
    assert stats["backend"] == "elasticsearch" and stats["index"] == "atelier"
    assert "s3cret" not in json.dumps(stats) and stats["url"] == fake.url


# -- searching --------------------------------------------------------------------------------


def test_bm25_search_is_a_match_on_body(fake):
    index = open_index(fake)
    fake.on("POST", "/atelier/_search", (200, search_response([("a#0", 7.5), ("b#2", 3.0)])))
    hits = index.search("reset the router", k=5, mode=Mode.bm25)
    [body] = searches(fake)
    assert body["query"] == {"match": {"body": {"query": "reset the router"}}}
    assert body["size"] == 5 and body["_source"] == {"excludes": ["vector"]} and "knn" not in body
    assert [(h.chunk_id, h.rank, h.score, h.scores) for h in hits] == [("a#0", 1, 7.5, {"bm25": 7.5}),
                                                                     ("b#2", 2, 3.0, {"bm25": 3.0})]
    assert (hits[1].doc_id, hits[1].text, hits[1].source, hits[1].start) == ("b", "text of b#2", "b.md", 10)


def test_dense_search_is_a_top_level_knn_and_reports_cosine(fake):
    index = open_index(fake, num_candidates=50)
    fake.on("POST", "/atelier/_search", (200, search_response([("a#0", 0.95), ("c#1", 0.75)])))
    vector = unit_vectors(1, seed=3)[0]
    hits = index.search("ignored", k=3, mode=Mode.dense, query_vector=vector)
    [body] = searches(fake)
    knn = body["knn"]
    assert (knn["field"], knn["k"], knn["num_candidates"]) == ("vector", 3, 50)
    assert np.allclose(knn["query_vector"], vector, atol=1e-6) and "query" not in body
    assert [h.chunk_id for h in hits] == ["a#0", "c#1"]
    assert hits[0].scores["dense"] == pytest.approx(0.9) and hits[1].score == pytest.approx(0.5)


@pytest.mark.parametrize("mode", [Mode.dense, Mode.hybrid])
def test_vector_modes_need_a_query_vector(fake, mode):
    index = open_index(fake)
    with pytest.raises(ValueError, match="query_vector"):
        index.search("q", mode=mode)
    with pytest.raises(ValueError, match="dimensions"):
        index.search("q", mode=mode, query_vector=np.ones(DIM + 1, dtype=np.float32))


def test_hybrid_rrf_uses_the_server_retriever(fake):
    index = open_index(fake, fusion=FusionConfig(method=FusionMethod.rrf, rrf_k=42, candidates=30))
    fake.on("POST", "/atelier/_search", (200, search_response([("b#0", 0.032), ("a#0", 0.016)])))
    hits = index.search("router", k=4, query_vector=unit_vectors(1)[0])
    [body] = searches(fake)
    rrf = body["retriever"]["rrf"]
    assert (rrf["rank_constant"], rrf["rank_window_size"], body["size"]) == (42, 30, 4)
    standard, knn = rrf["retrievers"]
    assert standard == {"standard": {"query": {"match": {"body": {"query": "router"}}}}}
    assert (knn["knn"]["field"], knn["knn"]["k"]) == ("vector", 30)
    assert [(h.chunk_id, h.rank, h.score) for h in hits] == [("b#0", 1, 0.032), ("a#0", 2, 0.016)]


def test_hybrid_rrf_tolerates_a_null_fused_score(fake):
    index = open_index(fake, fusion=FusionConfig(method=FusionMethod.rrf, rrf_k=10))
    fake.on("POST", "/atelier/_search", (200, search_response([("b#0", None), ("a#0", None)])))
    hits = index.search("router", k=4, query_vector=unit_vectors(1)[0])
    assert [(h.chunk_id, h.rank) for h in hits] == [("b#0", 1), ("a#0", 2)]
    assert [h.score for h in hits] == pytest.approx([1 / 11, 1 / 12])


def _legs(request: Request) -> Response:
    """bm25 and dense legs with different rankings, told apart by their request bodies."""
    if "knn" in request.body:  # dense scores are (1 + cos) / 2: cos 0.9 and 0.5
        return 200, search_response([("b#0", 0.95), ("c#0", 0.75)])
    return 200, search_response([("a#0", 10.0), ("b#0", 5.0)])


LICENCE_403 = es_error(403, "security_exception", "current license is non-compliant for [Reciprocal Rank Fusion (RRF)]",
                       **{"license.expired.feature": "Reciprocal Rank Fusion (RRF)"})
UNKNOWN_400 = es_error(400, "parsing_exception", "Unknown key for a START_OBJECT in [retriever].")


@pytest.mark.parametrize("refusal", [LICENCE_403, UNKNOWN_400], ids=["licence-403", "old-version-400"])
def test_rrf_refusal_falls_back_to_client_side_fusion_once(fake, caplog, refusal):
    fusion = FusionConfig(method=FusionMethod.rrf, rrf_k=60, candidates=20)
    index = open_index(fake, fusion=fusion)
    fake.on("POST", "/atelier/_search", lambda r: refusal if "retriever" in r.body else _legs(r))
    vector = unit_vectors(1)[0]
    with caplog.at_level(logging.WARNING, logger="retrieval.elastic"):
        hits = index.search("router", k=3, query_vector=vector)
        again = index.search("router", k=3, query_vector=vector)
    bodies = searches(fake)
    assert ["retriever" in b for b in bodies] == [True, False, False, False, False]
    assert [b["size"] for b in bodies[1:]] == [20, 20, 20, 20]
    expected = fuse([("a#0", 10.0), ("b#0", 5.0)], [("b#0", 0.9), ("c#0", 0.5)], fusion)
    assert [(h.chunk_id, h.score) for h in hits] == [(key, pytest.approx(score)) for key, score in expected]
    assert hits[0].chunk_id == "b#0" and hits[0].scores == {"bm25": 5.0, "dense": pytest.approx(0.9)}
    assert [h.chunk_id for h in again] == [h.chunk_id for h in hits]
    assert len([r for r in caplog.records if "rrf" in r.getMessage()]) == 1


def test_other_search_errors_are_not_mistaken_for_a_licence_refusal(fake):
    index = open_index(fake, fusion=FusionConfig(method=FusionMethod.rrf))
    fake.on("POST", "/atelier/_search",
            es_error(403, "security_exception", "action [indices:data/read/search] is unauthorized for user [bob]"))
    with pytest.raises(AtelierError, match="privileges on atelier and atelier-docs"):
        index.search("q", query_vector=unit_vectors(1)[0])
    assert len(searches(fake)) == 1


def test_convex_hybrid_fuses_both_legs_client_side(fake):
    index = open_index(fake, fusion=FusionConfig(method=FusionMethod.convex, alpha=0.5, candidates=25))
    fake.on("POST", "/atelier/_search", _legs)
    hits = index.search("router", k=10, query_vector=unit_vectors(1)[0])
    bodies = searches(fake)
    assert len(bodies) == 2 and not any("retriever" in b for b in bodies)
    assert bodies[0]["query"] == {"match": {"body": {"query": "router"}}} and bodies[1]["knn"]["k"] == 25
    # bm25 normalised by its best: a 1.0, b 0.5; cosine min-max: b 1.0, c 0.0
    assert all(isinstance(h, Hit) for h in hits)
    assert [(h.chunk_id, h.rank) for h in hits] == [("b#0", 1), ("a#0", 2), ("c#0", 3)]
    assert [h.score for h in hits] == pytest.approx([0.75, 0.5, 0.0])
    assert hits[1].scores == {"bm25": 10.0} and hits[2].scores == {"dense": pytest.approx(0.5)}
    assert set(hits[0].to_dict()) == {"doc_id", "chunk_id", "title", "source", "text", "start", "end", "score", "rank",
                                      "scores"}
    assert (hits[0].doc_id, hits[0].title, hits[0].end) == ("b", "Title b", 20)


# -- what the router reads ----------------------------------------------------------------------


def test_fingerprint_is_one_small_request_that_moves_with_every_write(cluster):
    index = open_index(cluster)
    before = index.fingerprint()
    assert before.startswith(f"elasticsearch:{cluster.url}/atelier@")
    assert open_index(cluster, index="other").fingerprint() != before  # two indexes never share one
    cluster.requests.clear()
    assert index.fingerprint() == before
    assert [(r.method, r.path) for r in cluster.requests] == [("GET", "/atelier-docs/_mapping")]
    seen = {before}
    index.upsert([entry("a", 2)])
    seen.add(index.fingerprint())
    open_index(cluster).upsert([entry("b", 1)])  # another writer (another process) moves it too
    seen.add(index.fingerprint())
    index.delete(["b"])
    seen.add(index.fingerprint())
    assert len(seen) == 4


def test_a_partly_failed_upsert_still_moves_the_fingerprint(cluster):
    index = open_index(cluster)
    before = index.fingerprint()
    rejected = (400, {"type": "mapper_parsing_exception", "reason": "bad"})
    cluster.on("PUT", "/_bulk", lambda r: bulk_response(r, {"b#0": rejected}))
    with pytest.raises(AtelierError, match="b#0"):
        index.upsert([entry("a", 1), entry("b", 1)])
    assert index.fingerprint() != before  # a#0 landed


def test_summary_pages_through_titles_and_chunk_texts_by_doc_id(cluster, monkeypatch):
    monkeypatch.setattr("retrieval.elastic._PAGE", 2)
    index = open_index(cluster)
    index.upsert([entry("c", 1), entry("a", 2), entry("b", 2)])
    full = index.summary(max_titles=10, max_chars=10**6)
    assert full == IndexSummary(["Title a", "Title b", "Title c"],
                                ["chunk 0 of a", "chunk 1 of a", "chunk 0 of b", "chunk 1 of b", "chunk 0 of c"])
    cluster.requests.clear()
    bounded = index.summary(max_titles=1, max_chars=len("chunk 0 of a") + 1)  # the chunk crossing the bound is last
    assert bounded == IndexSummary(["Title a"], ["chunk 0 of a", "chunk 1 of a"])
    titles, *chunks = (r.body for r in cluster.requests if r.path.endswith("/_search"))
    assert titles == {"query": {"match_all": {}}, "size": 1, "sort": [{"doc_id": "asc"}], "_source": ["title"]}
    assert len(chunks) == 1 and chunks[0]["sort"] == [{"doc_id": "asc"}, {"chunk_index": "asc"}]
    assert chunks[0]["_source"] == ["text"] and chunks[0]["size"] == 2  # a page, never the whole index


# -- a live cluster ---------------------------------------------------------------------------


@pytest.mark.elasticsearch
@pytest.mark.skipif(not os.environ.get("ELASTICSEARCH_URL"), reason="needs a live cluster: set ELASTICSEARCH_URL")
class TestLiveCluster:
    @pytest.fixture
    def index(self):
        name = f"atelier-test-{uuid.uuid4().hex[:10]}"
        backend = ElasticsearchIndex(ElasticsearchConfig(index=name, retry_backoff=0.1), dim=DIM, model_name=MODEL,
                                     fusion=FusionConfig(method=FusionMethod.rrf, candidates=10))
        yield backend
        backend.client.indices.delete(index=[name, f"{name}-docs"], ignore_unavailable=True)
        backend.close()

    def test_round_trip(self, index):
        docs = [entry("alpha", 3, "h-alpha"), entry("beta", 2, "h-beta")]
        index.upsert(docs)
        assert index.document_hashes() == {"alpha": "h-alpha", "beta": "h-beta"}
        assert index.document_hashes(root="/elsewhere") == {}
        assert index.stats()["chunks"] == 5
        index.upsert([entry("alpha", 1, "h-alpha-2")])  # shrank: its stale chunks must go
        assert index.stats()["chunks"] == 3
        [top] = index.search("chunk 1 of beta", k=1, mode=Mode.bm25)
        assert top.chunk_id == "beta#1"
        target = docs[1].vectors[0]
        assert index.search("", k=1, mode=Mode.dense, query_vector=target)[0].chunk_id == "beta#0"
        hybrid = index.search("chunk 0 of beta", k=3, mode=Mode.hybrid, query_vector=target)
        assert hybrid[0].chunk_id == "beta#0" and [h.rank for h in hybrid] == [1, 2, 3]
        assert index.delete(["beta", "missing"]) == 1
        assert index.document_hashes() == {"alpha": "h-alpha-2"} and index.stats()["chunks"] == 1

    def test_fingerprint_and_summary(self, index):
        empty = index.fingerprint()
        assert index.summary(max_titles=10, max_chars=10**6) == IndexSummary()
        index.upsert([entry("beta", 2, "h-beta"), entry("alpha", 1, "h-alpha")])
        written = index.fingerprint()
        assert written != empty and index.fingerprint() == written
        assert index.summary(max_titles=10, max_chars=10**6) == IndexSummary(
            ["Title alpha", "Title beta"], ["chunk 0 of alpha", "chunk 0 of beta", "chunk 1 of beta"])
        assert index.summary(max_titles=1, max_chars=1) == IndexSummary(["Title alpha"], ["chunk 0 of alpha"])
        index.delete(["beta"])
        assert index.fingerprint() not in (empty, written)
