"""Specialist evaluation on a tiny random Llama: metrics are right, move with training, and report."""

from __future__ import annotations

import json
import math
import time

import pytest

from eval.answers import token_f1
from eval.report import METRICS, compare, render_markdown, render_plot, write_report
from eval.scoring import score_continuations
from eval.specialist import (
    QAItem,
    SpecialistEvalConfig,
    build_mcq,
    evaluate_loaded,
    evaluate_model,
    load_for_eval,
)

REACTORS = ["zorblax", "quintar", "velmora", "drennic", "plovex", "sartane", "kelvane", "murrow", "tazzle",
            "orvine", "bexley", "cindral"]
COLORS = ["green", "amber", "violet", "white", "crimson", "blue"]
BUILDERS = ["Ada Brun", "Oskar Lind", "Mira Tal", "Jon Vey"]
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _facts(i: int, name: str) -> dict:
    return {"name": name, "kelvin": 20 + 7 * i, "color": COLORS[i % len(COLORS)], "builder": BUILDERS[i % 4]}


def _write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_heldout(data_dir):
    """A made-up domain (reactors) in the three held-out files of the data contract."""
    facts = [_facts(i, n) for i, n in enumerate(REACTORS)]
    texts = [{"text": f"The {f['name']} reactor runs at {f['kelvin']} kelvin and glows {f['color']}. "
                      f"It was built by {f['builder']}.", "source": f"{f['name']}.md"} for f in facts]
    sft = []
    for f in facts:
        for q, a, kind in ((f"At what temperature does the {f['name']} reactor run?",
                            f"The {f['name']} reactor runs at {f['kelvin']} kelvin.", "fact"),
                           (f"Who built the {f['name']} reactor?", f"It was built by {f['builder']}.", "origin")):
            sft.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                        "source": f"{f['name']}.md", "kind": kind})
    dpo = [{"prompt": [{"role": "user", "content": f"What colour does the {f['name']} reactor glow?"}],
            "chosen": [{"role": "assistant", "content": f"It glows {f['color']}."}],
            "rejected": [{"role": "assistant", "content": f"It glows {COLORS[(i + 3) % len(COLORS)]}."}],
            "source": f"{f['name']}.md", "kind": "fact"} for i, f in enumerate(facts)]
    _write_jsonl(data_dir / "dapt" / "heldout.jsonl", texts)
    _write_jsonl(data_dir / "sft" / "heldout.jsonl", sft)
    _write_jsonl(data_dir / "dpo" / "heldout.jsonl", dpo)
    return texts, sft, dpo


