"""Does a specialist know its domain better than its base? Held-out metrics for one model.

Four views of the held-out split, each cheap enough to run on a CPU after every stage:
perplexity on domain text (does it model the language?), multiple choice built from held-out
Q/A pairs (does it prefer the right answer over plausible wrong ones?), greedy answers scored
by token F1 and ROUGE-L (can it say it?), and preference accuracy on held-out DPO pairs (does
it rank chosen over rejected?). Torch is imported inside functions, so importing this module
for its config keeps `atelier --help` light.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from atelier.config import StrictModel
from atelier.errors import AtelierError
from atelier.jsonl import iter_jsonl
from eval.answers import normalize_answer, token_f1
from eval.gate import GateConfig
from eval.scoring import left_pad, score_continuations, score_options
from specialists.loading import load_model, load_tokenizer, pick_device

MCQNorm = Literal["bytes", "tokens", "none", "pmi"]
NEUTRAL_PROMPT = [{"role": "user", "content": "Answer:"}]  # the premise of `pmi` scoring


class SpecialistEvalConfig(StrictModel):
    """How much of the held-out split to score, and how. A cap of 0 skips that metric."""

    max_perplexity_texts: int = Field(200, ge=0, description="At most this many held-out domain texts "
                                      "(dapt/heldout.jsonl) for perplexity; a seeded sample when there are more.")
    max_window: int = Field(1024, ge=16, description="Upper bound on the perplexity window in tokens: the window "
                            "is the model's context size, or this when that is larger (keeps CPU memory sane).")
    max_mcq_items: int = Field(100, ge=0, description="At most this many multiple-choice questions built from "
                               "held-out SFT pairs (sft/heldout.jsonl).")
    mcq_normalization: MCQNorm = Field("bytes", description="How an option's log-likelihood is length-normalised "
                                       "before the options are compared: bytes (sum of log p over the option's "
                                       "UTF-8 length, lm-evaluation-harness's acc_norm, comparable across "
                                       "tokenizers), tokens (mean per token), none (plain sum), or pmi (log p of "
                                       "the option after the question minus after a neutral 'Answer:' prompt: "
                                       "an option that is likely anywhere, such as a value the domain repeats, "
                                       "gains nothing; Holtzman et al. 2021, one more short pass per distinct "
                                       "option).")
    mcq_options: int = Field(4, ge=2, le=10, description="Options per multiple-choice question: the reference "
                             "answer plus this many minus one distractors taken from other held-out answers.")
    max_generation_items: int = Field(40, ge=0, description="At most this many held-out SFT questions answered by "
                                      "greedy generation for token F1 and ROUGE-L (generation is the slow part).")
    max_new_tokens: int = Field(48, ge=1, le=2048, description="Longest generated answer on the held-out split, "
                                "in tokens.")
    exam_max_new_tokens: int = Field(32, ge=1, le=2048, description="Longest generated answer to an exam question "
                                     "(`atelier eval specialist`), in tokens: exam answers are short facts.")
    generation_batch_size: int = Field(16, ge=1, description="Prompts per batch when generating (decoding on a "
                                       "CPU is bound by reading the weights, so larger batches cost little more).")
    max_preference_items: int = Field(100, ge=0, description="At most this many held-out DPO pairs "
                                      "(dpo/heldout.jsonl) for preference accuracy.")
    batch_size: int = Field(8, ge=1, description="Sequences per forward pass when scoring and generating; "
                            "perplexity windows are grouped to about batch_size x 256 tokens.")
    seed: int = Field(0, description="Seed for sampling held-out items and drawing MCQ distractors.")
    device: str = Field("auto", pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$",
                        description="Where to run: auto (CUDA, then MPS, else CPU), cpu, cuda, cuda:N or mps.")
    rag_passages: int = Field(3, ge=1, le=20, description="Passages retrieved per question for `--rag` "
                              "(search alone, and in the specialist's prompt).")
    rag_passage_chars: int = Field(400, ge=50, description="Each passage is cut to this many characters, as the "
                                   "orchestrator's search route quotes it (long prompts make --rag slow on a CPU).")
    gate: GateConfig = Field(default_factory=GateConfig, description="The statistical registration gate: "
                             "significance level, interval coverage, bootstrap size and required metrics.")


@dataclass
class QAItem:
    """One held-out SFT pair: the conversation up to the answer, and the reference answer."""

    prompt: list[dict[str, str]]
    answer: str
    kind: str


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file; a missing file is an empty split (that metric is then skipped)."""
    if not path.is_file():
        return []
    return [row for _, row in iter_jsonl(path, fix="regenerate the data")]


