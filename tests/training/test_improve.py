"""`specialist improve` end to end on scratch:tiny: simulated use through the real feedback store,
a real DPO round continuing the adapter, the regression gate on real evaluations, the registry."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from atelier.errors import AtelierError
from atelier.feedback import FeedbackStore
from specialists.registry import Registry

EXAM = Path(__file__).resolve().parents[2] / "bench" / "exams" / "hx-pumps.jsonl"
ACCEPTED = {"accepted": True, "beats_base": False, "reasons": [], "stages": {}, "final_stage": "sft"}


@pytest.fixture
def tiny_specialist(atelier_home, dapt_result, sft_result, small_data, tmp_path):
    """Specialist `hx` v1: the DAPT-trained tiny base + the SFT adapter, its run's held-out split in place."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "data").symlink_to(small_data, target_is_directory=True)
    config = {"eval": {"max_perplexity_texts": 40, "max_mcq_items": 40}}
    return Registry(atelier_home).register(
        "hx", base_model=str(dapt_result.model_path), adapter_dir=sft_result.adapter_path, eval_report=ACCEPTED,
        run_dir=run_dir, config=config, keywords=["pump"])


def test_simulated_use_fixes_corrected_questions_without_regressing(tiny_specialist, atelier_home, tmp_path):
    from eval.exam import read_exam
    from training.config import SpecialistConfig
    from training.dpo import DpoConfig
    from training.improve import ImproveConfig, improve
    from training.improve_sim import compare_versions, record_use, split_exam_file

    train_half, other_half = split_exam_file(EXAM, tmp_path, seed=0)
    store = FeedbackStore(atelier_home / "feedback.sqlite")
    try:
        use = record_use("hx", read_exam(train_half), store, home=atelier_home)
        # feedback on another route never trains hx
        store.record_exchange("chatcmpl-search", "t", "atelier", "What is NPSH?", "NPSH is ...", "search", "u")
        store.add("chatcmpl-search", "down", owner="u", correction="Net positive suction head.")
    finally:
        store.close()
    assert use["asked"] == 40 and len(use["corrected"]) >= 30  # the tiny model knows nothing yet

    started = time.perf_counter()
    gentle = ImproveConfig(dpo=DpoConfig(max_steps=30, learning_rate=1e-4, eval_heldout=False))
    result = improve("hx", gentle, from_feedback=True, exam=other_half, home=atelier_home)
    seconds = time.perf_counter() - started
    assert result.activated, result.verdict.reasons
    record = Registry(atelier_home).get("hx")
    assert (record.version, record.parent_version) == (2, 1)
    assert set(record.lineage["feedback_ids"]) <= set(use["feedback_ids"])
    assert len(record.lineage["feedback_ids"]) >= 30 and record.lineage["gate"]["accepted"] is True
    trained_on = Path(result.run_dir, "data/dpo/train.jsonl").read_text(encoding="utf-8")
    assert all(json.loads(line)["rejected"][0]["content"] for line in trained_on.splitlines())
    assert "What is NPSH?" not in trained_on

    eval_config = SpecialistConfig().eval.model_copy(update={"exam_max_new_tokens": 16})
    v1, v2 = Registry(atelier_home).get("hx", 1), record
    before, after = (v1.base_model, [v1.adapter_path]), (v2.base_model, [v2.adapter_path])
    trained = compare_versions(before, after, read_exam(train_half), eval_config, use["corrected"])
    other = compare_versions(before, after, read_exam(other_half), eval_config)
    paired = trained["paired"]["specialist_vs_base"]
    print(f"\nround {seconds:.1f} s; training half MCQ {trained['systems']['base']['mcq_accuracy']} -> "
          f"{trained['systems']['specialist']['mcq_accuracy']} (delta {paired['mcq_delta']} {paired['mcq_delta_ci']}, "
          f"p {paired['mcq_p_value']}); fixed {trained['corrected']}; other half gate {other['gate']['accepted']} "
          f"{other['paired']['specialist_vs_base']}; heldout {result.verdict.sets['heldout'].tests}")
    assert trained["corrected"]["mcq_accuracy_fixed"] >= 0.2 * len(use["corrected"])
    assert paired["mcq_delta"] > 0 and paired["mcq_p_value"] < 0.05  # a measurable share, not noise
    assert other["gate"]["accepted"] and not result.verdict.sets["heldout"].regressed


def test_a_candidate_that_regresses_is_kept_but_never_activated(tiny_specialist, atelier_home, tmp_path):
    from training.dpo import DpoConfig
    from training.improve import ImproveConfig, improve

    pairs = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"What torque does bolt B-{i} need?", "chosen": f"{i} N·m", "rejected": f"{i + 7} N·m"}
            for i in range(12)]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    wrecking = ImproveConfig(dpo=DpoConfig(max_steps=15, learning_rate=0.3, eval_heldout=False))  # forced regression
    result = improve("hx", wrecking, from_feedback=False, pair_files=[pairs], home=atelier_home)
    registry = Registry(atelier_home)
    assert not result.activated and registry.current_version("hx") == 1
    assert registry.candidates("hx") == [2]
    candidate = registry.get("hx", 2)
    assert candidate.candidate and any(r.startswith("heldout") for r in candidate.candidate_reasons)
    assert candidate.lineage["pair_files"] == {str(pairs.resolve()): __import__("hashlib").sha256(
        pairs.read_bytes()).hexdigest()}
    assert [s.name for s in registry.list()] == ["hx"] and registry.list()[0].version == 1

    from typer.testing import CliRunner

    from specialists.cli import specialist_app

    shown = CliRunner().invoke(specialist_app, ["show", "hx", "--candidates"])
    assert shown.exit_code == 0 and "v2 (candidate, from v1" in shown.output and "heldout" in shown.output
    with pytest.raises(AtelierError, match="no version before v1"):
        registry.rollback("hx")
