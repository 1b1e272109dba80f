"""The parity check of `atelier specialist export`: the reference, and how close an artefact must come.

The reference is the adapter on its base (fp32, safetensors, offline), run greedily on a few
held-out prompts; an artefact passes when, teacher-forced on those continuations, it picks the
same tokens (near-ties aside) and its logits stay within a tolerance of the reference's.
Heavy imports (torch, numpy, peft, transformers) happen inside the functions.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atelier.config import StrictModel
from atelier.errors import AtelierError
from specialists.registry import SpecialistRecord

NEW_TOKENS, MAX_PROMPTS = 16, 5
BUILTIN_PROMPTS = ("What does this manual cover?", "What should I check before starting the equipment?",
                   "Explain the most important safety rule in one sentence.")


@dataclass(frozen=True)
class Tolerance:
    """How far an artefact may differ from the adapter on its base, in units of the logits' spread (σ).

    tie:   a different greedy token is accepted only when the expected one is within tie·σ of it
           (a near-tie that rounding can flip); otherwise the continuation is wrong.
    drift: the largest |logit difference| allowed anywhere, so a damaged tensor fails even when
           the few tested tokens happen to survive it.
    """

    tie: float
    drift: float


# Largest drifts measured (demo specialist / the chaotic random test model): f32 3e-6 / 1e-5 σ,
# f16 0.001 / 0.024 σ, q8_0 0.04 / 0.57 σ; q8_0 flipped near-ties with gaps of 0.008-0.09 σ.
# (The reference's own top-1/top-2 gaps go down to 0.005 σ: real near-ties exist.)
TOLERANCES = {"f32": Tolerance(1e-3, 1e-3), "f16": Tolerance(0.02, 0.1), "bf16": Tolerance(0.15, 1.0),
              "q8_0": Tolerance(0.15, 1.0)}


# llama.cpp itself: an f32 file drifts up to 0.0025 σ (its CPU kernels, f32 KV cache and all), and a
# q8_0 matmul runs on activations quantized to 8 bits too, so near-ties flip with larger gaps than a
# dequantize-then-f32 reference would (up to 0.3 σ seen on the chaotic random test model).
# A 4-6-bit base GGUF (the original SmolLM2 Q4_1 a converted base came from) is compared with its own
# dequantized weights, so only the 8-bit activations differ: 0.20 σ measured with a random adapter on it.
LLAMACPP_TOLERANCES = {**TOLERANCES, "f32": Tolerance(0.01, 0.01), "q8_0": Tolerance(0.5, 1.0),
                       "quantized": Tolerance(0.5, 1.0)}


class ParityReport(StrictModel):
    """What the parity check compared, and how close the artefact came."""

    artefact: str
    precision: str
    prompts: int
    tokens: int
    max_drift_sigma: float
    seconds: float


@dataclass
class Probe:
    """One held-out prompt and the reference (adapter-on-base) greedy continuation of it."""

    label: str
    text: str  # the prompt as the chat template renders it
    prompt_ids: list[int]
    tokens: list[int]
    logits: Any  # np.ndarray (len(tokens), vocab): the reference logits that chose each token

    @property
    def sequence(self) -> list[int]:
        return self.prompt_ids + self.tokens[:-1]


# ----------------------------------------------------------------------------- the reference, and parity


def held_out_conversations(record: SpecialistRecord) -> list[list[dict]]:
    """Up to 5 prompts (message lists without the answer) from the run's SFT held-out split, else built-ins."""
    path = Path(record.run_dir or "") / "data" / "sft" / "heldout.jsonl"
    found: list[list[dict]] = []
    if record.run_dir and path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            messages = json.loads(line).get("messages") if line.strip() else None
            if messages and messages[-1].get("role") == "assistant":
                messages = messages[:-1]
            if messages:
                found.append([{"role": m["role"], "content": m["content"]} for m in messages])
            if len(found) == MAX_PROMPTS:
                break
    return found or [[{"role": "user", "content": text}] for text in BUILTIN_PROMPTS]