def adapter_list(adapter_dir: Path | Sequence[Path] | None) -> list[Path]:
    if adapter_dir is None:
        return []
    return [Path(adapter_dir)] if isinstance(adapter_dir, (str, Path)) else [Path(a) for a in adapter_dir]


def load_for_eval(model_dir: Path, adapter_dir: Path | Sequence[Path] | None = None, device: str = "auto"):
    """(model, tokenizer) in eval mode, fp32, with the LoRA adapter(s) merged in for speed.

    Several adapters are merged in order, for stages trained on top of each other (SFT on the
    DAPT-merged base). The tokenizer comes from the model dir; an adapter dir's copy is used only
    when the base lacks a chat template (a training stage may have added one).
    """
    if not (Path(model_dir) / "config.json").is_file():
        raise AtelierError(f"{model_dir} is not a model folder (no config.json); pass a local causal LM")
    adapters = adapter_list(adapter_dir)
    tokenizer = load_tokenizer(model_dir)
    for adapter in reversed(adapters):
        if tokenizer.chat_template is None and (adapter / "tokenizer_config.json").is_file():
            tokenizer = load_tokenizer(adapter)
    if tokenizer.chat_template is None:
        raise AtelierError(f"the tokenizer in {model_dir} has no chat template; use an instruct/chat base model "
                           "or save a tokenizer with a chat template")
    return load_model(model_dir, adapters, merge=True, device=pick_device(device), dtype="float32"), tokenizer


def chat_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a conversation ending in the assistant's turn opener (the template's own specials)."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids or [tokenizer.bos_token_id or tokenizer.eos_token_id]


def text_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def context_size(model, config: SpecialistEvalConfig) -> int:
    size = getattr(model.config, "max_position_embeddings", None) or config.max_window
    return min(int(size), config.max_window)


def sample_rows(rows: list, cap: int, seed: int) -> list:
    """A seeded, order-preserving sample of at most `cap` rows."""
    if len(rows) <= cap:
        return list(rows)
    keep = sorted(random.Random(seed).sample(range(len(rows)), cap))
    return [rows[i] for i in keep]


