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


@pytest.mark.timeout(900)  # about a minute on a quiet machine; several when the cores are shared
def test_simulated_use_trains_on_the_corrections_and_the_gate_decides(tiny_specialist, atelier_home, tmp_path):
    """The loop on scratch:tiny: 40 exam questions asked through the runtime, rated in the real feedback store,
    one DPO round, the gate on the held-out split, the other exam half and the feedback items.

    The toy base cannot learn 40 facts in a short round without hurting its perplexity (measured: +20-200% for
    every setting tried), so what must hold here is the loop, not the quality: the round learned the
    corrections as preferences (significantly), and the gate's verdict follows its rule from what it
    measured. Fixing facts is measured on SmolLM2 in bench/improve_bench.py."""
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
    config = ImproveConfig(dpo=DpoConfig(max_steps=20, learning_rate=5e-4, sft_weight=1.0, eval_heldout=False))
    result = improve("hx", config, from_feedback=True, exam=other_half, home=atelier_home)
    seconds = time.perf_counter() - started
    verdict, registry = result.verdict, Registry(atelier_home)
    record = registry.get("hx", result.record.version)
    assert (record.version, record.parent_version) == (2, 1)
    assert set(record.lineage["feedback_ids"]) <= set(use["feedback_ids"]) and len(record.lineage["feedback_ids"]) >= 30
    trained_on = Path(result.run_dir, "data/dpo/train.jsonl").read_text(encoding="utf-8")
    assert len(trained_on.splitlines()) == record.lineage["pairs"]["train"] and "What is NPSH?" not in trained_on
    assert record.lineage["data_sha256"]["dpo/train.jsonl"] == __import__("hashlib").sha256(
        trained_on.encode()).hexdigest()

    assert set(verdict.sets) == {"heldout", "feedback", "feedback_heldout", "exam"}
    learned = verdict.sets["feedback"].tests["preference_accuracy"]
    assert learned.specialist > learned.base and learned.p_value < 0.05, learned.sentence()
    assert verdict.sets["feedback_heldout"].tests["preference_accuracy"].n == record.lineage["pairs"]["heldout"] > 0
    regressed = [r for s in verdict.sets.values() if s.name != "feedback" for r in s.regressed]
    assert verdict.accepted == (not regressed and verdict.sets["feedback"].tests["mcq_accuracy"].delta > 0)
    assert record.candidate == (not verdict.accepted) and registry.current_version("hx") == (2 if verdict.accepted
                                                                                              else 1)

    eval_config = SpecialistConfig().eval.model_copy(update={"exam_max_new_tokens": 16})
    v1 = registry.get("hx", 1)
    trained = compare_versions((v1.base_model, [v1.adapter_path]), (record.base_model, [record.adapter_path]),
                               read_exam(train_half), eval_config, use["corrected"])
    assert trained["corrected"]["n"] == len(use["corrected"]) and trained["systems"]["specialist"]["mcq_n"] == 40
    paired = trained["paired"]["specialist_vs_base"]
    print(f"\nround {seconds:.1f} s ({result.timings}); training half MCQ "
          f"{trained['systems']['base']['mcq_accuracy']} -> {trained['systems']['specialist']['mcq_accuracy']} "
          f"(delta {paired['mcq_delta']} {paired['mcq_delta_ci']}, p {paired['mcq_p_value']}), fixed "
          f"{trained['corrected']}; gate: " + "; ".join(f"{n} {m} {t.base:.3g} -> {t.specialist:.3g} "
                                                        f"{t.delta_ci} p={t.p_value:.3g}" for n, s in
                                                        verdict.sets.items() for m, t in s.tests.items()))


def test_a_candidate_that_regresses_is_kept_but_never_activated(tiny_specialist, atelier_home, tmp_path):
    from training.dpo import DpoConfig
    from training.improve import ImproveConfig, improve

    pairs = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"What torque does bolt B-{i} need?", "chosen": f"{i} N·m", "rejected": f"{i + 7} N·m"}
            for i in range(12)]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    wrecking = ImproveConfig(replay=0.5, dpo=DpoConfig(max_steps=15, learning_rate=0.3, eval_heldout=False))  # forced
    result = improve("hx", wrecking, from_feedback=False, pair_files=[pairs], home=atelier_home)  # regression
    trained = [json.loads(line) for line in Path(result.run_dir, "data/dpo/train.jsonl").read_text().splitlines()]
    triple = lambda row: json.dumps([row["prompt"], row["chosen"], row["rejected"]])
    own = {triple(json.loads(line)) for line in Path(tiny_specialist.run_dir, "data/dpo/train.jsonl").read_text(
        encoding="utf-8").splitlines()}
    replayed = [r for r in trained if r["source"] == "replay"]
    assert len(trained) == 18 and len(replayed) == 6 == result.record.lineage["pairs"]["replay"]
    assert all(triple(r) in own for r in replayed)  # rehearsal: the specialist's own training pairs
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
    refused = CliRunner().invoke(specialist_app, ["activate", "hx", "2"])
    assert refused.exit_code != 0 and "regression gate refused" in str(refused.exception)
    assert registry.current_version("hx") == 1
    forced = CliRunner().invoke(specialist_app, ["activate", "hx", "2", "--force"])
    assert forced.exit_code == 0 and "v1 -> v2 (a refused candidate)" in forced.output
    assert registry.current_version("hx") == 2 and registry.activate("hx", 1).version == 1
    with pytest.raises(AtelierError, match="no version 7"):
        registry.activate("hx", 7)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_round_on_100_pairs_takes_under_two_minutes(tiny_specialist, atelier_home, tmp_path):
    """The issue's budget: pairs, a DPO round (the recipe's 60 steps for a scratch base) and the gate."""
    from tests.training.conftest import make_data_dir
    from training.improve import ImproveConfig, improve

    data = make_data_dir(tmp_path / "data", n_sft=200, n_dpo=120)
    rows = [json.loads(line) for split in ("train", "heldout")
            for line in (data / "dpo" / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()][:100]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({k: r[k] for k in ("prompt", "chosen", "rejected")}) + "\n" for r in rows),
                     encoding="utf-8")
    started = time.perf_counter()
    result = improve("hx", ImproveConfig(), from_feedback=False, pair_files=[pairs], home=atelier_home)
    seconds = time.perf_counter() - started
    print(f"\n100 pairs: {seconds:.1f} s ({result.timings}), {result.record.lineage['pairs']}")
    assert result.record.lineage["pairs"]["train"] >= 90 and result.record.parent_version == 1
    assert seconds < 120
