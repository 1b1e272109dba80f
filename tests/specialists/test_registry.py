"""The registry: the evaluation gate, adapter validation, versions, rollback, removal, crash safety."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from atelier.errors import AtelierError
from eval.report import compare
from specialists import registry as registry_module
from specialists.registry import MIN_WEIGHTS_BYTES, Registry, sha256_file


def _metrics(ppl: float, right: int, n: int = 40) -> dict:
    """Metrics with per-item outcomes (the first `right` MCQ items right), as the evaluation writes them."""
    import math

    return {"perplexity": ppl, "mcq_accuracy": right / n,
            "outcomes": {"mcq_accuracy": [int(i < right) for i in range(n)],
                         "perplexity": [[math.log(ppl) * (90 + i), 90 + i] for i in range(10)]}}


BEATS = compare(_metrics(400.0, 10), {"sft": _metrics(40.0, 24)})
LOSES = compare(_metrics(400.0, 10), {"sft": _metrics(450.0, 2)})


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """A real PEFT LoRA adapter and the full tiny Llama it was made for."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("artifacts")
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64))
    base.save_pretrained(out / "model")
    get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(out / "adapter")
    (out / "adapter" / "checkpoint-10").mkdir()  # trainer leftovers that must not be copied
    (out / "adapter" / "checkpoint-10" / "optimizer.pt").write_bytes(b"x" * 100)
    return out


@pytest.fixture
def registry(atelier_home):
    return Registry()


def _register(registry, adapter, name="pumps", report=BEATS, **kw):
    return registry.register(name, base_model="tiny-llama", keywords=["pump", "valve", "seal"],
                             eval_report=report.to_dict(), adapter_dir=adapter, route_exemplars=["How do I bleed a pump?"],
                             data_manifest_hashes={"sft": "abc"}, config={"lora_r": 4}, **kw)


def _corrupt(tmp_path, artifacts, how: str):
    """A copy of the good adapter with one thing broken."""
    bad = tmp_path / f"bad-{how}"
    shutil.copytree(artifacts / "adapter", bad)
    weights = bad / "adapter_model.safetensors"
    if how == "40-bytes":
        weights.write_bytes(b"(\x00\x00\x00\x00\x00\x00\x00" + b'{"__metadata__":{"format":"pt"}}')
    elif how == "no-tensors":
        header = json.dumps({"__metadata__": {"format": "pt", "pad": "x" * 2000}}).encode()
        weights.write_bytes(len(header).to_bytes(8, "little") + header)
    elif how == "empty-tensor":
        import numpy as np
        from safetensors.numpy import save_file

        save_file({"lora_A": np.zeros((4, 0), dtype=np.float32), "pad": np.ones((300,), dtype=np.float32)}, weights)
    elif how == "garbage":
        weights.write_bytes(b"\x07" * 4096)
    elif how == "bad-config":
        (bad / "adapter_config.json").write_text("{not json")
    elif how == "no-weights":
        weights.unlink()
    return bad


def test_refuses_a_specialist_that_does_not_beat_its_base(registry, artifacts):
    with pytest.raises(AtelierError) as caught:
        _register(registry, artifacts / "adapter", report=LOSES)
    message = str(caught.value)
    assert "is refused on the held-out split" in message and "significantly worse" in message
    assert "perplexity" in message and "mcq_accuracy" in message
    assert "--force" in message
    assert registry.names() == [] and not (registry.root / "pumps").exists()
    with pytest.raises(AtelierError, match="no evaluation"):
        registry.register("pumps", base_model="b", eval_report={}, adapter_dir=artifacts / "adapter")


def test_force_registers_and_copies_the_adapter_in(registry, artifacts, atelier_home):
    record = _register(registry, artifacts / "adapter", report=LOSES, force=True)
    assert record.forced and record.version == 1 and not record.full_model
    assert record.description == "Specialist in pump, valve, seal"
    copied = registry.root / "pumps" / "v1" / "adapter"
    assert record.adapter_path == str(copied) and copied.is_relative_to(atelier_home)
    assert sorted(p.name for p in copied.iterdir()) == sorted(
        p.name for p in (artifacts / "adapter").iterdir() if p.is_file())  # no checkpoint folders
    assert record.adapter_sha256 == sha256_file(artifacts / "adapter" / "adapter_model.safetensors")
    on_disk = json.loads((registry.root / "pumps" / "v1" / "record.json").read_text())
    assert on_disk["adapter_path"] == "adapter", "stored relative, so the home folder can move"
    assert on_disk["eval_report"]["beats_base"] is False and on_disk["route_exemplars"] == ["How do I bleed a pump?"]
    assert (registry.root / "pumps" / "current").read_text().strip() == "1"
    assert registry.get("pumps") == record


