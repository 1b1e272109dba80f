"""Elasticsearch connection settings and the client built from them (TLS, API key or basic auth).

Credentials default to environment variables read when a config is built, never at import.
"""

from __future__ import annotations

import logging
import os
import re
from typing import TYPE_CHECKING, Any

from pydantic import Field, SecretStr, field_validator

from atelier.config import StrictModel
from atelier.errors import AtelierError
from atelier.redact import redact_url

if TYPE_CHECKING:
    from elasticsearch import Elasticsearch

log = logging.getLogger("retrieval.elastic")

_MAX_CANDIDATES = 10_000  # Elasticsearch's ceiling for knn k and num_candidates
_BAD_INDEX_CHARS = re.compile(r'[\\/*?"<>|, #:A-Z]')


def _env(name: str) -> str | None:
    return os.environ.get(name) or None


def _env_secret(name: str) -> SecretStr | None:
    value = _env(name)
    return SecretStr(value) if value else None


class ElasticsearchConfig(StrictModel):
    """Where the cluster is and how to talk to it; credentials default to environment variables."""

    url: str = Field(default_factory=lambda: _env("ELASTICSEARCH_URL") or "http://localhost:9200",
                     validate_default=True, json_schema_extra={"env": "ELASTICSEARCH_URL"},
                     description="Cluster URL, e.g. https://es.example.com:9200; defaults to $ELASTICSEARCH_URL, "
                                 "else http://localhost:9200.")
    index: str = Field("atelier", description="Name of the chunk index; document records go to '<index>-docs'.")
    api_key: SecretStr | None = Field(default_factory=lambda: _env_secret("ELASTICSEARCH_API_KEY"),
                                      json_schema_extra={"env": "ELASTICSEARCH_API_KEY"},
                                      description="Encoded API key (defaults to $ELASTICSEARCH_API_KEY); "
                                                  "takes precedence over username/password.")
    username: str | None = Field(default_factory=lambda: _env("ELASTICSEARCH_USERNAME"),
                                 json_schema_extra={"env": "ELASTICSEARCH_USERNAME"},
                                 description="Basic-auth user (defaults to $ELASTICSEARCH_USERNAME); "
                                             "used only without an API key.")
    password: SecretStr | None = Field(default_factory=lambda: _env_secret("ELASTICSEARCH_PASSWORD"),
                                       json_schema_extra={"env": "ELASTICSEARCH_PASSWORD"},
                                       description="Basic-auth password (defaults to $ELASTICSEARCH_PASSWORD).")
    ca_certs: str | None = Field(default_factory=lambda: _env("ELASTICSEARCH_CA_CERTS"),
                                 json_schema_extra={"env": "ELASTICSEARCH_CA_CERTS"},
                                 description="PEM file of the CA that signed the cluster's certificate (defaults to "
                                             "$ELASTICSEARCH_CA_CERTS); needed for self-signed clusters.")
    verify_certs: bool = Field(True, description="Verify the cluster's TLS certificate; off only for a toy cluster.")
    request_timeout: float = Field(30.0, gt=0, description="Seconds to wait for one request before giving up.")
    bulk_chunk_size: int = Field(500, ge=1, description="Chunks sent per bulk request when indexing.")
    max_retries: int = Field(3, ge=0, description="Retries of a request refused as busy (429, 502-504) or unreachable, "
                                                  "and of each bulk item refused with 429.")
    retry_backoff: float = Field(2.0, ge=0, description="Seconds before the first bulk retry, doubled on each retry.")
    num_candidates: int = Field(100, ge=1, le=_MAX_CANDIDATES,
                                description="Dense search: nearest-neighbour candidates per shard (at least k); "
                                            "more is slower but closer to exact.")
    server_rrf: bool = Field(True, description="Use the server-side rrf retriever when fusion is rrf and the licence "
                                               "allows it; otherwise fuse the two legs client-side.")

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"{url!r} is not an http(s) URL; set ELASTICSEARCH_URL to e.g. https://localhost:9200")
        return url.rstrip("/")

    @field_validator("index")
    @classmethod
    def _index_name(cls, index: str) -> str:
        if not index or _BAD_INDEX_CHARS.search(index) or index[0] in "-_+." or len(index) > 200:
            raise ValueError(f"{index!r} is not a valid index name: use lowercase letters, digits, '-' or '_'")
        return index


def connect(config: ElasticsearchConfig) -> Elasticsearch:
    """An Elasticsearch client for `config` (TLS, API key or basic auth); connects lazily."""
    from elasticsearch import Elasticsearch

    if config.ca_certs and not os.path.isfile(config.ca_certs):
        raise AtelierError(f"CA certificate file {config.ca_certs} not found; "
                           "set ELASTICSEARCH_CA_CERTS to the PEM file of the cluster's CA")
    auth: dict[str, Any] = {}
    if config.api_key is not None:
        auth["api_key"] = config.api_key.get_secret_value()
    elif config.username:
        password = config.password.get_secret_value() if config.password else ""
        auth["basic_auth"] = (config.username, password)
    tls: dict[str, Any] = {}
    if config.url.startswith("https://"):
        tls = {"verify_certs": config.verify_certs, "ssl_show_warn": config.verify_certs}
        if config.ca_certs:
            tls["ca_certs"] = config.ca_certs
    log.info("using Elasticsearch at %s", redact_url(config.url))
    try:
        return Elasticsearch(config.url, request_timeout=config.request_timeout, max_retries=config.max_retries,
                             **auth, **tls)
    except ValueError as exc:
        raise AtelierError(f"cannot configure the Elasticsearch client for {redact_url(config.url)}: {exc}") from None
