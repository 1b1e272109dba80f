"""The command line: light help, one-line errors for user mistakes."""

import subprocess
import sys

import pytest

ATELIER = [sys.executable, "-m", "atelier.cli"]


def _run(*args, **kw):
    return subprocess.run([*ATELIER, *args], capture_output=True, text=True, timeout=120, **kw)


def test_help_does_not_import_torch():
    code = ("import sys; sys.argv = ['atelier', '--help']\n"
            "from atelier.cli import app\n"
            "try:\n    app()\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'transformers', 'sentence_transformers') if m in sys.modules]\n"
            "print('HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    assert "index" in out and "search" in out and "eval" in out
    assert "HEAVY []" in out


@pytest.mark.parametrize("args, message", [
    (["index", "/definitely/not/here"], "is not a folder"),
    (["search", "anything"], "build one first with `atelier index DIR`"),
    (["search", "x", "--mode", "fuzzy"], "unknown --mode 'fuzzy'"),
    (["index"], "give a folder to index"),
    (["eval", "retrieval", "--beir", "/nope", "--split", "test"], "no judgements for split 'test'"),
])
def test_user_mistakes_get_one_line_errors(args, message):
    result = _run(*args)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.startswith("error:")]) == 1


def test_empty_folder_is_refused(tmp_path):
    (tmp_path / "empty.md").write_text("")
    result = _run("index", str(tmp_path))
    assert result.returncode == 1
    assert "skipped empty.md: no text" in result.stderr
    assert "no readable documents" in result.stderr and "Traceback" not in result.stderr


def test_bad_config_file_is_a_clear_error(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("fusion:\n  alpha: 3\n  color: red\n")
    result = _run("search", "x", "--config", str(cfg))
    assert result.returncode == 1
    assert "fusion.alpha" in result.stderr and "fusion.color" in result.stderr
