"""`atelier specialist add` end to end on the sample manuals, with small step counts.

Real documents, real data generation, a real scratch:tiny model trained through DAPT, SFT and
DPO, real evaluation and registry; only the step counts are cut so it runs in about a minute.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[2] / "examples" / "docs"
ATELIER = [sys.executable, "-m", "atelier.cli"]
EXAM = Path(__file__).resolve().parents[2] / "bench" / "exams" / "hx-pumps.jsonl"
SMALL = """
base: scratch:tiny
dapt: {max_steps: 30, save_steps: 15, logging_steps: 10}
sft: {max_steps: 10, save_steps: 5, logging_steps: 5, eval_heldout: false}
dpo: {max_steps: 8, save_steps: 4, logging_steps: 4, eval_heldout: false}
eval: {max_perplexity_texts: 20, max_mcq_items: 30, max_generation_items: 4, max_preference_items: 20, max_new_tokens: 8}
"""
# the kill-and-resume test needs an SFT long enough to be killed between two checkpoints
KILLABLE = SMALL.replace("sft: {max_steps: 10, save_steps: 5", "sft: {max_steps: 20, save_steps: 10")


def _run(home: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "ATELIER_HOME": str(home), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*ATELIER, *args], capture_output=True, text=True, timeout=600, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"atelier {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return result


@pytest.fixture
def small_config(tmp_path) -> Path:
    path = tmp_path / "small.yaml"
    path.write_text(SMALL)
    return path


def test_add_builds_evaluates_and_registers_then_reuses_everything(tmp_path, atelier_home, small_config):
    exam = tmp_path / "exam.jsonl"  # a dozen items of the held-out exam keep the test fast
    exam.write_text("".join(EXAM.read_text(encoding="utf-8").splitlines(keepends=True)[:12]), encoding="utf-8")
    out = _run(atelier_home, "specialist", "add", "pumps", "--docs", str(DOCS), "--config", str(small_config),
               "--force", "--exam", str(exam))
    record = json.loads(_run(atelier_home, "specialist", "show", "pumps", "--json").stdout)
    assert record["exam_report"]["items"] == 12 and record["exam_sha256"] == record["exam_report"]["exam_sha256"]
    assert set(record["exam_report"]["systems"]) == {"base", "specialist"} and "gate" in record["exam_report"]
    assert record["version"] == 1 and record["base_model"].startswith(str(atelier_home / "bases"))
    assert Path(record["adapter_path"], "adapter_model.safetensors").stat().st_size > 1024
    stages = record["eval_report"]["stages"]
    assert list(stages) == ["base", "dpo"]  # intermediate stages are evaluated only with --evaluate-stages
    assert stages["dpo"]["perplexity"] < stages["base"]["perplexity"] / 2  # DAPT learned the domain's text
    [dapt] = Path(record["run_dir"]).glob("dapt-*/result.json")
    metrics = json.loads(dapt.read_text())["metrics"]  # a scratch base scores its stages on the held-out split
    assert metrics["heldout_perplexity"] < metrics["heldout_perplexity_before"] / 2
    assert len(record["route_exemplars"]) > 10 and record["keywords"]
    run_dir = Path(record["run_dir"])
    for name in ("eval/eval.json", "eval/eval.md", "eval/eval.png", "data/manifest.json", "summary.json"):
        assert (run_dir / name).exists(), name
    assert "held-out evaluation" in out.stdout

    again = _run(atelier_home, "specialist", "add", "pumps", "--docs", str(DOCS), "--config", str(small_config),
                 "--force")
    assert "reused" in again.stderr and "unchanged: pumps v1" in again.stderr
    assert json.loads(_run(atelier_home, "specialist", "list", "--json").stdout)[0]["version"] == 1


@pytest.mark.slow  # ~70 s; the stage-level SIGKILL test (test_sft.py) covers resuming in the default suite
def test_killed_during_sft_resumes_from_its_checkpoint(tmp_path, atelier_home):
    small_config = tmp_path / "killable.yaml"
    small_config.write_text(KILLABLE)
    env = {**os.environ, "ATELIER_HOME": str(atelier_home), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([*ATELIER, "specialist", "add", "pumps", "--docs", str(DOCS), "--config",
                             str(small_config), "--force"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 400
    checkpoint = None
    while time.monotonic() < deadline and proc.poll() is None:
        found = sorted(atelier_home.glob("runs/pumps/*/sft-*/checkpoints/checkpoint-*/trainer_state.json"))
        if found:
            checkpoint = found[0].parent
            break
        time.sleep(0.2)
    assert checkpoint is not None, "SFT never wrote a checkpoint"
    time.sleep(0.5)  # let the checkpoint finish writing its last files; resume uses the newest complete one
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    run_dir, sft_dir = checkpoint.parents[2], checkpoint.parents[1]
    [dapt_result] = run_dir.glob("dapt-*/result.json")
    assert not (sft_dir / "result.json").exists()
    dapt_mtime = dapt_result.stat().st_mtime

    out = _run(atelier_home, "specialist", "add", "pumps", "--docs", str(DOCS), "--config", str(small_config),
               "--force")
    assert "resumed from step" in out.stderr
    assert dapt_result.stat().st_mtime == dapt_mtime  # DAPT was not redone
    sft = json.loads((sft_dir / "result.json").read_text())
    assert sft["resumed_from_step"] >= 10 and sft["steps"] == 20


@pytest.mark.parametrize("make_docs, message", [
    (lambda d: None, "no readable documents"),
    (lambda d: (d / "empty.md").write_text("   "), "no readable documents"),
])
def test_unusable_docs_folder_is_a_clear_error(tmp_path, atelier_home, make_docs, message):
    docs = tmp_path / "docs"
    docs.mkdir()
    make_docs(docs)
    result = _run(atelier_home, "specialist", "add", "x", "--docs", str(docs), check=False)
    assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr
    assert not (atelier_home / "specialists" / "x").exists()


def test_missing_base_and_unreachable_teacher_are_clear_errors(tmp_path, atelier_home, monkeypatch):
    """In-process: `atelier.cli.main` turns an AtelierError into one line (tests/test_cli.py runs that path)."""
    from typer.testing import CliRunner

    from atelier.cli import app
    from atelier.errors import AtelierError

    monkeypatch.setenv("OLLAMA_HOST", f"http://127.0.0.1:{_free_port()}")
    missing = CliRunner().invoke(app, ["specialist", "add", "x", "--docs", str(DOCS), "--base", str(tmp_path / "nope")])
    assert isinstance(missing.exception, AtelierError) and "nope" in str(missing.exception)
    teacher = CliRunner().invoke(app, ["specialist", "add", "x", "--docs", str(DOCS), "--teacher", "ollama:gemma2:27b"])
    assert isinstance(teacher.exception, AtelierError) and "not reachable" in str(teacher.exception)
    assert not (atelier_home / "specialists" / "x").exists()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_config_typos_are_rejected(tmp_path, atelier_home):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sft: {max_step: 10}\n")
    result = _run(atelier_home, "specialist", "add", "x", "--docs", str(DOCS), "--config", str(bad), check=False)
    assert result.returncode == 1 and "sft.max_step" in result.stderr
    result = _run(atelier_home, "specialist", "add", "x", "--docs", str(DOCS), "--stages", "sft,dapt", check=False)
    assert result.returncode == 1 and "order" in result.stderr


def test_the_base_evaluation_is_reused_by_another_run_on_the_same_data_and_settings(tiny_base, small_data, tmp_path,
                                                                                   monkeypatch):
    import eval.specialist
    from training.config import SpecialistConfig
    from training.pipeline import evaluate_cached

    config = SpecialistConfig(eval={"max_perplexity_texts": 4, "max_mcq_items": 6, "max_generation_items": 0,
                                    "max_preference_items": 4})
    first = evaluate_cached("base", tiny_base, None, small_data, "data-v1", config, tmp_path / "run1" / "eval")
    assert first["mcq_items"] == 6 and "outcomes" in first

    def no_evaluation(*args, **kwargs):
        raise AssertionError("evaluated again")

    monkeypatch.setattr(eval.specialist, "evaluate_model", no_evaluation)
    again = evaluate_cached("base", tiny_base, None, small_data, "data-v1", config, tmp_path / "run2" / "eval")
    assert again == first and json.loads((tmp_path / "run2/eval/base.json").read_text())["metrics"] == first
    for other_data, other_config in (("data-v2", config), ("data-v1", config.model_copy(update={
            "eval": config.eval.model_copy(update={"max_mcq_items": 5})}))):
        with pytest.raises(AssertionError, match="evaluated again"):  # other data or settings: scored anew
            evaluate_cached("base", tiny_base, None, small_data, other_data, other_config, tmp_path / "run3" / "eval")
