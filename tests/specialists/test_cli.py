"""`atelier specialist list/show/remove/rollback` (named so as not to clash with tests/test_cli.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from atelier.errors import AtelierError
from eval.report import compare
from specialists.cli import specialist_app
from specialists.registry import Registry

REPORT = compare({"perplexity": 400.0, "mcq_accuracy": 0.25}, {"dapt": {"perplexity": 90.0, "mcq_accuracy": 0.3},
                                                              "sft": {"perplexity": 40.0, "mcq_accuracy": 0.6}})
# The root CLI as the lead wires it: the group mounted on `atelier`, errors turned into one line.
MOUNTED = ("import sys; from atelier.cli import app, main; from specialists.cli import register; register(app)\n"
           "sys.argv = ['atelier', *sys.argv[1:]]\n"
           "try:\n    main()\nfinally:\n"
           "    print('HEAVY', [m for m in ('torch', 'transformers', 'peft') if m in sys.modules], file=sys.stderr)\n")

runner = CliRunner()


@pytest.fixture
def adapter(tmp_path):
    """A LoRA-shaped adapter written with safetensors' numpy API (keeps this test torch-free)."""
    import numpy as np
    from safetensors.numpy import save_file

    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    rng = np.random.default_rng(0)
    save_file({"base_model.model.layers.0.self_attn.q_proj.lora_A.weight": rng.normal(size=(4, 32)).astype("float32"),
               "base_model.model.layers.0.self_attn.q_proj.lora_B.weight": np.zeros((32, 4), dtype="float32")},
              folder / "adapter_model.safetensors")
    return folder


@pytest.fixture
def registered(adapter):
    registry = Registry()
    for name in ("pumps", "pumps", "valves"):
        registry.register(name, base_model="tiny-llama", keywords=[name[:-1], "seal"], eval_report=REPORT.to_dict(),
                          adapter_dir=adapter, route_exemplars=[f"How do I service the {name}?"])
    return registry


def _ok(*args, **kw):
    result = runner.invoke(specialist_app, list(args), **kw)
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


def test_list_when_empty():
    assert "no specialists registered yet" in _ok("list")
    assert json.loads(_ok("list", "--json")) == []


def test_list_table_and_json(registered):
    table = _ok("list")
    for expected in ("pumps", "valves", "v2 of 2", "v1 of 1", "tiny-llama", "400 → 40", "0.25 → 0.6"):
        assert expected in table
    records = json.loads(_ok("list", "--json"))
    assert [(r["name"], r["version"]) for r in records] == [("pumps", 2), ("valves", 1)]


def test_show_json_prints_the_whole_record(registered):
    record = json.loads(_ok("show", "pumps", "--json"))
    assert record["version"] == 2 and record["eval_report"]["stages"]["sft"]["perplexity"] == 40.0
    assert record["route_exemplars"] == ["How do I service the pumps?"]
    assert record["adapter_path"].endswith("specialists/pumps/v2/adapter")
    assert json.loads(_ok("show", "pumps", "--version", "1", "--json"))["version"] == 1
    text = _ok("show", "pumps")
    assert "pumps v2 (active)" in text and "Specialist in pump, seal" in text and "mcq_accuracy" in text


def test_rollback_then_remove(registered):
    assert "pumps: active version v2 -> v1" in _ok("rollback", "pumps")
    assert json.loads(_ok("show", "pumps", "--json"))["version"] == 1
    refused = runner.invoke(specialist_app, ["remove", "pumps"], input="n\n")
    assert refused.exit_code == 1 and "nothing removed" in refused.output and "pumps" in registered.names()
    assert "removed specialist 'pumps'" in _ok("remove", "pumps", input="y\n")
    assert "removed specialist 'valves'" in _ok("remove", "valves", "--yes")
    assert registered.names() == []


@pytest.mark.parametrize("args", [["show", "nope"], ["rollback", "nope"], ["remove", "nope", "--yes"]])
def test_unknown_names_list_the_known_ones(registered, args):
    result = runner.invoke(specialist_app, args)
    assert isinstance(result.exception, AtelierError)
    assert str(result.exception) == "no specialist named 'nope' (known: pumps, valves)"


def test_mounted_errors_are_one_line_and_torch_stays_out(registered, atelier_home):
    result = subprocess.run([sys.executable, "-c", MOUNTED, "specialist", "show", "nope"],
                            check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        "error: no specialist named 'nope' (known: pumps, valves)"]
    listed = subprocess.run([sys.executable, "-c", MOUNTED, "specialist", "list"],
                            check=False, capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and "pumps" in listed.stdout
    assert "HEAVY []" in listed.stderr and "HEAVY []" in result.stderr