@pytest.mark.parametrize("how", ["40-bytes", "no-tensors", "empty-tensor", "garbage", "bad-config", "no-weights"])
def test_broken_adapters_are_rejected_before_anything_is_written(registry, artifacts, tmp_path, how):
    _register(registry, artifacts / "adapter")
    before = sorted(p.relative_to(registry.root) for p in registry.root.rglob("*"))
    with pytest.raises(AtelierError) as caught:
        _register(registry, _corrupt(tmp_path, artifacts, how), force=True)
    assert "re-save" in str(caught.value) or "save the adapter" in str(caught.value)
    assert sorted(p.relative_to(registry.root) for p in registry.root.rglob("*")) == before
    assert registry.versions("pumps") == [1] and registry.current_version("pumps") == 1
    with pytest.raises(AtelierError):
        _register(registry, _corrupt(tmp_path / "new", artifacts, how), name="fresh", force=True)
    assert registry.names() == ["pumps"] and not (registry.root / "fresh").exists()


def test_tiny_file_message_names_the_zero3_symptom(registry, artifacts, tmp_path):
    with pytest.raises(AtelierError, match="only 40 bytes.*ZeRO-3"):
        _register(registry, _corrupt(tmp_path, artifacts, "40-bytes"))
    assert MIN_WEIGHTS_BYTES > 40


def test_versions_increment_rollback_and_remove(registry, artifacts):
    for _ in range(3):
        _register(registry, artifacts / "adapter")
    assert registry.versions("pumps") == [1, 2, 3] and registry.get("pumps").version == 3
    assert registry.get("pumps", 1).version == 1
    assert registry.rollback("pumps").version == 2 and registry.get("pumps").version == 2
    assert registry.rollback("pumps").version == 1
    with pytest.raises(AtelierError, match="no version before v1"):
        registry.rollback("pumps")
    assert _register(registry, artifacts / "adapter").version == 4, "a new version never reuses a number"
    _register(registry, artifacts / "adapter", name="valves")
    assert [r.name for r in registry.list()] == ["pumps", "valves"]
    registry.remove("pumps")
    assert registry.names() == ["valves"] and not (registry.root / "pumps").exists()
    assert not [p for p in registry.root.iterdir() if p.name.startswith(".trash")]
    with pytest.raises(AtelierError, match=r"no specialist named 'pumps' \(known: valves\)"):
        registry.get("pumps")
    with pytest.raises(AtelierError, match="has no version 9; versions: 1"):
        registry.get("valves", 9)