def make_tiny_model(model_dir, corpus: list[str]):
    """A byte-level BPE tokenizer trained on the corpus, with a chat template, and a random 2-layer Llama."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>"]
    raw.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="<|end|>",
                                        pad_token="<pad>", unk_token="<unk>")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(model_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(model_dir)


def train_lora(model_dir, adapter_dir, conversations: list[str], steps: int = 100):
    """A LoRA adapter trained briefly on the held-out-like text, so the metrics have something to show."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    # lm_head too: a random base's small output weights cap its logits, and so how low perplexity can go
    lora = LoraConfig(r=16, lora_alpha=32, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"])
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), lora)
    batch = tokenizer(conversations, add_special_tokens=False, padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.save_pretrained(adapter_dir)
    return losses


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Held-out data, a random tiny base, and a LoRA adapter trained on that data (built once)."""
    root = tmp_path_factory.mktemp("specialist-eval")
    texts, sft, dpo = make_heldout(root / "data")
    rendered = [f"<s><|user|>{r['messages'][0]['content']}<|end|><|assistant|>{r['messages'][1]['content']}<|end|>"
                for r in sft]
    rendered += [f"<s><|user|>{r['prompt'][0]['content']}<|end|><|assistant|>{r['chosen'][0]['content']}<|end|>"
                 for r in dpo]
    make_tiny_model(root / "base", [t["text"] for t in texts] + rendered)
    losses = train_lora(root / "base", root / "adapter", [t["text"] for t in texts] + rendered)
    return {"root": root, "data": root / "data", "base": root / "base", "adapter": root / "adapter", "losses": losses}


def test_scoring_with_padding_matches_unpadded_forward(world):
    """Left padding, position ids and logits_to_keep must not change a continuation's log-likelihood."""
    import torch

    model, tokenizer = load_for_eval(world["base"])
    pairs = [([1, 7, 9, 12], [40, 41]), ([1, 5], [60, 61, 62, 63, 64]), ([1, 8, 9, 10, 11, 12, 13], [70])]
    batched = score_continuations(model, pairs, batch_size=3, pad_id=tokenizer.pad_token_id, max_len=128)
    for (context, continuation), (logprob, n) in zip(pairs, batched):
        with torch.inference_mode():
            logits = model(torch.tensor([context + continuation])).logits[0].log_softmax(-1)
        expected = sum(float(logits[len(context) - 1 + k, tok]) for k, tok in enumerate(continuation))
        assert n == len(continuation)
        assert logprob == pytest.approx(expected, abs=1e-4)


def test_metrics_are_sensible_and_training_moves_them(world):
    config = SpecialistEvalConfig(max_generation_items=8, max_new_tokens=16)
    started = time.perf_counter()
    base = evaluate_model(world["base"], None, world["data"], config)
    base_seconds = time.perf_counter() - started
    tuned = evaluate_model(world["base"], world["adapter"], world["data"], config)

    vocab = 400
    assert vocab / 3 < base["perplexity"] < vocab * 3, "a random model should be about as unsure as its vocabulary"
    assert base["mcq_chance"] == pytest.approx(0.25) and base["mcq_items"] == 24
    assert base["preference_items"] == 12 and base["generation_items"] == 8
    assert base["perplexity_tokens"] > 200 and base["perplexity_windows"] >= 2  # windows of 128 tokens
    for metrics in (base, tuned):
        for key in ("mcq_accuracy", "token_f1", "rouge_l", "preference_accuracy"):
            assert 0.0 <= metrics[key] <= 1.0
    assert world["losses"][-1] < world["losses"][0] / 2
    assert tuned["perplexity"] < base["perplexity"] / 5
    assert tuned["mcq_accuracy"] > base["mcq_accuracy"] and tuned["mcq_accuracy"] >= 0.75
    assert tuned["preference_accuracy"] >= 0.75
    assert tuned["token_f1"] > base["token_f1"]
    assert base_seconds < 60, f"evaluating a tiny model took {base_seconds:.1f}s (budget: 30s on a quiet machine)"

    report = compare(base, {"dapt": tuned, "sft": tuned})
    assert report.beats_base and report.final_stage == "sft"


def test_mcq_options_are_deterministic_same_kind_and_distinct():
    items = [QAItem([{"role": "user", "content": f"q{i}"}], a, k) for i, (a, k) in enumerate([
        ("The pump runs at 40 bar.", "fact"), ("The pump runs at 40 bar!", "fact"), ("Valves open at noon.", "fact"),
        ("Seals last ten years.", "fact"), ("Filters are blue.", "fact"), ("Ada built it.", "origin"),
        ("Jon built it.", "origin")])]
    options = build_mcq(items, 0, options=4, seed=3)
    assert options == build_mcq(items, 0, options=4, seed=3)
    assert options[0] == items[0].answer and len(options) == 4
    assert "The pump runs at 40 bar!" not in options, "a near-identical answer is not a distractor"
    assert all(items[[i.answer for i in items].index(o)].kind == "fact" for o in options)
    assert build_mcq(items[5:], 0, options=4, seed=3) == ["Ada built it.", "Jon built it."]


def test_token_f1_is_squad_style():
    assert token_f1("The Pump, runs!", "pump runs") == 1.0
    assert token_f1("pump runs fast", "pump runs") == pytest.approx(0.8)
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0


def test_missing_held_out_data_is_a_clear_error(world, tmp_path):
    from atelier.errors import AtelierError

    model, tokenizer = load_for_eval(world["base"])
    with pytest.raises(AtelierError, match="no held-out data"):
        evaluate_loaded(model, tokenizer, tmp_path)
    only_text = tmp_path / "partial"
    _write_jsonl(only_text / "dapt" / "heldout.jsonl", [{"text": "The zorblax reactor.", "source": "a"}])
    metrics = evaluate_loaded(model, tokenizer, only_text)
    assert "perplexity" in metrics and "mcq_accuracy" not in metrics
    report = compare(metrics, {"sft": metrics})
    assert not report.beats_base and not report.accepted
    assert any("mcq_accuracy: not measured" in r for r in report.reasons)


def _metrics(right: int, n: int, nll_per_token: float, windows: int = 20, order: int = 0) -> dict:
    """Metrics with per-item outcomes: `right` of `n` MCQ items right (the first ones, rotated by
    `order`), and `windows` perplexity windows of 100 tokens at about `nll_per_token` each."""
    mcq = [int(i < right) for i in range(n)]
    mcq = mcq[order:] + mcq[:order]
    wins = [[nll_per_token * 100 * (1 + 0.05 * ((i % 5) - 2)), 100] for i in range(windows)]
    return {"perplexity": math.exp(nll_per_token), "mcq_accuracy": right / n, "token_f1": 0.1,
            "outcomes": {"mcq_accuracy": mcq, "perplexity": wins}}


def test_compare_is_a_statistical_gate():
    base = _metrics(25, 100, math.log(400))
    # much better on both: significant, accepted
    good = compare(base, {"dapt": base, "dpo": _metrics(60, 100, math.log(40))})
    assert good.beats_base and good.accepted and not good.warnings and good.final_stage == "dpo"
    assert "outcomes" not in good.stages["base"] and "outcomes" not in good.stages["dpo"]
    tests = good.gate["tests"]
    assert tests["mcq_accuracy"]["test"] == "mcnemar-exact" and tests["mcq_accuracy"]["p_value"] < 1e-6
    assert tests["perplexity"]["outcome"] == "better" and tests["perplexity"]["delta"] < 0
    # the case: 0.28 vs 0.29 on 100 items while perplexity fell 4189 -> 522: noise, so accepted with a warning
    scifact = compare(_metrics(29, 100, math.log(4189)), {"sft": _metrics(28, 100, math.log(522))})
    assert scifact.accepted and not scifact.beats_base
    assert any("mcq_accuracy" in w and "not significantly" in w for w in scifact.warnings)
    assert "accepted with a warning" in scifact.reasons[0]
    # significantly worse on a required metric: refused, however good the other one is
    worse = compare(base, {"sft": _metrics(5, 100, math.log(40))})
    assert not worse.accepted and not worse.beats_base
    assert any("mcq_accuracy" in r and "significantly worse" in r for r in worse.gate["reasons"])
    worse_ppl = compare(base, {"sft": _metrics(60, 100, math.log(900))})
    assert not worse_ppl.accepted and worse_ppl.gate["tests"]["perplexity"]["outcome"] == "worse"
    # the level is the config's: at alpha 1e-9 a clear loss on 100 items is no longer "significant"
    from eval.gate import GateConfig

    lenient = compare(base, {"sft": _metrics(15, 100, math.log(300))}, GateConfig(alpha=1e-9))
    assert lenient.accepted and compare(base, {"sft": _metrics(15, 100, math.log(300))}).accepted is False


def test_compare_without_outcomes_falls_back_to_the_point_values():
    base = {"perplexity": 100.0, "mcq_accuracy": 0.25, "token_f1": 0.1}
    good = {"perplexity": 40.0, "mcq_accuracy": 0.5, "token_f1": 0.05}
    report = compare(base, {"dapt": base, "dpo": good})
    assert report.accepted and not report.beats_base
    assert any("not tested" in w for w in report.warnings)
    assert not compare(base, {"dpo": {**good, "mcq_accuracy": 0.25}}).accepted
    assert not compare(base, {"dpo": {**good, "perplexity": 100.5}}).accepted
    assert any("token_f1" in r and "worse" in r for r in report.reasons)
    missing = compare(base, {"dpo": {"perplexity": 40.0}})
    assert not missing.accepted and any("mcq_accuracy: not measured" in r for r in missing.gate["reasons"])


def test_report_files_agree(tmp_path):
    base = {"perplexity": 380.2, "mcq_accuracy": 0.25, "mcq_chance": 0.25, "token_f1": 0.01, "rouge_l": 0.02,
            "preference_accuracy": 0.5, "mcq_items": 24, "perplexity_tokens": 900}
    stages = {"dapt": {**base, "perplexity": 90.5}, "sft": {**base, "perplexity": 60.0, "mcq_accuracy": 0.75},
              "dpo": {**base, "perplexity": 61.0, "mcq_accuracy": 0.8, "preference_accuracy": 0.9}}
    report = compare(base, stages)
    paths = write_report(report, tmp_path / "eval")
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths.values())
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "eval").glob(".*.tmp")), "no temporary files left behind"

    saved = json.loads(paths["json"].read_text())
    assert saved == report.to_dict() and saved["accepted"] is True and saved["final_stage"] == "dpo"
    assert saved["beats_base"] is False, "no per-item outcomes: better, but not shown to be significant"
    markdown = paths["md"].read_text()
    assert markdown == render_markdown(report)
    assert "| metric | better | base | dapt | sft | dpo |" in markdown
    assert "| perplexity | ↓ | 380.2 | 90.5 | 60 | 61 |" in markdown
    assert "| mcq_accuracy | ↑ | 0.25 | 0.25 | 0.75 | 0.8 |" in markdown and "is accepted, but does not significantly beat" in markdown
    assert "## Gate: paired tests against the base" in markdown and "untested" in markdown

    figure = render_plot(report)
    plotted = [m for m, (d, _) in METRICS.items() if d]
    assert [ax.get_title().split()[0] for ax in figure.axes] == plotted
    for ax, metric in zip(figure.axes, plotted):
        line = ax.get_lines()[0]
        assert list(line.get_ydata()) == [saved["stages"][s][metric] for s in ("base", "dapt", "sft", "dpo")]
    assert math.isclose(figure.axes[1].get_lines()[1].get_ydata()[0], 0.25)  # the chance line
