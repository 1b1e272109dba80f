"""`atelier eval specialist` end to end on a tiny registered specialist: the table, --json, --out."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tinymodels import build_adapter, build_base, build_tokenizer

EXAM = Path(__file__).resolve().parents[2] / "bench" / "exams" / "hx-pumps.jsonl"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-specialist")
    tokenizer = build_tokenizer()
    build_base(root / "base", tokenizer, seed=0)
    build_base(root / "other", tokenizer, seed=5)
    build_adapter(root / "base", root / "adapter", seed=1)
    return root


@pytest.fixture
def registered(tiny, atelier_home):
    from specialists.registry import Registry

    Registry().register("pumps", base_model=str(tiny / "base"), eval_report={}, adapter_dir=tiny / "adapter",
                        force=True)
    return tiny


def _exam(tmp_path, n=12):
    lines = EXAM.read_text(encoding="utf-8").splitlines()[:n] + ["{broken"]
    path = tmp_path / "exam.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_json_table_and_report_files(registered, tmp_path):
    from atelier.cli import app

    config = tmp_path / "eval.yaml"
    config.write_text("max_new_tokens: 6\nbatch_size: 8\n")
    args = ["eval", "specialist", "pumps", "--exam", str(_exam(tmp_path)), "--against", str(registered / "other"),
            "--config", str(config)]
    result = CliRunner().invoke(app, [*args, "--json", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["items"] == 12 and data["mcq_items"] == 12 and data["problems"] == ["line 13: not valid JSON "
                                                                                   "(Expecting property name enclosed in double quotes)"]
    assert list(data["systems"]) == ["base", "specialist", str(registered / "other")]
    for s in data["systems"].values():
        assert 0 <= s["mcq_accuracy"] <= 1 and s["mcq_ci"][0] <= s["mcq_accuracy"] <= s["mcq_ci"][1]
        assert s["n"] == 12 and s["open_n"] == 12
    assert set(data["paired"]) == {"specialist_vs_base", f"specialist_vs_{registered / 'other'}"}
    assert 0 <= data["paired"]["specialist_vs_base"]["p_value"] <= 1
    flips = data["flips"]
    assert set(flips["base_right_specialist_wrong"]) | set(flips["base_wrong_specialist_right"]) <= {
        f"q{k:02d}" for k in range(1, 13)}
    out = tmp_path / "out"
    assert json.loads((out / "exam.json").read_text())["systems"] == data["systems"]
    assert (out / "exam.png").read_bytes()[:4] == b"\x89PNG"
    assert "| system |" in (out / "exam.md").read_text() and "## By kind" in (out / "exam.md").read_text()
    rows = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and set(rows[0]) >= {"id", "question", "answer", "base", "specialist"}
    assert rows[0]["specialist"]["choice"] in range(4)

    table = CliRunner().invoke(app, args)
    assert table.exit_code == 0, table.output
    assert "specialist vs base" in table.stdout and "flips (mcq_accuracy)" in table.stdout


def test_prompt_sharing_gives_the_same_scores_as_one_sequence_per_option(tiny):
    from eval.scoring import score_options
    from eval.specialist import chat_ids, load_for_eval, text_ids

    model, tokenizer = load_for_eval(tiny / "base")
    questions = ["What torque for the HX-65 impeller nut?", "E14?", "How much oil does the BF-2 frame take?"]
    options = [["80 N·m", "65 N·m", "150 N·m", "45 N·m"], ["Dry-run protection", "Low suction pressure", "x", "y z"],
               ["0.55 L", "1.2 L", "0.35 L", "0.75 L"]]
    prompts = [chat_ids(tokenizer, [{"role": "user", "content": q}]) for q in questions]
    ids = [[text_ids(tokenizer, o) for o in opts] for opts in options]
    shared = score_options(model, prompts, ids, 5, tokenizer.pad_token_id, 256)
    separate = score_options(model, prompts, ids, 5, tokenizer.pad_token_id, 256, share_prefix=False)
    assert [[n for _, n in row] for row in shared] == [[len(o) for o in row] for row in ids]
    for row_a, row_b in zip(shared, separate):
        for (a, _), (b, _) in zip(row_a, row_b):
            assert a == pytest.approx(b, abs=1e-4)
    assert len({round(lp, 3) for row in shared for lp, _ in row}) > 6, "the options really score differently"


def test_pmi_scoring_subtracts_what_each_option_scores_after_a_neutral_prompt(tiny):
    from eval.scoring import score_continuations
    from eval.specialist import NEUTRAL_PROMPT, SpecialistEvalConfig, chat_ids, choice_scores, load_for_eval, text_ids

    model, tokenizer = load_for_eval(tiny / "base")
    prompts = [[{"role": "user", "content": q}] for q in ("Impeller nut torque on the HX-65?", "E14?")]
    options = [["80 N·m", "65 N·m", "150 N·m"], ["Dry-run protection", "80 N·m", "Earth fault"]]
    config = SpecialistEvalConfig(batch_size=1)  # 4 options per neutral row: three rows over five distinct options
    pmi = choice_scores(model, tokenizer, prompts, options, config.model_copy(update={"mcq_normalization": "pmi"}))
    raw = choice_scores(model, tokenizer, prompts, options, config.model_copy(update={"mcq_normalization": "none"}))
    neutral = chat_ids(tokenizer, NEUTRAL_PROMPT)
    for pmi_row, raw_row, opts in zip(pmi, raw, options):
        prior = score_continuations(model, [(neutral, text_ids(tokenizer, o)) for o in opts], 4,
                                    tokenizer.pad_token_id, 256)
        for p, r, (lp, _) in zip(pmi_row, raw_row, prior):
            assert p == pytest.approx(r - lp, abs=1e-3)
    # the same option after the same neutral prior: PMI moves it by the same amount in both questions
    assert pmi[0][0] - raw[0][0] == pytest.approx(pmi[1][1] - raw[1][1], abs=1e-4) and pmi[0][0] != raw[0][0]


@pytest.mark.parametrize("args, message", [
    (["eval", "specialist", "nobody"], "no specialist named 'nobody'"),
    (["eval", "specialist", "pumps", "--exam", "/no/such.jsonl"], "cannot read the exam"),
    (["eval", "specialist", "pumps", "--against", "scratch:tiny", "--exam", str(EXAM)], "pass a pretrained base"),
    (["eval", "specialist", "pumps"], "pass --exam FILE.jsonl"),
])
def test_user_mistakes_are_one_line_errors(registered, args, message):
    """An AtelierError, which `atelier.cli.main` prints as one `error:` line (tests/test_cli.py checks that)."""
    from atelier.cli import app
    from atelier.errors import AtelierError

    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0 and isinstance(result.exception, AtelierError)
    assert message in str(result.exception) and "\n" not in str(result.exception)


def test_exam_gate_is_what_the_registry_checks(tiny, tmp_path, atelier_home):
    from atelier.reports import EvalReport, ExamReport
    from eval.side_by_side import exam_gate
    from eval.specialist import SpecialistEvalConfig
    from specialists.registry import Registry, gate_refusal

    exam = _exam(tmp_path, n=8)
    config = SpecialistEvalConfig(exam_max_new_tokens=4)
    result = exam_gate(tiny / "base", tiny / "base", tiny / "adapter", exam, config)
    assert set(result["systems"]) == {"base", "specialist"} and result["items"] == 8
    assert result["gate"]["tests"]["mcq_accuracy"]["n"] == 8 and len(result["exam_sha256"]) == 64
    same = exam_gate(tiny / "base", tiny / "base", None, exam, config)
    assert same["paired"]["specialist_vs_base"]["mcq_delta"] == 0 and same["gate"]["accepted"]
    assert not same["gate"]["significant"], "a model is never significantly better than itself"
    held_out_ok = {"stages": {}, "final_stage": "sft", "beats_base": True, "reasons": [], "accepted": True}
    assert gate_refusal(EvalReport.model_validate(held_out_ok), ExamReport.model_validate(same)) is None
    record = Registry().register("pumps", base_model=str(tiny / "base"), eval_report=held_out_ok,
                                 adapter_dir=tiny / "adapter", exam_report=same)
    assert record.exam_sha256 == same["exam_sha256"] and record.exam_report.gate["accepted"]


def test_rag_adds_search_and_the_specialist_with_passages(registered, tmp_path, encoder):
    import shutil

    from eval.side_by_side import evaluate_specialist
    from eval.specialist import SpecialistEvalConfig

    exam = _exam(tmp_path, n=6)
    docs = tmp_path / "docs"  # the manuals these six items come from: indexing all ten costs seconds for nothing
    docs.mkdir()
    for line in exam.read_text(encoding="utf-8").splitlines()[:6]:
        shutil.copy(EXAM.parents[2] / "examples" / "docs" / json.loads(line)["source"], docs)
    config = SpecialistEvalConfig(exam_max_new_tokens=4, rag_passages=2, rag_passage_chars=300)
    result, rows = evaluate_specialist("pumps", exam=exam, rag=True, docs=docs, config=config)
    assert list(result["systems"]) == ["base", "specialist", "specialist+search", "search"]
    search = result["systems"]["search"]
    assert search["mcq_accuracy"] is None and search["open_n"] == 6
    assert search["contains"] >= 0.5, "hybrid search over the manuals finds most of these facts"
    passages = rows[0]["search"]["answer"].split("\n")
    assert len(passages) == 2 and all(len(p) <= 301 for p in passages)
    assert result["systems"]["specialist+search"]["mcq_n"] == 6
    assert "specialist_vs_search" in result["paired"] and "mcq_delta" not in result["paired"]["specialist_vs_search"]


def test_on_the_real_smollm2_base_with_a_served_model_beside_it(smollm2_base, smollm2, tmp_path, atelier_home):
    """SmolLM2-135M (the `--base smollm2-135m` conversion) with a small LoRA as the specialist, and the
    same model served by llama.cpp (`llamacpp:smollm2-135m`) as an --against system: open questions only."""
    from eval.scoring import score_options
    from eval.side_by_side import evaluate_specialist
    from eval.specialist import SpecialistEvalConfig, chat_ids, load_for_eval, text_ids
    from specialists.registry import Registry

    model, tokenizer = load_for_eval(smollm2_base)
    prompts = [chat_ids(tokenizer, [{"role": "user", "content": q}]) for q in ("Impeller nut torque?", "E14?")]
    options = [[text_ids(tokenizer, o) for o in ("80 N·m", "65 N·m", "150 N·m")],
               [text_ids(tokenizer, o) for o in ("Dry-run protection", "Motor stall", "Earth fault")]]
    shared = score_options(model, prompts, options, 8, tokenizer.pad_token_id, 512)
    separate = score_options(model, prompts, options, 8, tokenizer.pad_token_id, 512, share_prefix=False)
    assert all(a[0] == pytest.approx(b[0], abs=2e-3) for ra, rb in zip(shared, separate) for a, b in zip(ra, rb))
    del model

    adapter = build_adapter(smollm2_base, tmp_path / "adapter", seed=2, targets=("q_proj", "v_proj"))
    Registry().register("pumps", base_model=str(smollm2_base), eval_report={}, adapter_dir=adapter, force=True)
    config = SpecialistEvalConfig(exam_max_new_tokens=12)
    result, rows = evaluate_specialist("pumps", exam=_exam(tmp_path, n=6), against=["llamacpp:smollm2-135m"],
                                       config=config)
    served = result["systems"]["llamacpp:smollm2-135m"]
    assert served["kind"] == "served" and served["mcq_accuracy"] is None and served["open_n"] == 6
    assert all(row["llamacpp:smollm2-135m"]["answer"] for row in rows), "llama.cpp answered every question"
    for name in ("base", "specialist"):
        assert result["systems"][name]["mcq_n"] == 6 and 0 <= result["systems"][name]["mcq_accuracy"] <= 1
    assert any(r["base"]["answer"] != r["specialist"]["answer"] for r in rows), "the adapter is really merged in"
