"""Pairs and gate of `specialist improve`: the real feedback store (SQLite), the pipeline's real filters,
the paired tests on hand-made per-item outcomes, and the teacher writing chosen answers from passages (a
scripted OpenAI-compatible server on 127.0.0.1 for the wiring, SmolLM2 on llama.cpp for the real thing)."""

from __future__ import annotations

import json
import sqlite3
from collections import Counter

import pytest

from atelier.errors import AtelierError
from atelier.feedback import FeedbackStore
from eval.gate import GateConfig
from tests.specialists.test_served import free_port
from tests.training.test_teacher import openai_teacher, prompt_of, serve  # noqa: F401 - the serve fixture
from training.data import DataConfig
from training.improve_gate import compare_set, decide
from training.improve_pairs import clean, pairs_from_feedback, read_pair_file, split_heldout


def _rate(store, cid, route, question, answer, rating, correction=None, owner="alice"):
    store.record_exchange(cid, f"t-{cid}", "m", question, answer, route, owner, 1 if route.startswith("spec") else None)
    return store.add(cid, rating, owner=owner, correction=correction)


def test_only_the_specialists_own_route_counts_and_the_newest_rating_wins(tmp_path):
    store = FeedbackStore(tmp_path / "feedback.sqlite")
    try:
        _rate(store, "a", "specialist:hx", "What torque for the HX-65 impeller nut?", "45 N·m", "down", "80 N·m")
        _rate(store, "b", "specialist:valves", "What torque for the VA-200 flange?", "9 N·m", "down", "12 N·m")
        _rate(store, "c", "search", "What is NPSH?", "passages", "down", "Net positive suction head.")
        _rate(store, "d", "specialist:hx", "Oil grade of the bearing frame?", "ISO VG 46", "down", "ISO VG 68")
        changed = store.add("d", "up", owner="alice")  # the user changed their mind: the newest rating counts
        rows = store.for_route("specialist:hx")
        assert [(r["completion_id"], r["rating"]) for r in rows] == [("a", "down"), ("d", "up")]
        assert rows[-1]["id"] == changed and rows[0]["specialist_version"] == 1 and rows[0]["owner"] == "alice"
        assert store.for_route("specialist:hx", since="2999-01-01") == []
        with pytest.raises(ValueError, match="rating 'down'"):
            store.add("a", "up", owner="alice", correction="80 N·m")
    finally:
        store.close()
    pairs, dropped = pairs_from_feedback(rows, search=lambda q, k: [])
    assert [(p.kind, p.chosen, p.rejected) for p in pairs] == [("correction", "80 N·m", "45 N·m"),
                                                              ("approved", "ISO VG 46", "")]
    assert not dropped


def test_a_thumbs_down_without_correction_gets_a_grounded_answer_from_the_passages():
    rows = [{"id": 7, "rating": "down", "correction": None, "question": "What torque for the HX-65 impeller nut?",
             "answer": "Tighten it by hand."}]
    passages = ["The pump ships on a pallet. Torque the HX-65 impeller nut to 80 N·m with a calibrated wrench."]
    [pair], _ = pairs_from_feedback(rows, search=lambda q, k: passages)
    assert pair.kind == "grounded" and "80 N·m" in pair.chosen and pair.source == "feedback:7"
    none, dropped = pairs_from_feedback(rows, search=lambda q, k: [])
    assert none == [] and dropped == Counter({"feedback.down_without_correction_or_index": 1})


LONG = ("What torque does the HX-100 coupling hub bolt take when the coupling is refitted after the alignment "
        "check on the baseplate of the pump?")


def test_pairs_are_filtered_deduplicated_and_kept_off_the_exam(tmp_path):
    bounds = DataConfig().bounds()
    rows = [{"id": i, "rating": "down", "correction": c, "question": q, "answer": a} for i, (q, c, a) in enumerate([
        ("What torque do I put on the impeller nut of an HX-65?", "80 N·m", "45 N·m"),  # an exam question, verbatim
        (LONG, "95 N·m", "60 N·m"),
        (LONG + " ", "95 N·m.", "70 N·m"),  # the same prompt and chosen answer, up to spacing and punctuation
        (LONG, "95 N·m exactly", "70 N·m"),  # near duplicate
        ("Which oil goes into the bearing frame of the HX-65?", "ISO VG 68", "ISO VG 68"),  # rejected == chosen
    ])]
    pairs, _ = pairs_from_feedback(rows, search=lambda q, k: [])
    rejected = Counter()
    exam = ["What torque do I put on the impeller nut of an HX-65?"]
    kept = clean(pairs, bounds, exam, rejected)
    assert [p.source for p in kept] == ["feedback:1"]
    assert rejected == Counter({"dpo.duplicate": 1, "dpo.near_duplicate": 1, "dpo.rejected_equals_chosen": 1,
                                "exam.overlaps_heldout": 1})
    many = [p for p in pairs_from_feedback([r | {"id": i, "question": f"Question number {i} about pumps?"}
                                            for i, r in enumerate(rows * 4)], lambda q, k: [])[0]]
    train, held = split_heldout(many, 0.25, seed=0)
    assert len(held) == 5 and len(train) == 15 and not set(map(id, train)) & set(map(id, held))
    assert split_heldout(many[:4], 0.25, seed=0) == (many[:4], [])  # too few to hold any out


