"""Credentials in server URLs never reach a log line or an error message (hardening issue, finding 10)."""

from __future__ import annotations

import logging

import pytest

from atelier.errors import AtelierError
from atelier.redact import RedactingFilter, redact_url, scrub

SECRET_URL = "http://alice:s3cr3t-pass@127.0.0.1:9/v1"


def test_redact_url_and_scrub():
    assert redact_url("https://user:secret@host:8000/v1?key=abc") == "https://host:8000/v1"
    assert redact_url("http://[::1:bad") == "http://[::1:bad"  # malformed: kept, minus what could hold a secret
    text = f"teacher at {SECRET_URL} failed; also see https://bob:pw@example.invalid/x and http://plain/"
    assert scrub(text) == "teacher at http://127.0.0.1:9/v1 failed; also see https://example.invalid/x and http://plain/"


def test_log_records_are_scrubbed(caplog):
    logger = logging.getLogger("atelier.test.redact")
    handler = logging.Handler()
    seen = []
    handler.emit = lambda record: seen.append(record.getMessage())
    handler.addFilter(RedactingFilter())
    logger.addHandler(handler)
    try:
        logger.warning("calling %s now", SECRET_URL)
    finally:
        logger.removeHandler(handler)
    assert seen == ["calling http://127.0.0.1:9/v1 now"]


def test_an_unreachable_teacher_names_the_server_without_its_password(monkeypatch, tmp_path, caplog):
    from training.teacher import Teacher, TeacherConfig

    monkeypatch.setenv("OPENAI_BASE_URL", SECRET_URL)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    teacher = Teacher(TeacherConfig(name="openai:some-model", cache_path=tmp_path / "c.sqlite", timeout_s=2))
    with caplog.at_level("DEBUG"), pytest.raises(AtelierError) as error:
        teacher.check()
    assert "s3cr3t" not in caplog.text
    assert "127.0.0.1:9" in str(error.value) and "s3cr3t" not in str(error.value) and "alice" not in str(error.value)