def test_a_crash_while_copying_leaves_no_record(registry, artifacts, monkeypatch):
    _register(registry, artifacts / "adapter")
    real_copy = registry_module.shutil.copyfile
    calls = []

    def copy_then_die(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_copy(src, dst)

    monkeypatch.setattr(registry_module.shutil, "copyfile", copy_then_die)
    with pytest.raises(OSError, match="disk full"):
        _register(registry, artifacts / "adapter")
    assert registry.versions("pumps") == [1] and registry.current_version("pumps") == 1
    assert sorted(p.name for p in (registry.root / "pumps").iterdir()) == [".lock", "current", "v1"]
    calls.clear()
    with pytest.raises(OSError):
        _register(registry, artifacts / "adapter", name="brand-new")
    assert registry.names() == ["pumps"] and not (registry.root / "brand-new").exists()


def test_a_crash_before_current_moves_keeps_the_old_version_active(registry, artifacts, monkeypatch):
    _register(registry, artifacts / "adapter")
    real_write = registry_module.atomic_write_text

    def write(path, text):
        if path.name == "current":
            raise KeyboardInterrupt
        return real_write(path, text)

    monkeypatch.setattr(registry_module, "atomic_write_text", write)
    with pytest.raises(KeyboardInterrupt):
        _register(registry, artifacts / "adapter")
    monkeypatch.undo()
    assert registry.get("pumps").version == 1, "the new version is complete on disk but not active"
    assert _register(registry, artifacts / "adapter").version == 3


def test_full_models_are_registered_with_their_weights(registry, artifacts):
    record = registry.register("scratch", base_model="none", eval_report=BEATS.to_dict(), model_dir=artifacts / "model")
    assert record.full_model and record.adapter_path is None and record.adapter_sha256 is None
    assert (registry.root / "scratch" / "v1" / "model" / "config.json").is_file()
    assert record.model_path == str(registry.root / "scratch" / "v1" / "model")
    assert record.model_sha256 == sha256_file(artifacts / "model" / "model.safetensors")
    with pytest.raises(AtelierError, match="exactly one"):
        registry.register("x", base_model="b", eval_report=BEATS.to_dict())


@pytest.mark.parametrize("name", ["Pumps", "bad name", "../up", "", "-lead", "x" * 65, "ünï", "pumps\n"])
def test_names_are_validated(registry, artifacts, name):
    with pytest.raises(AtelierError, match="lowercase letters, digits"):
        _register(registry, artifacts / "adapter", name=name)
    assert registry.names() == []


def test_noise_is_accepted_with_a_warning_and_the_exam_gate_can_refuse(registry, artifacts):
    noise = compare(_metrics(400.0, 12), {"sft": _metrics(300.0, 11)})
    record = _register(registry, artifacts / "adapter", report=noise)
    assert not record.forced and record.eval_report.accepted and not record.eval_report.beats_base
    assert record.eval_report.verdict == "accepted" and record.exam_report is None and record.exam_sha256 is None
    exam = {"exam": "my-exam.jsonl", "exam_sha256": "f" * 64,
            "gate": {"accepted": False, "significant": False, "reasons": ["mcq_accuracy: significantly worse"],
                     "warnings": [], "tests": {}}}
    with pytest.raises(AtelierError, match="refused on the exam my-exam.jsonl: mcq_accuracy: significantly worse"):
        _register(registry, artifacts / "adapter", report=BEATS, exam_report=exam)
    assert registry.versions("pumps") == [1]
    forced = _register(registry, artifacts / "adapter", report=BEATS, exam_report=exam, force=True)
    assert forced.forced and forced.exam_sha256 == "f" * 64 and forced.exam_report.exam == "my-exam.jsonl"
    passed = {**exam, "gate": {**exam["gate"], "accepted": True, "reasons": []}}
    assert not _register(registry, artifacts / "adapter", report=BEATS, exam_report=passed).forced


def test_a_record_is_registered_again_from_itself_with_only_the_changes(registry, artifacts):
    first = _register(registry, artifacts / "adapter", exam_report={"exam": "e.jsonl", "exam_sha256": "e" * 64,
                                                                     "gate": {"accepted": True}, "systems": {"x": 1}})
    again = registry.register_from(first, served_by="ollama:pumps")
    assert (again.version, again.served_by, registry.current_version("pumps")) == (2, "ollama:pumps", 2)
    same = {"version", "created_at", "served_by", "adapter_path"}
    assert again.model_dump(exclude=same) == first.model_dump(exclude=same)
    assert again.exam_report.systems == {"x": 1}  # the untyped part of an exam summary is kept as it came
    assert Path(again.adapter_path) == registry.root / "pumps" / "v2" / "adapter"
    assert sha256_file(Path(again.adapter_path) / "adapter_model.safetensors") == first.adapter_sha256
    with pytest.raises(AtelierError, match="refused on the held-out split"):  # the gate applies to the changes too
        registry.register_from(again, eval_report=LOSES)
    assert registry.versions("pumps") == [1, 2]


def test_records_written_before_the_statistical_gate_still_load(registry, artifacts):
    record = _register(registry, artifacts / "adapter")
    path = registry.root / "pumps" / "v1" / "record.json"
    old = json.loads(path.read_text())
    for key in ("exam_report", "exam_sha256"):
        old.pop(key)
    old["eval_report"] = {"stages": {"base": {"perplexity": 400.0}, "sft": {"perplexity": 40.0}}, "final_stage": "sft",
                          "beats_base": True, "reasons": ["sft beats the base"]}
    path.write_text(json.dumps(old))
    loaded = registry.get("pumps")
    assert loaded.exam_report is None and loaded.adapter_sha256 == record.adapter_sha256
    assert loaded.eval_report.accepted is None and loaded.eval_report.is_accepted  # falls back to beats_base
    assert registry_module.gate_refusal(loaded.eval_report) is None
    refused = loaded.eval_report.model_copy(update={"beats_base": False})
    assert registry_module.gate_refusal(refused) == "on the held-out split: sft beats the base"
    old["eval_report"], old["exam_report"] = {}, {}  # how records said "none" before the typed reports
    path.write_text(json.dumps(old))
    assert registry.get("pumps").eval_report is None and registry.get("pumps").exam_report is None


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbled", "wrong-name", "current"])
def test_a_corrupt_record_is_skipped_with_a_warning_and_the_rest_keeps_working(registry, artifacts, damage, caplog):
    """Probe of the hardening issue: one damaged record.json took `specialist list`, the router and the API down."""
    from typer.testing import CliRunner

    from atelier.cli import app

    _register(registry, artifacts / "adapter", name="pumps")
    _register(registry, artifacts / "adapter", name="valves")
    path = registry.root / "pumps" / "v1" / "record.json"
    secret = path.read_text()
    if damage == "truncated":
        path.write_text(secret[: len(secret) // 2])
    elif damage == "empty":
        path.write_text("")
    elif damage == "garbled":
        path.write_bytes(b"\xff\xfe\x00garbage" * 10)
    elif damage == "wrong-name":
        path.write_text(secret.replace('"name": "pumps"', '"name": "valves"'))
    else:
        (registry.root / "pumps" / "current").write_bytes(b"\xff\x00")
    with caplog.at_level("WARNING", logger="specialists.registry"):
        assert [r.name for r in registry.list()] == ["valves"]
        assert [r.name for r in registry.list()] == ["valves"]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "'pumps'" in warnings[0]  # once, naming the specialist ...
    assert ("current" if damage == "current" else "record.json") in warnings[0]  # ... and the file
    assert "base_model" not in warnings[0] and "tiny-llama" not in warnings[0]  # never the contents
    with pytest.raises(AtelierError, match="register the specialist again|write a version number"):
        registry.get("pumps")

    listed = CliRunner().invoke(app, ["specialist", "list", "--json"])
    assert listed.exit_code == 0 and [r["name"] for r in json.loads(listed.stdout)] == ["valves"]
    checked = CliRunner().invoke(app, ["doctor", "--json"])
    assert checked.exit_code == 1
    report = json.loads(checked.stdout)
    problems = [f for f in report["findings"] if not f["ok"]]
    assert len(problems) == 1 and "pumps" in problems[0]["path"]
    assert [f["message"] for f in report["findings"] if f["ok"]] == ["valves v1 (active): record and weights ok"]


def test_doctor_finds_tampered_weights_and_damaged_databases(registry, artifacts, atelier_home):
    from typer.testing import CliRunner

    from atelier.cli import app

    record = _register(registry, artifacts / "adapter")
    healthy = CliRunner().invoke(app, ["doctor"])
    assert healthy.exit_code == 0 and "0 problem(s)" in healthy.stdout
    weights = registry.root / "pumps" / "v1" / "adapter" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    (atelier_home / "memory.sqlite").write_bytes(b"not a database" * 100)
    result = CliRunner().invoke(app, ["doctor"])
    assert result.exit_code == 1 and "2 problem(s)" in result.stdout
    assert "does not match the SHA-256" in result.stdout and "memory.sqlite" in result.stdout
    assert record.adapter_sha256 not in result.stdout


def test_a_full_model_whose_weights_changed_is_refused(registry, artifacts):
    from specialists.registry import check_model_files

    record = registry.register("scratch", base_model="scratch:tiny", eval_report=BEATS.to_dict(),
                               model_dir=artifacts / "model")
    assert check_model_files(record) == registry.root / "scratch" / "v1" / "model"
    weights = registry.root / "scratch" / "v1" / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(AtelierError, match="do not match the SHA-256"):
        check_model_files(registry.get("scratch"))