def test_pair_files_in_trl_format_are_validated_with_line_numbers(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"prompt": "What torque for the HX-65 nut?", "chosen": "80 N·m", "rejected": "45 N·m"})
                    + "\n\n" + json.dumps({"prompt": [{"role": "user", "content": "Oil of the HX-65 frame?"}],
                                           "chosen": [{"role": "assistant", "content": "ISO VG 68"}],
                                           "rejected": [{"role": "assistant", "content": "ISO VG 32"}]}) + "\n",
                    encoding="utf-8")
    pairs = read_pair_file(good)
    assert [(p.question, p.chosen, p.source) for p in pairs] == [
        ("What torque for the HX-65 nut?", "80 N·m", "file:good.jsonl:1"),
        ("Oil of the HX-65 frame?", "ISO VG 68", "file:good.jsonl:3")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([json.dumps({"prompt": "q?", "chosen": "a"}), json.dumps([1, 2]),
                              json.dumps({"prompt": "q?", "chosen": "", "rejected": "b"})]) + "\n", encoding="utf-8")
    with pytest.raises(AtelierError) as error:
        read_pair_file(bad)
    message = str(error.value)
    assert "bad.jsonl:1: no rejected" in message and "bad.jsonl:2: not a JSON object" in message
    assert 'bad.jsonl:3: "chosen" must be a non-empty string' in message
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "q?"\n', encoding="utf-8")
    with pytest.raises(AtelierError, match="broken.jsonl:1 is not valid JSON"):
        read_pair_file(broken)
    with pytest.raises(AtelierError, match="not found"):
        read_pair_file(tmp_path / "missing.jsonl")


def test_the_gate_refuses_a_real_drop_accepts_noise_and_lists_flips():
    gate = GateConfig(bootstrap_samples=500)
    right, ids = [1] * 30 + [0] * 10, [f"q{i}" for i in range(40)]
    worse = [0] * 12 + [1] * 18 + [0] * 10  # 12 right -> wrong: significant and beyond the tolerance
    dropped = compare_set("exam", {"mcq_accuracy": right}, {"mcq_accuracy": worse}, gate, 0.05, {"mcq_accuracy": ids})
    assert dropped.regressed and dropped.flips_to_wrong == {"mcq_accuracy": ids[:12]}
    assert dropped.flips_to_right == {"mcq_accuracy": []}
    noisy = [0] * 3 + [1] * 27 + [1] + [0] * 9  # 3 flips away, 1 back: 0.05 down, not significant
    wobble = compare_set("exam", {"mcq_accuracy": right}, {"mcq_accuracy": noisy}, gate, 0.02, {"mcq_accuracy": ids})
    assert not wobble.regressed and wobble.warnings and wobble.flips_to_right == {"mcq_accuracy": ["q30"]}
    ppl = [(100.0, 20)] * 30
    shifted = compare_set("heldout", {"perplexity": ppl}, {"perplexity": [(100.5, 20)] * 30}, gate, 0.05)
    assert shifted.tests["perplexity"].outcome == "worse" and not shifted.regressed  # 2.5% up: real, but within 5%
    blown = compare_set("heldout", {"perplexity": ppl}, {"perplexity": [(130.0, 20)] * 30}, gate, 0.05)
    assert blown.regressed
    learned = compare_set("feedback", {"mcq_accuracy": [0] * 20}, {"mcq_accuracy": [1] * 8 + [0] * 12}, gate, 0.05)
    assert decide({"exam": wobble, "feedback": learned}, 0.05).accepted
    assert not decide({"exam": dropped, "feedback": learned}, 0.05).accepted
    same = compare_set("feedback", {"mcq_accuracy": [0] * 20}, {"mcq_accuracy": [0] * 20}, gate, 0.05)
    refused = decide({"exam": wobble, "feedback": same}, 0.05)
    assert not refused.accepted and refused.reasons[0].startswith("not better on the feedback items")