def perplexity(model, tokenizer, texts: list[str], config: SpecialistEvalConfig) -> dict[str, float]:
    """Token-weighted perplexity over fixed, non-overlapping windows of the model's context size.

    Texts are joined with EOS into one stream (as in pretraining) and cut into windows that
    overlap by one token: each window's first token is context only, so every token but the
    stream's first is predicted exactly once.
    """
    import math

    stream: list[int] = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    for text in texts:
        stream += text_ids(tokenizer, text) + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
    window = context_size(model, config)
    pairs = [(stream[i:i + 1], stream[i + 1:i + window]) for i in range(0, len(stream) - 1, window - 1)]
    if not pairs:
        return {}
    per_batch = max(1, config.batch_size * 256 // window)
    scores = score_continuations(model, pairs, per_batch, tokenizer.pad_token_id, window)
    tokens = sum(n for _, n in scores)
    nll = -sum(lp for lp, _ in scores) / tokens
    return {"perplexity": math.exp(min(nll, 700.0)), "perplexity_tokens": tokens, "perplexity_windows": len(pairs),
            "outcomes": {"perplexity": [[-lp, n] for lp, n in scores]}}


def qa_items(rows: list[dict[str, Any]]) -> list[QAItem]:
    """Held-out SFT rows as (conversation before the last assistant turn, that turn's text, kind)."""
    items = []
    for row in rows:
        messages = row.get("messages") or []
        last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
        if last is None or last == 0 or not str(messages[last].get("content", "")).strip():
            continue
        prompt = [{"role": m["role"], "content": m["content"]} for m in messages[:last]]
        items.append(QAItem(prompt, messages[last]["content"].strip(), str(row.get("kind") or "")))
    return items


def _near_identical(a: str, b: str) -> bool:
    """Same answer up to case, punctuation and articles, or nearly the same words (token F1 >= 0.9)."""
    na, nb = normalize_answer(a), normalize_answer(b)
    return na == nb or token_f1(a, b) >= 0.9


def build_mcq(items: list[QAItem], index: int, options: int, seed: int) -> list[str]:
    """Options for item `index`: its answer first, then up to options-1 distractors from other answers.

    Distractors are drawn with a per-item seeded RNG, same-`kind` answers first (they look alike,
    so the question tests knowledge rather than style), skipping any near-identical to the answer
    or to a distractor already taken. Deterministic for a given seed and item list.
    """
    rng = random.Random(f"{seed}:{index}")
    item = items[index]
    same = [o.answer for j, o in enumerate(items) if j != index and o.kind == item.kind]
    other = [o.answer for j, o in enumerate(items) if j != index and o.kind != item.kind]
    rng.shuffle(same)
    rng.shuffle(other)
    chosen = [item.answer]
    for candidate in same + other:
        if len(chosen) == options:
            break
        if not any(_near_identical(candidate, taken) for taken in chosen):
            chosen.append(candidate)
    return chosen


def option_score(logprob: float, tokens: int, text: str, normalization: MCQNorm) -> float:
    """An option's log-likelihood, length-normalised as configured (see `mcq_normalization`; pmi: none here)."""
    if normalization == "bytes":
        return logprob / max(len(text.encode("utf-8")), 1)
    if normalization == "tokens":
        return logprob / max(tokens, 1)
    return logprob


def choice_scores(model, tokenizer, prompts: list[list[dict[str, str]]], options: list[list[str]],
                  config: SpecialistEvalConfig) -> list[list[float]]:
    """Every option's score after its prompt (conversations), normalised as `config.mcq_normalization` says."""
    scores = score_options(model, [chat_ids(tokenizer, p) for p in prompts],
                           [[text_ids(tokenizer, o) for o in opts] for opts in options], config.batch_size,
                           tokenizer.pad_token_id, context_size(model, config))
    normed = [[option_score(lp, n, text, config.mcq_normalization) for (lp, n), text in zip(row, opts)]
              for row, opts in zip(scores, options)]
    if config.mcq_normalization != "pmi":
        return normed
    distinct = sorted({o for opts in options for o in opts})
    step = max(1, config.batch_size) * 4  # options per neutral prompt row (short rows: cheap)
    chunks = [distinct[i:i + step] for i in range(0, len(distinct), step)]
    neutral_ids = chat_ids(tokenizer, NEUTRAL_PROMPT)
    prior = score_options(model, [neutral_ids] * len(chunks), [[text_ids(tokenizer, o) for o in c] for c in chunks],
                          1, tokenizer.pad_token_id, context_size(model, config))
    unconditional = {o: lp for chunk, row in zip(chunks, prior) for o, (lp, _) in zip(chunk, row)}
    return [[score - unconditional[o] for score, o in zip(row, opts)] for row, opts in zip(normed, options)]


def mcq_accuracy(model, tokenizer, items: list[QAItem], config: SpecialistEvalConfig) -> dict[str, float]:
    """Share of questions whose reference answer has the highest length-normalised log-likelihood.

    Normalised (by default per byte, as lm-evaluation-harness's acc_norm) so that long options
    are not penalised for their length; chance is the mean of 1/options over the questions
    (fewer options when the pool lacks distinct distractors).
    """
    picked = sample_rows(list(range(len(items))), config.max_mcq_items, config.seed)
    questions = [(i, build_mcq(items, i, config.mcq_options, config.seed)) for i in picked]
    questions = [(i, opts) for i, opts in questions if len(opts) >= 2]
    if not questions:
        return {}
    scores = choice_scores(model, tokenizer, [items[i].prompt for i, _ in questions], [o for _, o in questions],
                           config)
    outcomes = [int(max(range(len(row)), key=row.__getitem__) == 0) for row in scores]
    chance = sum(1 / len(opts) for _, opts in questions) / len(questions)
    return {"mcq_accuracy": sum(outcomes) / len(questions), "mcq_chance": chance, "mcq_items": len(questions),
            "outcomes": {"mcq_accuracy": outcomes}}


def _eos_ids(model, tokenizer) -> list[int]:
    """Every id that ends a turn: the generation config's (may be several) and the tokenizer's."""
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids = configured if isinstance(configured, list) else [configured]
    return sorted({i for i in [*ids, tokenizer.eos_token_id] if i is not None})


def generate_answers(model, tokenizer, prompts: list[list[dict[str, str]]], config: SpecialistEvalConfig,
                     max_new_tokens: int | None = None) -> list[str]:
    """Greedy answers, batched by prompt length with left padding; only the new tokens are decoded."""
    import torch
    from transformers import GenerationConfig

    max_new_tokens = max_new_tokens or config.max_new_tokens
    settings = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=_eos_ids(model, tokenizer))
    device = next(model.parameters()).device
    limit = max(1, context_size(model, config) - max_new_tokens)
    seqs = [chat_ids(tokenizer, p)[-limit:] for p in prompts]
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # similar lengths together: less padding
    answers: list[str] = [""] * len(seqs)
    step = config.generation_batch_size
    with torch.inference_mode():
        for start in range(0, len(order), step):
            chunk = order[start:start + step]
            ids, mask = left_pad([seqs[i] for i in chunk], tokenizer.pad_token_id)
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=settings)
            for i, text in zip(chunk, tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)):
                answers[i] = text.strip()
    return answers


