"""The tracing kernel on its own: the SQLite store's retention and failure mode, and credentials kept out."""

from __future__ import annotations

import logging

import pytest

from atelier import tracing
from atelier.errors import AtelierError
from atelier.trace_store import SqliteSpanExporter, TraceStore


def test_the_store_keeps_the_newest_traces_with_their_spans(tmp_path):
    exporter = SqliteSpanExporter(tmp_path / "traces.sqlite", keep=3)
    tracing.use([exporter])
    try:
        for i in range(5):
            with (
                tracing.request("invoke_agent atelier", {tracing.CONVERSATION: f"c{i}"}),
                tracing.span(tracing.ROUTE_SPAN, kind="route") as span,
            ):
                span.set(tracing.ROUTE, "search")
    finally:
        tracing.shutdown()
    store = TraceStore(tmp_path / "traces.sqlite")
    roots = store.traces(last=10)
    assert [r["attributes"][tracing.CONVERSATION] for r in roots] == ["c4", "c3", "c2"]
    spans = store.spans(roots[0]["trace_id"][:8])
    assert [s["name"] for s in spans] == ["invoke_agent atelier", tracing.ROUTE_SPAN]
    assert spans[1]["parent_id"] == spans[0]["span_id"] and spans[1]["attributes"][tracing.ROUTE] == "search"
    assert len(store.named(tracing.ROUTE_SPAN)) == 3  # the dropped traces' children went with them
    store.close()


def test_a_broken_store_costs_traces_not_requests_and_warns_once(tmp_path, caplog):
    blocked = tmp_path / "traces.sqlite"
    blocked.mkdir()  # a folder where the database file should be
    tracing.use([SqliteSpanExporter(blocked)])
    caplog.set_level(logging.WARNING, logger="atelier.trace_store")
    try:
        for _ in range(3):
            with (
                tracing.request("invoke_agent atelier") as (_, record),
                tracing.span("execute_tool calculator", kind="tool"),
            ):
                pass
            assert record.timings_ms["tool"] >= 0
    finally:
        tracing.shutdown()
    warnings = [r for r in caplog.records if "cannot be written" in r.getMessage()]
    assert len(warnings) == 1 and "Move the file aside" in warnings[0].getMessage()


def test_setup_follows_the_environment_and_off_means_no_tracer(tmp_path, monkeypatch):
    monkeypatch.setenv("ATELIER_HOME", str(tmp_path))
    monkeypatch.setenv("ATELIER_TRACING", "off")
    tracing.setup()
    assert not tracing.enabled()
    monkeypatch.setenv("ATELIER_TRACING", "on")
    monkeypatch.setenv("ATELIER_TRACE_KEEP", "7")
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    try:
        tracing.setup()
        assert tracing.enabled() and not tracing.capture_content()
        with tracing.request("invoke_agent atelier"):
            pass
        tracing.flush()
        assert len(TraceStore(tmp_path / "traces.sqlite").traces()) == 1
    finally:
        tracing.shutdown()
    assert tracing.TracingConfig().keep_traces == 7
    monkeypatch.setenv("ATELIER_TRACE_KEEP", "lots")
    with pytest.raises(AtelierError, match="ATELIER_TRACE_KEEP='lots' is not a whole number"):
        tracing.TracingConfig()


def test_clean_removes_credentials_and_keeps_the_rest():
    text = "see http://bob:hunter2@host:9200/x with Authorization: Bearer abc.def-123456 and key hf_abcdefghijkl"
    cleaned = tracing.clean(text)
    assert "hunter2" not in cleaned and "abc.def-123456" not in cleaned and "abcdefghijkl" not in cleaned
    assert cleaned.startswith("see http://host:9200/x with Authorization: Bearer [redacted]")