def test_an_old_feedback_database_is_migrated_forward_and_keeps_its_rows(tmp_path):
    from atelier.feedback import MIGRATIONS

    path = tmp_path / "feedback.sqlite"
    db = sqlite3.connect(path)
    for number, script in enumerate(MIGRATIONS[:2], start=1):
        db.executescript(f"BEGIN; {script} PRAGMA user_version={number}; COMMIT;")
    db.execute("INSERT INTO exchanges VALUES ('c1', 't', 'm', 'q?', 'a', 'specialist:hx', '2026-11-30T10:00:00+00:00', "
               "'alice')")
    db.execute("INSERT INTO feedback (completion_id, rating, comment, created_at) VALUES ('c1', 'down', 'no', "
               "'2026-11-30T10:01:00+00:00')")
    db.commit()
    db.close()
    store = FeedbackStore(path)
    try:
        [row] = store.for_route("specialist:hx")
        assert (row["rating"], row["comment"], row["correction"], row["specialist_version"]) == ("down", "no", None,
                                                                                                  None)
        assert [r["id"] for r in store.for_route("specialist:hx", since="2026-11-30")] == [row["id"]]
        assert store.for_route("specialist:hx", since="2026-12-01") == []
    finally:
        store.close()
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)


# ----------------------------------------------------------------------------- the teacher writes chosen answers

PASSAGES = {  # question -> the passages the search index returned for it
    "What torque does the HX-65 impeller nut take?": [
        "With immediate effect, the tightening torque for the HX-65 impeller nut is 80 N·m.",
        "Always fit a new tab washer and apply one drop of medium-strength thread locker to the thread."],
    "Which coolant does the HX-65 motor use?": ["The HX-65 motor is air-cooled by its shaft-mounted fan."],
    "How often is the HX-65 bearing frame oil changed?": ["Change the bearing frame oil every 4000 hours of running."],
    "What is the HX-65 seal flush pressure?": ["The seal flush must be 1 bar above the stuffing box pressure."],
}
REPLIES = {  # what the scripted teacher answers, by question
    "What torque does the HX-65 impeller nut take?": '{"answer": "80 N·m, with a new tab washer."}',
    "Which coolant does the HX-65 motor use?": '{"answer": "UNKNOWN"}',
    "How often is the HX-65 bearing frame oil changed?": '{"answer": "Every 500 hours with synthetic ISO VG 220."}',
    "What is the HX-65 seal flush pressure?": "Sure! The seal flush runs at 1 bar over the box.",  # no JSON
}


def _down(i: int, question: str, correction: str | None = None) -> dict:
    return {"id": i, "rating": "down", "correction": correction, "question": question, "answer": "Hand-tight."}


def _scripted(request: dict) -> tuple[int, str]:
    asked = prompt_of(request)
    return 200, next(reply for question, reply in REPLIES.items() if f'"""\n{question}\n"""' in asked)


def test_the_teacher_answers_from_the_passages_and_only_grounded_answers_are_kept(serve, tmp_path):  # noqa: F811
    server = serve(_scripted)
    teacher = openai_teacher(server, tmp_path)
    rows = [_down(i, q) for i, q in enumerate(PASSAGES, start=1)] + [_down(9, "Oil grade?", "ISO VG 68")]
    seen = []
    try:
        pairs, dropped = pairs_from_feedback(rows, lambda q, k: PASSAGES[q][:k], k=3, teacher=teacher,
                                             progress=lambda *event: seen.append(event))
    finally:
        teacher.close()
    assert [(p.source, p.kind) for p in pairs] == [("feedback:1", "teacher"), ("feedback:3", "teacher"),
                                                   ("feedback:9", "correction")]  # the rows' order
    assert pairs[0].chosen == "80 N·m, with a new tab washer." and pairs[0].rejected == "Hand-tight."
    assert pairs[0].context == "\n".join(PASSAGES["What torque does the HX-65 impeller nut take?"])
    assert dropped == Counter({"teacher.answer.unknown": 1, "teacher.answer.malformed_json": 1})
    rejected = Counter()
    kept = clean(pairs, DataConfig().bounds(), [], rejected)
    assert [p.source for p in kept] == ["feedback:1", "feedback:9"]  # "every 500 hours, synthetic": not in them
    assert rejected == Counter({"dpo.ungrounded": 1})
    assert len(server.requests) == 4 and seen[-1] == ("teacher.answer", 4, 4)
    question = "What torque does the HX-65 impeller nut take?"
    asked = [r for r in server.requests if question in prompt_of(r)]  # two requests run at once: any order
    assert len(asked) == 1
    prompt = prompt_of(asked[0])
    for passage in PASSAGES["What torque does the HX-65 impeller nut take?"]:
        assert f'"""\n{passage}\n"""' in prompt  # fenced as data, as the data step's prompts fence chunks
    assert 'Question:\n"""\nWhat torque does the HX-65 impeller nut take?\n"""' in prompt and "UNKNOWN" in prompt
    assert asked[0]["response_format"]["json_schema"]["schema"]["required"] == ["answer"]
    again, _ = pairs_from_feedback(rows[:1], lambda q, k: PASSAGES[q], teacher=openai_teacher(server, tmp_path))
    assert again[0].chosen == pairs[0].chosen and len(server.requests) == 4  # asked once: the teacher's cache
    sentence, _ = pairs_from_feedback(rows[:1], lambda q, k: PASSAGES[q])  # without a teacher, as before
    assert sentence[0].kind == "grounded" and sentence[0].chosen == PASSAGES[rows[0]["question"]][0]


