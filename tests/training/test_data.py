"""build_datasets end to end: the real sample manuals offline, and a scripted teacher over HTTP."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from atelier.errors import AtelierError
from retrieval.documents import Document, load_folder
from training.data import DataConfig, DataManifest, build_datasets, inputs_fingerprint, load_manifest, split_documents
from training.teacher import Teacher, TeacherConfig

DOCS = Path(__file__).resolve().parents[2] / "examples" / "docs"


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def docs() -> list[Document]:
    return load_folder(DOCS).documents


@pytest.fixture(scope="module")
def built(sample_data):
    return sample_data


def test_files_are_trl_standard_formats(built):
    out, manifest, _ = built
    for split in ("train", "heldout"):
        for row in read(out / "dapt" / f"{split}.jsonl"):
            assert set(row) == {"text", "source"} and row["text"].strip()
        for row in read(out / "sft" / f"{split}.jsonl"):
            assert set(row) == {"messages", "source", "kind"}
            assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
            assert all(m["content"].strip() for m in row["messages"])
        for row in read(out / "dpo" / f"{split}.jsonl"):
            assert set(row) == {"prompt", "chosen", "rejected", "source", "kind"}
            assert row["prompt"][0]["role"] == "user" and row["chosen"][0]["role"] == "assistant"
            assert row["rejected"][0]["role"] == "assistant"
            assert row["chosen"][0]["content"] != row["rejected"][0]["content"]
    assert manifest.generator == "offline" and manifest.teacher is None


def test_counts_are_large_enough_for_training_and_evaluation(built):
    _, manifest, _ = built
    rows = {path: entry.rows for path, entry in manifest.files.items()}
    assert rows["sft/train.jsonl"] >= 400 and rows["dpo/train.jsonl"] >= 250
    assert rows["sft/heldout.jsonl"] >= 40 and rows["dpo/heldout.jsonl"] >= 40
    assert rows["dapt/train.jsonl"] >= 50 and rows["dapt/heldout.jsonl"] >= 5
    assert len(manifest.kinds["sft/heldout.jsonl"]) >= 5  # several kinds in the held-out set too


def test_split_is_by_document_and_heldout_never_trained_on(built, docs):
    out, manifest, _ = built
    held, train = set(manifest.heldout_sources), set(manifest.train_sources)
    assert held and train and not held & train and held | train == {d.doc_id for d in docs}
    for stage in ("dapt", "sft", "dpo"):
        assert {r["source"] for r in read(out / stage / "train.jsonl")} <= train
        assert {r["source"] for r in read(out / stage / "heldout.jsonl")} <= held
    heldout_text = {d.doc_id: d.text for d in docs if d.doc_id in held}
    for row in read(out / "dapt" / "train.jsonl"):
        assert all(row["text"][:200] not in text for text in heldout_text.values())


def test_heldout_answers_are_distinct_and_short(built):
    out, _, _ = built
    answers = [r["messages"][1]["content"].strip().lower() for r in read(out / "sft" / "heldout.jsonl")]
    assert len(answers) == len(set(answers))
    assert sorted(len(a) for a in answers)[len(answers) // 2] < 120  # the median answer is short


def test_manifest_hashes_match_the_files_and_reload(built):
    out, manifest, seen = built
    for rel, entry in manifest.files.items():
        data = (out / rel).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry.sha256
        assert entry.rows == (len(data.splitlines()) if rel.endswith(".jsonl") else len(json.loads(data)))
    loaded = load_manifest(out)
    assert loaded == manifest and loaded.content_hash == manifest.content_hash
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["content_hash"] == manifest.content_hash and on_disk["config"]["heldout_fraction"] == 0.2
    assert [k["term"] for k in json.loads((out / "keywords.json").read_text())][:50] == manifest.keywords[:50]
    assert "impeller" in manifest.keywords[:20]
    stages = [event[0] for event in seen]
    assert stages[0] == "split" and "keywords" in stages and "offline.heldout" in stages and stages[-1] == "write"
    assert seen[-1][1] == seen[-1][2]


def test_split_documents_holds_out_a_fifth_of_the_text_deterministically(docs):
    train, heldout = split_documents(docs, 0.2, seed=0)
    assert heldout and train and len(heldout) < len(docs)
    share = sum(len(d.text) for d in heldout) / sum(len(d.text) for d in docs)
    assert 0.1 <= share <= 0.3
    assert split_documents(docs, 0.2, seed=0) == (train, heldout)
    assert split_documents(docs, 0.2, seed=1) != (train, heldout)
    two = [Document("a", "A", "x" * 10_000, "a"), Document("b", "B", "y" * 10, "b")]
    for seed in range(5):  # at least one, never all, and never the big one
        assert split_documents(two, 0.2, seed=seed) == ([two[0]], [two[1]])
    even = [Document(str(i), "T", "z" * 100, str(i)) for i in range(3)]
    assert [len(part) for part in split_documents(even, 0.05, seed=0)] == [2, 1]


def test_rebuild_is_deterministic(docs, tmp_path):
    subset = [d for d in docs if d.doc_id.startswith("SB-")]
    first = build_datasets(subset, tmp_path / "a", DataConfig(seed=3))
    second = build_datasets(subset, tmp_path / "b", DataConfig(seed=3))
    assert first.content_hash == second.content_hash
    assert first.inputs_hash == second.inputs_hash == inputs_fingerprint(subset, DataConfig(seed=3))
    other = build_datasets(subset, tmp_path / "c", DataConfig(seed=4))
    assert other.content_hash != first.content_hash and other.inputs_hash != first.inputs_hash
    assert inputs_fingerprint(subset[:-1], DataConfig(seed=3)) != first.inputs_hash


def test_missing_or_single_documents_are_user_errors(tmp_path, docs):
    with pytest.raises(AtelierError, match="no documents"):
        build_datasets([], tmp_path, DataConfig())
    with pytest.raises(AtelierError, match="at least 2"):
        build_datasets(docs[:1], tmp_path, DataConfig())


def test_an_old_self_play_fraction_is_dropped_with_a_warning(caplog):
    """It never took effect (no run gave the data step a base model to answer with): old configs still load."""
    with caplog.at_level("WARNING", logger="training.data"):
        config = DataConfig.model_validate({"self_play_fraction": 0.5, "seed": 3})
    assert config.seed == 3 and "self_play_fraction" not in config.model_dump()
    assert "data.self_play_fraction is ignored" in caplog.text


# --- with a teacher: a scripted OpenAI-compatible server on 127.0.0.1 ---------------------------------------------

def _passage(prompt: str) -> str:
    return re.search(r'Passage:\n"""\n(.*)\n"""', prompt, re.DOTALL).group(1)


def good_teacher(prompt: str) -> str:
    if prompt.startswith("You are preparing clean training text"):  # a rewrite: the first half, reflowed
        sentences = re.split(r"(?<=\.)\s", " ".join(_passage(prompt).split()))
        return "Here is the rewritten text:\n" + " ".join(sentences[: len(sentences) // 2])
    if prompt.startswith("You are writing exam questions"):
        first = re.split(r"(?<=\.)\s", " ".join(_passage(prompt).split()))[0]
        return json.dumps({"pairs": [{"question": f"According to the bulletin, what holds: {first[:40]}?",
                                      "answer": first}, {"question": "bad item"}]})
    return "It depends on the installation."


class TeacherServer:
    def __init__(self, answer: Callable[[str], str]):
        self.calls = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self._reply({"object": "list", "data": []})

            def do_POST(self):
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.calls += 1
                content = answer(request["messages"][-1]["content"])
                self._reply({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]})

            def _reply(self, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def teacher(self, tmp_path: Path) -> Teacher:
        return Teacher(TeacherConfig(name="openai:scripted", base_url=self.url, cache_path=tmp_path / "cache.sqlite"))


@pytest.fixture
def teacher_server():
    servers: list[TeacherServer] = []
    yield lambda answer: servers.append(TeacherServer(answer)) or servers[-1]
    for server in servers:
        server.httpd.shutdown()
        server.httpd.server_close()


def test_teacher_data_is_added_and_cached(docs, tmp_path, teacher_server):
    subset = [d for d in docs if d.doc_id.startswith("SB-202")][:6]
    server = teacher_server(good_teacher)
    manifest = build_datasets(subset, tmp_path / "out", DataConfig(teacher_concurrency=2),
                              teacher=server.teacher(tmp_path))
    assert manifest.generator == "teacher:openai:scripted" and manifest.teacher == "openai:scripted"
    assert manifest.kinds["dapt/train.jsonl"].get("enriched", 0) >= 4
    assert manifest.kinds["sft/train.jsonl"].get("teacher", 0) >= 4
    assert manifest.kinds["dpo/train.jsonl"].get("teacher/teacher_rejected", 0) >= 4
    assert manifest.rejected["teacher.qa.unusable_item"] == 6  # one bad item per chunk (one chunk each), counted
    calls = server.calls
    again = build_datasets(subset, tmp_path / "again", DataConfig(teacher_concurrency=2),
                           teacher=server.teacher(tmp_path))
    assert server.calls == calls  # every answer came from the cache
    assert again.content_hash == manifest.content_hash


def test_a_teacher_returning_garbage_is_an_error_naming_the_counts(docs, tmp_path, teacher_server):
    subset = [d for d in docs if d.doc_id.startswith("SB-202")][:4]
    server = teacher_server(lambda prompt: "lorem <<<")
    expected = r"produced no usable output.*dapt\.too_short: 4.*teacher\.qa\.malformed_json: 4"
    with pytest.raises(AtelierError, match=expected):
        build_datasets(subset, tmp_path / "out", DataConfig(), teacher=server.teacher(tmp_path))
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_data_config_rejects_unknown_keys():
    with pytest.raises(ValueError):
        DataConfig(heldout_fraction=0.2, bogus=1)
    assert all(field.description for field in DataConfig.model_fields.values())
    assert "content_hash" in DataManifest.model_computed_fields
