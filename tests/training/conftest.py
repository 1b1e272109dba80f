"""Fixtures for the training tests: a scratch:tiny base and stage data built from examples/docs.

The data imitates the files the data-generation step writes (TRL formats plus the extra
`source`/`kind` keys the stages must drop), made by simple rules: glossary terms become
"What is X?" questions, other sentences become completion prompts, and a preference pair's
rejected answer is another question's answer.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

DOCS = Path(__file__).resolve().parents[2] / "examples" / "docs"


class StepRecorder:
    """A progress function that remembers every (step, max_steps, loss) it was given."""

    def __init__(self):
        self.calls: list[tuple[int, int, float | None]] = []

    def __call__(self, step: int, max_steps: int, loss: float | None, tokens_seen: int = 0) -> None:
        self.calls.append((step, max_steps, loss))


def _paragraphs() -> list[tuple[str, str]]:
    from retrieval.documents import load_folder

    found = []
    for doc in load_folder(DOCS).documents:
        for para in re.split(r"\n\s*\n", doc.text):
            para = " ".join(para.split())
            if len(para) >= 60:
                found.append((doc.doc_id, para))
    return found


def _qa_pairs(paragraphs: list[tuple[str, str]]) -> list[dict]:
    pairs = []
    for source, para in paragraphs:
        if source == "glossary.txt" and ". " in para:
            continue
        for sentence in re.split(r"(?<=[.!?])\s+", para):
            words = sentence.split()
            if 8 <= len(words) <= 40:
                lead = " ".join(words[:6])
                pairs.append({"q": f"Complete the statement: {lead} ...", "a": sentence, "source": source})
    glossary = (DOCS / "glossary.txt").read_text(encoding="utf-8").split("\n\n")
    for block in glossary:
        lines = [line.strip() for line in block.strip().splitlines() if line.strip()]
        if len(lines) == 2 and len(lines[0]) < 60:
            pairs.append({"q": f"What is {lines[0].lower()}?", "a": lines[1].split(". ")[0].rstrip(".") + ".",
                          "source": "glossary.txt"})
    random.Random(0).shuffle(pairs)
    return pairs


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def make_data_dir(dest: Path, *, n_dapt: int | None = None, n_sft: int = 500, n_dpo: int = 300) -> Path:
    """Write dapt/, sft/ and dpo/ train+heldout files (about 10% held out) under `dest`."""
    paragraphs = _paragraphs()
    heldout = paragraphs[::10]
    train = [p for i, p in enumerate(paragraphs) if i % 10][:n_dapt]
    _write(dest / "dapt" / "train.jsonl", [{"text": t, "source": s} for s, t in train])
    _write(dest / "dapt" / "heldout.jsonl", [{"text": t, "source": s} for s, t in heldout])
    pairs = _qa_pairs(paragraphs)
    sft = [{"messages": [{"role": "user", "content": p["q"]}, {"role": "assistant", "content": p["a"]}],
            "source": p["source"], "kind": "qa"} for p in pairs[:n_sft]]
    cut = max(1, len(sft) // 10)
    _write(dest / "sft" / "train.jsonl", sft[cut:])
    _write(dest / "sft" / "heldout.jsonl", sft[:cut])
    rng = random.Random(1)
    dpo = []
    for i, p in enumerate(pairs[:n_dpo]):
        wrong = pairs[(i + 1 + rng.randrange(len(pairs) - 1)) % len(pairs)]["a"]
        dpo.append({"prompt": [{"role": "user", "content": p["q"]}],
                    "chosen": [{"role": "assistant", "content": p["a"]}],
                    "rejected": [{"role": "assistant", "content": wrong}],
                    "source": p["source"], "kind": "wrong-answer"})
    cut = max(1, len(dpo) // 10)
    _write(dest / "dpo" / "train.jsonl", dpo[cut:])
    _write(dest / "dpo" / "heldout.jsonl", dpo[:cut])
    return dest


def doc_texts() -> list[str]:
    from retrieval.documents import load_folder

    return [doc.text for doc in load_folder(DOCS).documents]


@pytest.fixture(scope="session")
def texts() -> list[str]:
    """The text of every document in examples/docs."""
    return doc_texts()


@pytest.fixture
def recorder() -> StepRecorder:
    return StepRecorder()


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """scratch:tiny built once per session from examples/docs."""
    from training.models import resolve_base

    return resolve_base("scratch:tiny", work_dir=tmp_path_factory.mktemp("base") / "tiny",
                        corpus_texts=doc_texts(), seed=0)


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory):
    """The data step with its defaults over the sample manuals, built once: (folder, manifest, progress events)."""
    from retrieval.documents import load_folder
    from training.data import DataConfig, build_datasets

    out = tmp_path_factory.mktemp("sample-data")
    seen: list[tuple[str, int, int]] = []
    manifest = build_datasets(load_folder(DOCS).documents, out, DataConfig(), progress=lambda *event: seen.append(event))
    return out, manifest, seen


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> Path:
    """A small data dir: 120 DAPT paragraphs, 64 SFT and 40 DPO rows, keeps tests fast."""
    return make_data_dir(tmp_path_factory.mktemp("data"), n_dapt=120, n_sft=64, n_dpo=40)


@pytest.fixture(scope="session")
def dapt_run(tiny_base, small_data, tmp_path_factory) -> SimpleNamespace:
    """Full DAPT (pretraining from scratch) of the tiny base: 40 steps, ~10 s; with what progress saw."""
    from training.dapt import DaptConfig, train_dapt
    from training.lora import LoraSettings

    recorder = StepRecorder()
    config = DaptConfig(max_steps=40, seq_len=128, save_steps=20, logging_steps=5)
    out_dir = tmp_path_factory.mktemp("dapt") / "out"
    result = train_dapt(tiny_base, small_data, out_dir, config, LoraSettings(), progress=recorder)
    return SimpleNamespace(result=result, calls=recorder.calls, config=config, out_dir=out_dir)


@pytest.fixture(scope="session")
def dapt_result(dapt_run):
    return dapt_run.result


@pytest.fixture(scope="session")
def sft_result(dapt_result, small_data, tmp_path_factory):
    """A new LoRA adapter trained by SFT on the DAPT model: 30 steps."""
    from training.lora import LoraSettings
    from training.sft import SftConfig, train_sft

    config = SftConfig(max_steps=30, seq_len=128, save_steps=50, logging_steps=5)
    return train_sft(dapt_result.model_path, small_data, tmp_path_factory.mktemp("sft") / "out", config,
                     LoraSettings(), None, progress=StepRecorder())