def reference_probes(model, tokenizer, conversations: list[list[dict]]) -> list[Probe]:
    """Greedy continuations (16 new tokens) of the adapter on its base, with the logits behind them."""
    import torch

    context = getattr(model.config, "max_position_embeddings", 2048)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    probes = []
    for conversation in conversations:
        text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][-(context - NEW_TOKENS):]
        with torch.inference_mode():
            out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=pad)
            tokens = out[0, len(ids):].tolist()
            logits = model(input_ids=torch.tensor([ids + tokens[:-1]])).logits[0, len(ids) - 1:]
        probes.append(Probe(conversation[-1]["content"][:60], text, ids, tokens, logits.float().numpy()))
    return probes


LogitsFn = Callable[[list[list[int]], list[int]], list[Any]]


def torch_logits(model) -> LogitsFn:
    """logits_fn(sequences, starts) of a transformers model: logits at positions starts[i].. of each."""
    import torch

    def run(sequences: list[list[int]], starts: list[int]) -> list[Any]:
        with torch.inference_mode():
            return [model(input_ids=torch.tensor([ids])).logits[0, s:].float().numpy()
                    for ids, s in zip(sequences, starts, strict=True)]

    return run


def check_parity(probes: list[Probe], logits_fn: LogitsFn, precision: str, artefact: str, tokenizer) -> ParityReport:
    """Fail unless the artefact's greedy tokens are the reference's (near-ties aside) and its logits stay close.

    Teacher-forced: one forward pass over prompt + reference continuation gives the artefact's choice
    at every step; identical choices at every step is exactly an identical greedy continuation.
    """
    import numpy as np

    started, tolerance = time.perf_counter(), TOLERANCES[precision]
    candidates = logits_fn([p.sequence for p in probes], [len(p.prompt_ids) - 1 for p in probes])
    worst = 0.0
    for number, (probe, logits) in enumerate(zip(probes, candidates, strict=True), start=1):
        sigma = probe.logits.std(axis=-1)
        drift = float((np.abs(logits - probe.logits).max(axis=-1) / sigma).max())
        steps = np.arange(len(probe.tokens))
        gap = (logits.max(axis=-1) - logits[steps, probe.tokens]) / sigma
        wrong = np.nonzero((logits.argmax(axis=-1) != np.asarray(probe.tokens)) & (gap > tolerance.tie))[0]
        worst = max(worst, drift)
        if wrong.size or drift > tolerance.drift:
            got = _greedy(logits_fn, probe.prompt_ids, len(probe.tokens))
            where = f"first difference at new token {int(wrong[0]) + 1}; " if wrong.size else ""
            raise AtelierError(
                f"parity check failed for the {artefact} ({precision}), so nothing was written: prompt {number}/"
                f"{len(probes)} {probe.label!r}: expected tokens {probe.tokens} ({tokenizer.decode(probe.tokens)!r}), "
                f"got {got} ({tokenizer.decode(got)!r}); {where}max logit drift {drift:.3g}σ (allowed "
                f"{tolerance.drift}σ). Try a less lossy --quantize; if f32 fails too, report it as an exporter bug")
    return ParityReport(artefact=artefact, precision=precision, prompts=len(probes),
                        tokens=sum(len(p.tokens) for p in probes), max_drift_sigma=round(worst, 6),
                        seconds=round(time.perf_counter() - started, 2))


def _greedy(logits_fn: LogitsFn, prompt_ids: list[int], count: int) -> list[int]:
    """The artefact's own greedy continuation (only for the failure message)."""
    ids = list(prompt_ids)
    for _ in range(count):
        ids.append(int(logits_fn([ids], [len(ids) - 1])[0][-1].argmax()))
    return ids[len(prompt_ids):]


# ----------------------------------------------------------------------------- parity in llama.cpp itself


