"""Elasticsearch stand-ins: stdlib HTTP servers on 127.0.0.1 that the real client talks to.

`FakeElasticsearch` answers like Elasticsearch (product header, JSON), records every request
and answers scripted responses first, so tests can check the exact request bodies and play
per-item bulk errors, licence refusals or auth failures. `FakeCluster` also keeps what is
written (indices, mappings, documents) and answers the requests Atelier sends with it —
filters, sorted and paged listings, counts, a term-overlap `match` and an exact `knn` — so the
CLI can index a folder into it and the orchestrator search and route over it.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

if TYPE_CHECKING:
    from retrieval.elastic import ElasticsearchIndex

@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    body: object  # parsed JSON, a list of NDJSON objects for _bulk, or None
    headers: dict[str, str]


Response = tuple[int, object]
Responder = Callable[[Request], Response]


class FakeElasticsearch:
    """Records requests; answers scripted responses first, sensible empty defaults otherwise."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self._scripts: list[tuple[str, re.Pattern, list[Response | Responder]]] = []
        self.existing: dict[str, dict] = {}  # index name -> mapping, answered by HEAD and _mapping
        self.backends: list[ElasticsearchIndex] = []  # closed with the server
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                parts = urlsplit(self.path)
                request = Request(self.command, parts.path, parse_qs(parts.query), _parse(parts.path, raw),
                                  {k.lower(): v for k, v in self.headers.items()})
                status, body = fake.answer(request)
                payload = b"" if body is None else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("X-Elastic-Product", "Elasticsearch")
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _handle

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self._thread.start()

    def on(self, method: str, path: str, *responses: Response | Responder) -> None:
        """Answer requests matching `method` and regex `path` with `responses` in turn (the last repeats)."""
        self._scripts.append((method, re.compile(path), list(responses)))

    def answer(self, request: Request) -> Response:
        with self._lock:
            self.requests.append(request)
            for method, pattern, responses in reversed(self._scripts):
                if method == request.method and pattern.fullmatch(request.path):
                    response = responses.pop(0) if len(responses) > 1 else responses[0]
                    return response(request) if callable(response) else response
        return self._default(request)

    def _default(self, request: Request) -> Response:
        name = request.path.strip("/").split("/")[0]
        if request.method == "HEAD":
            return (200, None) if name in self.existing else (404, None)
        if request.path.endswith("/_mapping"):
            if request.method in ("PUT", "POST"):  # a mapping update: new fields added, _meta replaced
                if name in self.existing:
                    mapping = self.existing[name]
                    mapping.setdefault("properties", {}).update(request.body.get("properties", {}))
                    if "_meta" in request.body:
                        mapping["_meta"] = request.body["_meta"]
                return 200, {"acknowledged": True}
            if name not in self.existing:
                return es_error(404, "index_not_found_exception", f"no such index [{name}]")
            return 200, {name: {"mappings": self.existing[name]}}
        if request.path.endswith("/_bulk"):
            return bulk_response(request)
        if request.method == "PUT" and "/" not in request.path.strip("/"):
            return 200, {"acknowledged": True, "shards_acknowledged": True, "index": name}
        if request.path.endswith("/_delete_by_query"):
            return 200, {"deleted": 0, "failures": []}
        if request.path.endswith("/_count"):
            return 200, {"count": 0}
        if request.path.endswith("/_search"):
            return 200, search_response([])
        return 200, {"_shards": {"total": 1, "successful": 1, "failed": 0}}

    def named(self, method: str, suffix: str) -> list[Request]:
        return [r for r in self.requests if r.method == method and r.path.endswith(suffix)]

    def close(self) -> None:
        for backend in self.backends:
            backend.close()
        self.server.shutdown()
        self.server.server_close()


def _parse(path: str, raw: bytes) -> object:
    if not raw:
        return None
    if path.endswith("/_bulk"):
        return [json.loads(line) for line in raw.decode().splitlines() if line.strip()]
    return json.loads(raw)