def _record(teacher: dict | None = None):
    """A registry record as collect_pairs reads it (name and the config it was built with)."""
    from types import SimpleNamespace

    return SimpleNamespace(name="hx", config={"teacher": teacher} if teacher else {})


def _collect(home, record, config):
    from training.improve import collect_pairs

    return collect_pairs(record, config, from_feedback=True, pair_files=[], exam_questions=[], since=None,
                         home=home, base_answers=lambda prompts: [])


def test_a_round_uses_the_specialists_own_teacher_and_a_gone_one_is_a_clear_error(serve, tmp_path, atelier_home):  # noqa: F811
    from training.improve import ImproveConfig

    store = FeedbackStore(atelier_home / "feedback.sqlite")
    try:
        _rate(store, "a", "specialist:hx", "What torque does the HX-65 impeller nut take?", "Hand-tight.", "down")
    finally:
        store.close()
    gone = {"name": "openai:test-model", "base_url": f"http://127.0.0.1:{free_port()}/v1", "timeout_s": 2}
    fallback = ImproveConfig(teacher_from_specialist=True)
    with pytest.raises(AtelierError, match=r"not reachable at .*'hx' was built with teacher openai:test-model.*"
                                           r"--no-teacher"):
        _collect(atelier_home, _record(gone), fallback)
    without = _collect(atelier_home, _record(gone), ImproveConfig())  # by default users' questions stay here
    assert without.teacher is None and without.rejected == Counter({"feedback.down_without_correction_or_index": 1})
    server = serve(_scripted, models=("test-model",))
    own = {"name": "openai:test-model", "base_url": f"{server.url}/v1", "cache_path": str(tmp_path / "c.sqlite")}
    assert _collect(atelier_home, _record(own), fallback).teacher == "openai:test-model"
    assert _collect(atelier_home, _record(own), ImproveConfig()).teacher is None
    explicit = ImproveConfig(teacher=gone | {"name": "openai:other"})  # the round's own teacher wins, unwrapped
    with pytest.raises(AtelierError, match=r"teacher openai:other not reachable") as error:
        _collect(atelier_home, _record(own), explicit)
    assert "was built with" not in str(error.value)


def test_a_real_teacher_on_llamacpp_writes_grounded_chosen_answers_from_the_sample_docs(smollm2, encoder, tmp_path):
    """SmolLM2 on the embedded llama.cpp answers real feedback questions from the passages a real index of
    examples/docs' service bulletins returns: the round keeps at least one teacher answer, and only grounded ones."""
    import shutil

    from retrieval.cli import index
    from tests.training.conftest import DOCS
    from training.filters import grounding
    from training.improve import ImproveConfig
    from training.teacher import TeacherConfig

    docs, home = tmp_path / "docs", tmp_path / "home"
    docs.mkdir()
    shutil.copy(DOCS / "service-bulletins.jsonl", docs)  # the manual the questions are about: seconds, not all ten
    questions = ["What torque does the HX-65 impeller nut take?", "What is the capital of France?"]
    store = FeedbackStore(home / "feedback.sqlite")
    try:
        for i, question in enumerate(questions):
            _rate(store, f"c{i}", "specialist:hx", question, "Hand-tight, then a quarter turn.", "down")
    finally:
        store.close()
    teacher = TeacherConfig(name="llamacpp:smollm2-135m", num_ctx=4096, max_tokens=64, temperature=0.0,
                            cache_path=tmp_path / "teacher.sqlite")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ATELIER_HOME", str(home))
        index(docs, backend=None, index_name=None, embedding_model=None, model=None, config_file=None, prune=True,
              delete=[], follow_symlinks=None, max_file_mb=None, quiet=True)
        found = _collect(home, _record(), ImproveConfig(teacher=teacher, search_k=1, heldout_fraction=0))
    bounds = DataConfig().bounds()
    kept = [p for p in found.train if p.kind == "teacher"]
    print(f"\nkept {[(p.question, p.chosen) for p in kept]}; dropped {dict(found.rejected)}")
    assert found.teacher == "llamacpp:smollm2-135m" and kept, found.rejected
    assert all(grounding(p.chosen, p.context) >= bounds.grounding_threshold and "HX-65" in p.context for p in kept)
    assert len(found.train) + sum(n for reason, n in found.rejected.items() if reason.startswith(("teacher.", "dpo.")))\
        == len(questions)  # each question kept, or dropped with its reason
