"""`atelier specialist improve` on the command line: a teacher that is not there is a one-line error before
the search encoder or any model loads (in a fresh process, so what it imported can be checked)."""

from __future__ import annotations

import os
import subprocess
import sys

from typer.testing import CliRunner

from atelier.errors import AtelierError
from atelier.feedback import FeedbackStore
from specialists.registry import Registry
from tests.specialists.test_cli import REPORT, adapter  # noqa: F401 - the adapter fixture (numpy, no torch)
from tests.specialists.test_served import free_port

# The root CLI in a fresh process; after it, what heavy modules it imported (none: no model was loaded).
ATELIER = (
    "import sys; from atelier.cli import main\n"
    "sys.argv = ['atelier', *sys.argv[1:]]\n"
    "try:\n    main()\nfinally:\n    print('HEAVY', [m for m in ('torch', 'transformers', 'peft', "
    "'sentence_transformers', 'xllamacpp') if m in sys.modules], file=sys.stderr)\n"
)


def test_an_unreachable_teacher_fails_fast_in_one_line(atelier_home, adapter, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    (run_dir / "data" / "sft").mkdir(parents=True)
    (run_dir / "data" / "sft" / "heldout.jsonl").write_text("{}\n", encoding="utf-8")
    Registry(atelier_home).register(
        "hx", base_model="tiny-llama", eval_report=REPORT.to_dict(), adapter_dir=adapter, run_dir=run_dir
    )
    store = FeedbackStore(atelier_home / "feedback.sqlite")
    try:
        store.record_exchange(
            "c1", "t", "m", "What torque for the HX-65 impeller nut?", "45 N·m", "specialist:hx", "alice", 1
        )
        store.add("c1", "down", owner="alice")
        store.record_exchange(
            "c2", "t", "m", "Oil grade of the bearing frame?", "ISO VG 68", "specialist:hx", "alice", 1
        )
        store.add("c2", "up", owner="alice")  # its pair needs the base's answer: a model load, after the teacher
    finally:
        store.close()
    url = f"http://127.0.0.1:{free_port()}/v1"
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            ATELIER,
            "specialist",
            "improve",
            "hx",
            "--from-feedback",
            "--teacher",
            "openai:test-model",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ | {"OPENAI_BASE_URL": url, "ATELIER_HOME": str(atelier_home)},
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        f"error: teacher openai:test-model not reachable at {url}; start the server, or set OPENAI_BASE_URL / the "
        "teacher's base_url, or run without --teacher"
    ]
    assert "HEAVY []" in result.stderr  # no torch, no encoder, no llama.cpp: nothing was loaded
    assert Registry(atelier_home).current_version("hx") == 1 and not (atelier_home / "runs").exists()


def test_teacher_and_no_teacher_together_are_refused():
    from atelier.cli import app

    result = CliRunner().invoke(
        app, ["specialist", "improve", "hx", "--from-feedback", "--teacher", "openai:test-model", "--no-teacher"]
    )
    assert isinstance(result.exception, AtelierError) and "contradict" in str(result.exception)