def bulk_items(request: Request) -> list[tuple[str, str, dict | None]]:
    """(op, _id, source) for each action of a recorded bulk request."""
    lines, items, i = request.body, [], 0
    while i < len(lines):
        op, meta = next(iter(lines[i].items()))
        source = lines[i + 1] if op != "delete" else None
        items.append((op, meta.get("_id"), source))
        i += 1 if op == "delete" else 2
    return items


def bulk_response(request: Request, statuses: dict[str, tuple[int, dict | None]] | None = None) -> Response:
    """A 200 bulk answer; items listed in `statuses` get that (status, error), the rest 201."""
    items = []
    for op, item_id, _ in bulk_items(request):
        status, error = (statuses or {}).get(item_id, (201, None))
        item = {"_index": "atelier", "_id": item_id, "status": status}
        item.update({"error": error} if error else {"result": "created"})
        items.append({op: item})
    errors = any(next(iter(i.values()))["status"] >= 300 for i in items)
    return 200, {"took": 1, "errors": errors, "items": items}


def search_response(hits: list[tuple[str, float]]) -> dict:
    """A search answer whose hits are chunks `doc#i` with the given scores, best first."""
    found = [{"_index": "atelier", "_id": cid, "_score": score, "_source": chunk_source(cid)} for cid, score in hits]
    return {"took": 1, "timed_out": False,
            "hits": {"total": {"value": len(hits), "relation": "eq"}, "max_score": None, "hits": found}}


def es_error(status: int, kind: str, reason: str, **extra) -> Response:
    """An Elasticsearch error answer."""
    error = {"root_cause": [{"type": kind, "reason": reason}], "type": kind, "reason": reason, **extra}
    return status, {"error": error, "status": status}


def chunk_source(chunk_id: str) -> dict:
    doc_id, _, index = chunk_id.rpartition("#")
    return {"doc_id": doc_id, "chunk_id": chunk_id, "chunk_index": int(index), "title": f"Title {doc_id}",
            "text": f"text of {chunk_id}", "source": f"{doc_id}.md", "start": 10, "end": 20, "root": "/docs"}




# -- a stand-in that keeps what is written ------------------------------------------------------