def check_parity_in_llamacpp(probes: list[Probe], gguf: Path, precision: str, artefact: str,
                             tokenizer, *, adapter: Path | None = None) -> ParityReport:
    """Run the exported GGUF in llama.cpp — the runtime users will run — and compare with the reference.

    For each probe llama.cpp continues the prompt's token ids greedily and reports the log-probabilities
    of its top candidates at every step. Its tokens must be the reference's until the first step where
    the two disagree on a near-tie (the reference's own top-1/chosen gap under the tolerance); there the
    continuations may part. Up to that point, the candidates' log-probabilities must stay within the
    tolerance of the reference's (in units of the reference logits' standard deviation).
    """
    import numpy as np

    from atelier.llamacpp import private_server

    started, tolerance = time.perf_counter(), LLAMACPP_TOLERANCES.get(precision) or TOLERANCES[precision]
    context = max(len(p.prompt_ids) + len(p.tokens) for p in probes) + 8
    worst, compared = 0.0, 0
    lora = [{"id": 0, "scale": 1.0}] if adapter else None
    with private_server(gguf, n_ctx=max(128, context), adapters=(adapter,) if adapter else ()) as server:
        for number, probe in enumerate(probes, start=1):
            got, steps = llamacpp_greedy(server.url.removesuffix("/v1"), probe.prompt_ids, len(probe.tokens),
                                         lora=lora)
            reference = probe.logits - np.log(np.exp(probe.logits - probe.logits.max(-1, keepdims=True))
                                              .sum(-1, keepdims=True)) - probe.logits.max(-1, keepdims=True)
            for i, token in enumerate(got[: len(probe.tokens)]):
                sigma = float(probe.logits[i].std())
                candidates = steps.get(i, [])
                drift = max((abs(c["logprob"] - float(reference[i][c["id"]])) for c in candidates), default=0.0) / sigma
                worst, compared = max(worst, drift), compared + 1
                gap = float(probe.logits[i].max() - probe.logits[i][token]) / sigma
                wrong = token != probe.tokens[i] and gap > tolerance.tie
                if wrong or drift > tolerance.drift:
                    where = f"first difference at new token {i + 1}; " if wrong else ""
                    raise AtelierError(
                        f"parity check failed for the {artefact} ({precision}) run in llama.cpp, so nothing was "
                        f"written: prompt {number}/{len(probes)} {probe.label!r}: expected tokens {probe.tokens} "
                        f"({tokenizer.decode(probe.tokens)!r}), got {got} ({tokenizer.decode(got)!r}); {where}"
                        f"log-probability drift {drift:.3g}σ (allowed {tolerance.drift}σ). Try a less lossy "
                        "--quantize; if f32 fails too, report it as an exporter bug")
                if token != probe.tokens[i]:
                    break  # a near-tie went the other way: the continuations part here, legitimately
    return ParityReport(artefact=f"{artefact} in llama.cpp", precision=precision, prompts=len(probes),
                        tokens=compared, max_drift_sigma=round(worst, 6), seconds=round(time.perf_counter() - started, 2))


def llamacpp_greedy(address: str, prompt_ids: list[int], count: int, candidates: int = 8,
                    lora: list[dict] | None = None) -> tuple[list[int], dict[int, list[dict]]]:
    """llama.cpp's greedy continuation of token ids, and {step: top candidates [{"id", "logprob"}]}.

    llama.cpp leaves out the probabilities of a token that ends inside a UTF-8 character, so the
    entries it does give are matched to the tokens by id, in order.
    """
    import httpx

    body = {"prompt": list(prompt_ids), "n_predict": count, "temperature": 0.0, "samplers": ["top_k"], "top_k": 1,
            "n_probs": candidates, "post_sampling_probs": False, "cache_prompt": False, "return_tokens": True}
    if lora is not None:
        body["lora"] = lora  # per request: which loaded adapters apply, at what scale
    reply = httpx.post(f"{address}/completion", json=body, timeout=300)
    if reply.status_code != 200:
        raise AtelierError(f"llama.cpp could not run the exported file (HTTP {reply.status_code}: {reply.text[:200]})")
    data = reply.json()
    tokens, entries, steps = list(data.get("tokens") or []), list(data.get("completion_probabilities") or []), {}
    for i, token in enumerate(tokens):
        if entries and entries[0].get("id") == token:
            steps[i] = entries.pop(0).get("top_logprobs") or []
    return tokens, steps