def generation_scores(model, tokenizer, items: list[QAItem], config: SpecialistEvalConfig) -> dict[str, float]:
    """Mean token F1 and ROUGE-L (F-measure, stemmed) of greedy answers against the references."""
    from rouge_score import rouge_scorer

    picked = sample_rows(items, config.max_generation_items, config.seed)
    if not picked:
        return {}
    answers = generate_answers(model, tokenizer, [i.prompt for i in picked], config)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    f1 = [token_f1(a, i.answer) for a, i in zip(answers, picked)]
    rouge = [scorer.score(i.answer, a)["rougeL"].fmeasure for a, i in zip(answers, picked)]
    return {"token_f1": sum(f1) / len(f1), "rouge_l": sum(rouge) / len(rouge), "generation_items": len(picked),
            "outcomes": {"token_f1": f1}}


def preference_accuracy(model, tokenizer, rows: list[dict[str, Any]], config: SpecialistEvalConfig) -> dict[str, float]:
    """Share of held-out DPO pairs where chosen has a higher mean per-token log-likelihood than rejected."""
    rows = [r for r in rows if r.get("prompt") and r.get("chosen") and r.get("rejected")]
    rows = sample_rows(rows, config.max_preference_items, config.seed)
    if not rows:
        return {}
    pairs = []
    for row in rows:
        prompt = row["prompt"] if isinstance(row["prompt"], list) else [{"role": "user", "content": row["prompt"]}]
        context = chat_ids(tokenizer, prompt)
        for side in ("chosen", "rejected"):  # conversational (list of turns) or plain text
            reply = row[side][-1]["content"] if isinstance(row[side], list) else row[side]
            pairs.append((context, text_ids(tokenizer, str(reply))))
    scores = score_continuations(model, pairs, config.batch_size, tokenizer.pad_token_id, context_size(model, config))
    means = [lp / max(n, 1) for lp, n in scores]
    wins = [int(means[k] > means[k + 1]) for k in range(0, len(means), 2)]
    return {"preference_accuracy": sum(wins) / len(rows), "preference_items": len(rows),
            "outcomes": {"preference_accuracy": wins}}


def evaluate_loaded(model, tokenizer, data_dir: Path, config: SpecialistEvalConfig | None = None) -> dict[str, Any]:
    """All held-out metrics for an already loaded model; metrics whose split is empty are left out.

    Besides the scores, `outcomes` holds the per-item results the paired gate tests compare
    (`eval.report.compare` strips it from the report): per window (NLL, tokens) for perplexity,
    0/1 per question for MCQ and preference, token F1 per generated answer.
    """
    config, data_dir, started = config or SpecialistEvalConfig(), Path(data_dir), time.perf_counter()
    model.eval()  # a model handed over by a trainer is still in training mode (dropout on)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    texts = [str(r["text"]) for r in read_jsonl(data_dir / "dapt" / "heldout.jsonl") if str(r.get("text", "")).strip()]
    items = qa_items(read_jsonl(data_dir / "sft" / "heldout.jsonl"))
    prefs = read_jsonl(data_dir / "dpo" / "heldout.jsonl")
    if not texts and not items and not prefs:
        raise AtelierError(f"no held-out data under {data_dir} (dapt/, sft/, dpo/heldout.jsonl); "
                           "generate the training data first")
    metrics: dict[str, Any] = {}
    outcomes: dict[str, list] = {}
    for part in (perplexity(model, tokenizer, sample_rows(texts, config.max_perplexity_texts, config.seed), config),
                 mcq_accuracy(model, tokenizer, items, config), generation_scores(model, tokenizer, items, config),
                 preference_accuracy(model, tokenizer, prefs, config)):
        outcomes |= part.pop("outcomes", {})
        metrics |= part
    metrics["eval_seconds"] = round(time.perf_counter() - started, 3)
    metrics["outcomes"] = outcomes
    return metrics


def evaluate_model(model_dir: Path, adapter_dir: Path | Sequence[Path] | None, data_dir: Path,
                   config: SpecialistEvalConfig | None = None) -> dict[str, float]:
    """Held-out metrics of a base model, optionally with LoRA adapter(s) merged in order (see `evaluate_loaded`)."""
    config = config or SpecialistEvalConfig()
    model, tokenizer = load_for_eval(Path(model_dir), adapter_dir, config.device)
    return evaluate_loaded(model, tokenizer, data_dir, config)