class FakeCluster(FakeElasticsearch):
    """A FakeElasticsearch that stores what it is sent and answers from it (scripts still come first).

    BM25 is stood in for by term overlap on `body` and dense search is exact cosine over the
    stored vectors: close enough for routing and search tests, not for ranking quality.
    """

    def __init__(self) -> None:
        self.docs: dict[str, dict[str, dict]] = {}  # index -> _id -> _source
        self._state = threading.Lock()
        super().__init__()

    def _default(self, request: Request) -> Response:
        with self._state:
            return self._stateful(request)

    def _stateful(self, request: Request) -> Response:
        path = request.path.strip("/")
        names = path.split("/")[0].split(",")
        if request.method == "HEAD" or path.endswith(("/_mapping", "/_refresh")):
            return super()._default(request)
        if path == "_bulk" or path.endswith("/_bulk"):
            return self._bulk(request)
        if request.method == "PUT" and "/" not in path:
            return self._create(names[0], request.body or {})
        missing = [name for name in names if name not in self.existing]
        if missing:
            return es_error(404, "index_not_found_exception", f"no such index [{missing[0]}]")
        if path.endswith("/_search"):
            return self._search(names, request.body or {})
        if path.endswith("/_count"):
            query = (request.body or {}).get("query", {"match_all": {}})
            return 200, {"count": sum(1 for _, _, source in self._all(names) if matches(source, query))}
        if path.endswith("/_delete_by_query"):
            doomed = [(name, doc_id) for name, doc_id, source in self._all(names)
                      if matches(source, request.body["query"])]
            for name, doc_id in doomed:
                del self.docs[name][doc_id]
            return 200, {"deleted": len(doomed), "failures": []}
        return super()._default(request)

    def _create(self, name: str, body: dict) -> Response:
        if name in self.existing:
            return es_error(400, "resource_already_exists_exception", f"index [{name}] already exists")
        self.existing[name] = json.loads(json.dumps(body.get("mappings", {})))
        self.docs[name] = {}
        return 200, {"acknowledged": True, "shards_acknowledged": True, "index": name}

    def _bulk(self, request: Request) -> Response:
        lines, i = request.body, 0
        while i < len(lines):
            op, meta = next(iter(lines[i].items()))
            if op == "delete":
                self.docs.get(meta["_index"], {}).pop(meta["_id"], None)
                i += 1
            else:
                self.docs.setdefault(meta["_index"], {})[meta["_id"]] = lines[i + 1]
                i += 2
        return bulk_response(request)

    def _all(self, names: list[str]):
        return [(name, doc_id, source) for name in names for doc_id, source in self.docs.get(name, {}).items()]

    def _search(self, names: list[str], body: dict) -> Response:
        if "retriever" in body:  # like a cluster before 8.14: the backend fuses the two legs itself
            return es_error(400, "parsing_exception", "Unknown key for a START_OBJECT in [retriever].")
        found = self._all(names)
        if "knn" in body:
            knn = body["knn"]
            scored = [(doc_id, source, (1 + _cosine(source["vector"], knn["query_vector"])) / 2)
                      for _, doc_id, source in found]
            scored = sorted(scored, key=lambda hit: -hit[2])[:knn["k"]]
        elif "match" in body.get("query", {}):
            [(field, spec)] = body["query"]["match"].items()
            terms = set(_words(spec["query"] if isinstance(spec, dict) else spec))
            scored = [(doc_id, source, float(len(terms & set(_words(source.get(field, ""))))))
                      for _, doc_id, source in found]
            scored = sorted((hit for hit in scored if hit[2] > 0), key=lambda hit: -hit[2])
        else:
            query = body.get("query", {"match_all": {}})
            scored = [(doc_id, source, 1.0) for _, doc_id, source in found if matches(source, query)]
        sort = [next(iter(key.items())) for key in body.get("sort", [])]
        for field, order in reversed(sort):
            scored.sort(key=lambda hit, f=field: hit[1].get(f), reverse=order == "desc")
        if body.get("search_after") is not None:
            after = list(body["search_after"])
            scored = [hit for hit in scored if [hit[1].get(f) for f, _ in sort] > after]
        hits = [{"_index": names[0], "_id": doc_id, "_score": score, "_source": _fields(source, body.get("_source")),
                 **({"sort": [source.get(f) for f, _ in sort]} if sort else {})}
                for doc_id, source, score in scored[:body.get("size", 10)]]
        return 200, {"took": 1, "timed_out": False,
                     "hits": {"total": {"value": len(scored), "relation": "eq"}, "max_score": None, "hits": hits}}


def matches(source: dict, query: dict) -> bool:
    """Whether a stored `_source` matches the query clauses Atelier sends (term, terms, range, bool)."""
    [(kind, spec)] = query.items()
    if kind == "match_all":
        return True
    if kind == "term":
        [(field, value)] = spec.items()
        return source.get(field) == (value["value"] if isinstance(value, dict) else value)
    if kind == "terms":
        [(field, values)] = spec.items()
        return source.get(field) in values
    if kind == "range":
        [(field, bounds)] = spec.items()
        value = source.get(field)
        checks = {"gte": lambda b: value >= b, "gt": lambda b: value > b, "lte": lambda b: value <= b,
                  "lt": lambda b: value < b}
        return value is not None and all(checks[op](bound) for op, bound in bounds.items())
    if kind == "bool":
        required = [*spec.get("filter", []), *spec.get("must", [])]
        should = spec.get("should", [])
        needed = spec.get("minimum_should_match", 0 if required else 1) if should else 0
        return (all(matches(source, q) for q in required) and not any(matches(source, q) for q in spec.get("must_not", []))
                and sum(matches(source, q) for q in should) >= needed)
    raise ValueError(f"the fake cluster does not know {kind!r} queries")


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _cosine(a: list[float], b: list[float]) -> float:
    norms = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return sum(x * y for x, y in zip(a, b)) / norms if norms else 0.0


def _fields(source: dict, selection) -> dict:
    if isinstance(selection, list):
        return {key: value for key, value in source.items() if key in selection}
    if isinstance(selection, dict) and "excludes" in selection:
        return {key: value for key, value in source.items() if key not in selection["excludes"]}
    return dict(source)
