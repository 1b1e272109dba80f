"""`atelier specialist export NAME --to merged|gguf|ollama|vllm`: ship a specialist where users run models.

    merged   the LoRA adapter merged into its base: safetensors, tokenizer, chat template, model card
    gguf     that merged model as one GGUF file for llama.cpp (f32, f16, q8_0; see gguf_export.py)
    ollama   a Modelfile: FROM an Ollama library base + ADAPTER when Ollama knows the base, else FROM
             a GGUF (Llama) or the merged folder, with the chat template translated to Go syntax;
             created in a reachable Ollama server and registered back as `served_by: ollama:NAME`
    vllm     the adapter laid out for `vllm serve --enable-lora --lora-modules`, with SERVE.md

Nothing is written unless the artefact passes a parity check: its greedy continuations of a few
held-out prompts must be those of the adapter on its base. Each export is assembled in a hidden
temporary folder and renamed into place at the end, so a failure leaves no half-written output.
Heavy imports (torch, transformers, gguf) happen inside the functions: `atelier --help` stays light.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer

from atelier.config import StrictModel
from atelier.errors import AtelierError
from atelier.home import atelier_home, atomic_write_text
from specialists.registry import Registry, SpecialistRecord, check_adapter_files

log = logging.getLogger(__name__)

TARGETS = ("merged", "gguf", "ollama", "vllm")
QUANTIZE = {"merged": ("f32", "f16"), "gguf": ("f32", "f16", "q8_0", "q4_k_m"),
            "ollama": ("f32", "f16", "q8_0", "q4_k_m"), "vllm": ()}
MANIFEST = "export.json"  # written last into every export folder; marks folders an export may replace
NEW_TOKENS, MAX_PROMPTS = 16, 5
BUILTIN_PROMPTS = ("What does this manual cover?", "What should I check before starting the equipment?",
                   "Explain the most important safety rule in one sentence.")
# Hugging Face ids of bases that Ollama's library serves and whose safetensors LoRA adapters its
# ADAPTER instruction imports (Llama, Mistral, Gemma families): HF id -> Ollama tag.
OLLAMA_BASES = {
    "meta-llama/llama-3.2-1b-instruct": "llama3.2:1b", "meta-llama/llama-3.2-3b-instruct": "llama3.2:3b",
    "meta-llama/llama-3.1-8b-instruct": "llama3.1:8b", "meta-llama/meta-llama-3.1-8b-instruct": "llama3.1:8b",
    "meta-llama/meta-llama-3-8b-instruct": "llama3:8b", "mistralai/mistral-7b-instruct-v0.3": "mistral:7b",
    "google/gemma-2-2b-it": "gemma2:2b", "google/gemma-2-9b-it": "gemma2:9b"}
CHATML_GO_TEMPLATE = ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
                      "{{ end }}<|im_start|>assistant\n")
EXPORTED_AS = {"merged": "as merged safetensors weights", "gguf": "as a GGUF file for llama.cpp",
               "ollama": "for Ollama", "vllm": "as a LoRA adapter for vLLM"}
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's --max-lora-rank accepts
DEFAULT_OLLAMA_URL = "http://127.0.0.1:11434"


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


class ParityReport(StrictModel):
    """What the parity check compared, and how close the artefact came."""

    artefact: str
    precision: str
    prompts: int
    tokens: int
    max_drift_sigma: float
    seconds: float


class ExportResult(StrictModel):
    """What `export_specialist` wrote and what to run next."""

    name: str
    version: int
    target: str
    out_dir: str
    files: list[str]
    quantize: str | None
    parity: ParityReport
    commands: list[str]
    served_by: str | None = None
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


@dataclass
class Staged:
    """What a target writer produced in the staging folder."""

    parity: ParityReport
    commands: list[str] = field(default_factory=list)
    card: dict[str, Any] = field(default_factory=dict)  # library_name / tags for the model card
    ollama: OllamaPlan | None = None
    details: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- the entry point


def export_specialist(name: str, to: str, *, out: Path | None = None, quantize: str | None = None,
                      version: int | None = None, registry: Registry | None = None,
                      create: bool | None = None) -> ExportResult:
    """Export specialist `name` (active version unless `version`) to `to`; see the module docstring.

    create: ollama only: create the model in the Ollama server and register `served_by`
            (None: when a server answers at OLLAMA_HOST or 127.0.0.1:11434).
    """
    started = time.perf_counter()
    registry = registry or Registry()
    record = registry.get(name, version)
    _check_options(record, to, quantize)
    out_dir = Path(out) if out else atelier_home() / "exports" / f"{name}-v{record.version}-{to}"
    _check_replaceable(out_dir)
    model, tokenizer = load_specialist(record)
    probes = reference_probes(model, tokenizer, held_out_conversations(record))
    with _staging(out_dir) as tmp:
        staged = WRITERS[to](record, model, tokenizer, probes, tmp, quantize, out_dir)
        atomic_write_text(tmp / "README.md", model_card(record, to, staged))
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file()) + [MANIFEST]
        result = ExportResult(name=name, version=record.version, target=to, out_dir=str(out_dir), files=files,
                              quantize=quantize, parity=staged.parity, commands=staged.commands,
                              seconds=round(time.perf_counter() - started, 2))
        atomic_write_text(tmp / MANIFEST, json.dumps({**result.model_dump(mode="json"), **staged.details},
                                                     indent=2, default=str) + "\n")
    if staged.ollama is not None and (served_by := _maybe_create_in_ollama(registry, record, out_dir, staged.ollama,
                                                                           create)):
        result.served_by = served_by
        manifest = json.loads((out_dir / MANIFEST).read_text(encoding="utf-8"))
        atomic_write_text(out_dir / MANIFEST, json.dumps({**manifest, "served_by": served_by}, indent=2) + "\n")
    result.seconds = round(time.perf_counter() - started, 2)
    return result


def _check_options(record: SpecialistRecord, to: str, quantize: str | None) -> None:
    """Fail on a bad target or quantization before anything is loaded."""
    if to not in TARGETS:
        raise AtelierError(f"unknown export target {to!r}; use --to {' | '.join(TARGETS)}")
    if quantize is not None and quantize not in QUANTIZE[to]:
        allowed = f"use one of {', '.join(QUANTIZE[to])}" if QUANTIZE[to] else "leave --quantize out"
        raise AtelierError(f"unsupported quantization {quantize!r} for --to {to}; {allowed}"
                           + ("" if to == "gguf" else " (quantized files: --to gguf)"))
    if to == "gguf":
        from transformers import AutoConfig

        from specialists import gguf_export

        gguf_export.check_quantization(quantize or "f16")
        gguf_export.check_llama(AutoConfig.from_pretrained(_weights_of(record), local_files_only=True))
    if to == "ollama" and quantize and ollama_base_tag(record):
        raise AtelierError(f"--quantize does not apply: the adapter goes on Ollama's own build of "
                           f"{ollama_base_tag(record)}; leave --quantize out")
    if to == "vllm" and record.full_model:
        raise AtelierError(f"specialist {record.name!r} is a full model, not an adapter; export --to merged "
                           "and serve that folder with `vllm serve DIR`")


# ----------------------------------------------------------------------------- loading and parity


def load_specialist(record: SpecialistRecord):
    """(model, tokenizer): the adapter on its base in fp32 (or the full model), safetensors only, offline."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _weights_of(record)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, use_safetensors=True,
                                                     local_files_only=True)
    except (OSError, ValueError) as exc:
        raise AtelierError(f"cannot load {source} for specialist {record.name!r} ({exc}); the base must be "
                           "on this machine") from None
    if not record.full_model:
        model = _attach(model, check_adapter_files(record))
    return model.eval(), tokenizer


def _weights_of(record: SpecialistRecord) -> str:
    return str(record.model_path if record.full_model else record.base_model)


def _attach(model, adapter: Path):
    import warnings

    from peft import PeftModel

    with warnings.catch_warnings():  # peft 0.21 asks transformers 5 a deprecated question; not ours to fix
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return PeftModel.from_pretrained(model, str(adapter), is_trainable=False).eval()


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


# ----------------------------------------------------------------------------- target writers


def write_merged(record, model, tokenizer, probes, folder: Path, quantize: str | None, out_dir: Path) -> Staged:
    """merge_and_unload, save safetensors + tokenizer (chat_template.jinja), reload with transformers, compare."""
    import torch
    from transformers import AutoModelForCausalLM

    merged = _merge(model)
    precision = quantize or {"float16": "f16", "bfloat16": "bf16"}.get(_source_dtype(record), "f32")
    merged.to({"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32}[precision]).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True).eval()
    parity = check_parity(probes, torch_logits(reloaded), precision, "merged model", tokenizer)
    run = (f"python -c \"from transformers import pipeline; print(pipeline('text-generation', '{out_dir}')"
           "([{'role': 'user', 'content': 'Hello'}]))\"")
    return Staged(parity, [run],
                  card={"library_name": "transformers", "tags": ["merged"]})


def write_gguf_target(record, model, tokenizer, probes, folder: Path, quantize: str | None, out_dir: Path) -> Staged:
    """One GGUF file of the merged model, read back with GGUFReader and run by the numpy reference."""
    from specialists import gguf_export

    quantize = quantize or "f16"
    merged = _merge(model)
    path = folder / f"{record.name}-v{record.version}-{quantize}.gguf"
    gguf_export.write_gguf(merged, tokenizer, path, quantize, name=f"{record.name}-v{record.version}")
    gf = gguf_export.check_gguf(path, merged.config, merged.config.vocab_size)
    gguf_export.check_tokenizer(path, {p.text: p.prompt_ids for p in probes})
    parity = check_parity(probes, lambda seqs, starts: gguf_export.gguf_logits(gf, seqs, starts), quantize,
                          "GGUF file", tokenizer)
    final = out_dir / path.name
    return Staged(parity, [f"llama-cli -m {final} -cnv", f"llama-server -m {final} --port 8080 --jinja"],
                  card={"tags": ["gguf", "llama.cpp"]}, details={"gguf": gf.summary()})


def write_vllm(record, model, tokenizer, probes, folder: Path, quantize: str | None, out_dir: Path) -> Staged:
    """The adapter with base_model_name_or_path set to what `vllm serve` is given, plus SERVE.md."""
    config = _copy_adapter(record, folder)
    if config.get("modules_to_save"):
        raise AtelierError(f"the adapter of {record.name!r} trains whole modules ({config['modules_to_save']}), "
                           "which vLLM's LoRA support does not load; export --to merged and `vllm serve` that folder")
    _copy_tokenizer_if_changed(check_adapter_files(record), folder, tokenizer)
    parity = check_parity(probes, torch_logits(_adapter_on_base(record, folder)), "f32", "vLLM adapter", tokenizer)
    base = config["base_model_name_or_path"]
    rank = next((r for r in VLLM_RANKS if r >= int(config.get("r", 8))), VLLM_RANKS[-1])
    serve = (f"vllm serve {base} --enable-lora --lora-modules {record.name}={out_dir} --max-lora-rank {rank} "
             f"--max-model-len {model.config.max_position_embeddings}")
    load = (f"curl -X POST http://localhost:8000/v1/load_lora_adapter -H 'Content-Type: application/json' "
            f"-d '{json.dumps({'lora_name': record.name, 'lora_path': str(out_dir)})}'")
    atomic_write_text(folder / "SERVE.md", "\n".join([
        f"# Serving {record.name} v{record.version} with vLLM", "",
        "Start vLLM with the adapter:", "", "```bash", serve, "```", "",
        "or load it into a running server (started with `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True` and `--enable-lora`):",
        "", "```bash", load, "```", "",
        (f"Requests then name the model `{record.name}`. For Atelier's orchestrator to call it, register the "
         f"specialist with `served_by: openai:{record.name}@http://localhost:8000/v1`."), ""]))
    return Staged(parity, [serve, load], card={"library_name": "peft", "tags": ["lora", "vllm"]})


WRITERS = {"merged": write_merged, "gguf": write_gguf_target, "vllm": write_vllm}  # "ollama" added below


def _merge(model):
    """The plain transformers model with the adapter folded into its weights (a full model as it is)."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def _source_dtype(record: SpecialistRecord) -> str:
    """The dtype the base (or full model) is stored in, as 'float32', 'bfloat16', ..."""
    from transformers import AutoConfig

    dtype = getattr(AutoConfig.from_pretrained(_weights_of(record), local_files_only=True), "dtype", None)
    return str(dtype).removeprefix("torch.")


def _copy_adapter(record: SpecialistRecord, folder: Path) -> dict[str, Any]:
    """The registered adapter's files (safetensors only) in `folder`, its config pointing at the base."""
    source = check_adapter_files(record)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source / "adapter_model.safetensors", folder / "adapter_model.safetensors")
    config = json.loads((source / "adapter_config.json").read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = hub_id(record.base_model) or record.base_model
    atomic_write_text(folder / "adapter_config.json", json.dumps(config, indent=2) + "\n")
    return config


def _copy_tokenizer_if_changed(source: Path, folder: Path, base_tokenizer) -> None:
    """vLLM takes a LoRA's own tokenizer from its folder: copy it when it has a vocabulary the base lacks."""
    files = [p for p in source.iterdir() if p.name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                                                       "special_tokens_map.json")]
    if files and "tokenizer.json" in {p.name for p in files}:
        from transformers import AutoTokenizer

        if len(AutoTokenizer.from_pretrained(source, local_files_only=True)) != len(base_tokenizer):
            for path in files:
                shutil.copyfile(path, folder / path.name)


def _adapter_on_base(record: SpecialistRecord, adapter: Path):
    """A fresh base with the exported adapter files attached: what vLLM / Ollama will be given."""
    import torch
    from transformers import AutoModelForCausalLM

    return _attach(AutoModelForCausalLM.from_pretrained(record.base_model, dtype=torch.float32, use_safetensors=True,
                                                        local_files_only=True), adapter)


def hub_id(base_model: str) -> str | None:
    """The Hugging Face id of a base: from a hub cache path (models--ORG--NAME/snapshots/...) or an id itself."""
    match = re.search(r"models--([^/]+?)--([^/]+)/snapshots/", base_model)
    if match:
        return f"{match.group(1)}/{match.group(2)}"
    if not Path(base_model).exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", base_model):
        return base_model
    return None


# ----------------------------------------------------------------------------- output folder


def _check_replaceable(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / MANIFEST).is_file())):
        raise AtelierError(f"{out_dir} already holds files that no export wrote; choose another --out")


@contextmanager
def _staging(out_dir: Path) -> Iterator[Path]:
    """A hidden sibling folder to build in; renamed over `out_dir` (an older export) only on success."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _readable(tmp)
    old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}") if out_dir.exists() else None
    if old:
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def _readable(folder: Path) -> None:
    """Usual permissions (umask applied): mkdtemp/mkstemp make 0700/0600, which a server running as
    another user (vLLM in a container, llama-server under systemd) could not read."""
    umask = _umask()
    for path in [folder, *folder.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _umask() -> int:
    """The process umask, read without os.umask(), which would briefly change it for every thread."""
    try:
        status = Path("/proc/self/status").read_text(encoding="utf-8")
        return int(re.search(r"^Umask:\s*([0-7]+)", status, re.MULTILINE).group(1), 8)
    except (OSError, AttributeError):
        return 0o022


# ----------------------------------------------------------------------------- Ollama


@dataclass
class OllamaPlan:
    """The Modelfile, and the blobs the ollama client uploads for it (paths relative to the export)."""

    model: str
    source: str  # FROM: an Ollama library tag, ./FILE.gguf or ./merged
    files: list[str]
    adapters: list[str]
    template: str | None
    system: str | None
    stops: list[str]
    num_ctx: int
    quantize: str | None  # for `ollama create --quantize` (Ollama quantizes f16 weights itself)

    def modelfile(self) -> str:
        lines = [f"FROM {self.source}"] + (["ADAPTER ./adapter"] if self.adapters else [])
        lines += [f'TEMPLATE """{self.template}"""'] if self.template else []
        lines += [f'SYSTEM """{self.system}"""'] if self.system else []
        lines += [f"PARAMETER stop {json.dumps(stop)}" for stop in self.stops] + [f"PARAMETER num_ctx {self.num_ctx}"]
        return "\n".join(lines) + "\n"

    def command(self, out_dir: Path) -> str:
        quantize = f" --quantize {self.quantize}" if self.quantize else ""
        return f"ollama create {self.model}{quantize} -f {out_dir / 'Modelfile'}"


def write_ollama(record, model, tokenizer, probes, folder: Path, quantize: str | None, out_dir: Path) -> Staged:
    """ADAPTER on an Ollama library base when Ollama knows the base, else FROM our GGUF (Llama) or merged folder."""
    ctx = model.config.max_position_embeddings
    if tag := ollama_base_tag(record):
        _copy_adapter(record, folder / "adapter")
        parity = check_parity(probes, torch_logits(_adapter_on_base(record, folder / "adapter")), "f32",
                              "Ollama adapter", tokenizer)
        staged = Staged(parity, card={"library_name": "peft", "tags": ["lora", "ollama"]})
        plan = OllamaPlan(record.name, tag, [], ["adapter/adapter_model.safetensors", "adapter/adapter_config.json"],
                          None, None, [], ctx, None)  # TEMPLATE and stops come with Ollama's base
    else:
        template, system = ollama_template(tokenizer, record.name)
        if getattr(model.config, "model_type", None) == "llama":  # our GGUF; Ollama makes q4_K_M from its f16
            ours, later = (quantize, None) if quantize in ("f32", "f16", "q8_0") else ("f16", quantize and "q4_K_M")
            staged = write_gguf_target(record, model, tokenizer, probes, folder, ours, out_dir)
            files = [p.name for p in folder.glob("*.gguf")]
            source = f"./{files[0]}"
        else:  # Ollama converts (and quantizes) safetensors of the architectures it knows
            ours, later = (quantize, None) if quantize in ("f32", "f16") else (None, {"q4_k_m": "q4_K_M"}.get(
                quantize or "", quantize))
            staged = write_merged(record, model, tokenizer, probes, folder / "merged", ours, out_dir / "merged")
            files, source = [f"merged/{p.name}" for p in sorted((folder / "merged").iterdir())], "./merged"
        plan = OllamaPlan(record.name, source, files, [], template, system, stop_strings(tokenizer),
                          ctx, later)
        staged.card["tags"] = [*staged.card.get("tags", []), "ollama"]
    atomic_write_text(folder / "Modelfile", plan.modelfile())
    staged.ollama, staged.commands = plan, [plan.command(out_dir), f"ollama run {record.name}"]
    return staged


WRITERS["ollama"] = write_ollama


def ollama_base_tag(record: SpecialistRecord) -> str | None:
    """The Ollama library tag of the adapter's base, when Ollama serves that base and imports its adapters."""
    return None if record.full_model else OLLAMA_BASES.get((hub_id(record.base_model) or "").lower())


_PROBE_CHATS = ([{"role": "user", "content": "Hi"}],
                [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                 {"role": "user", "content": "Bye"}])


def _chatml(messages: list[dict]) -> str:
    """What CHATML_GO_TEMPLATE renders for `messages` (Ollama adds no generation flag: it always ends open)."""
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + "<|im_start|>assistant\n"


def ollama_template(tokenizer, name: str) -> tuple[str, str | None]:
    """(Go TEMPLATE, default SYSTEM) for a ChatML-family Jinja template, judged by what it renders.

    The Jinja template is rendered for a few conversations and must produce exactly what the Go
    template renders; a template that adds a fixed system turn when none is given becomes SYSTEM.
    Anything else is refused: a guessed template would silently change every answer.
    """
    defaults = set()
    for chat in _PROBE_CHATS:
        try:
            rendered = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        except Exception:  # noqa: BLE001 - a template that cannot render the probe is not translatable
            rendered = None
        expected = _chatml(chat)
        extra = re.fullmatch(r"<\|im_start\|>system\n(.*)<\|im_end\|>\n", rendered[:-len(expected)], re.DOTALL) if (
            rendered and rendered.endswith(expected) and chat[0]["role"] != "system") else None
        if rendered != expected and extra is None:
            raise AtelierError(f"the chat template of {name!r} is not ChatML (<|im_start|>role ... <|im_end|>), the "
                               "family translated to Ollama's Go template syntax; export --to gguf and write the "
                               "Modelfile's TEMPLATE by hand (https://github.com/ollama/ollama/blob/main/docs/template.md)")
        if chat[0]["role"] != "system":
            defaults.add(extra.group(1) if extra else None)
    if len(defaults) > 1:
        raise AtelierError(f"the chat template of {name!r} adds a default system turn only sometimes; "
                           "write the Modelfile's TEMPLATE by hand")
    return CHATML_GO_TEMPLATE, defaults.pop()


def stop_strings(tokenizer) -> list[str]:
    """PARAMETER stop lines for a ChatML model: both turn markers, and its eos when that is another token."""
    stops = ["<|im_end|>", "<|im_start|>"]
    return stops + [t for t in (tokenizer.eos_token,) if t and t not in stops]


def _ollama_url() -> str:
    url = (os.environ.get("OLLAMA_HOST") or DEFAULT_OLLAMA_URL).strip().rstrip("/")
    return url if url.startswith(("http://", "https://")) else f"http://{url}"


def ollama_reachable(url: str) -> bool:
    """Does an Ollama server answer at `url`? (GET /api/version, 2 s.)"""
    import httpx

    log.info("probing Ollama at %s", url)
    try:
        return httpx.get(f"{url}/api/version", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def create_in_ollama(plan: OllamaPlan, out_dir: Path, url: str) -> None:
    """`ollama create` through the official client: upload each file as a blob, then create from digests."""
    import ollama

    log.info("creating model %s in Ollama at %s", plan.model, url)
    client = ollama.Client(host=url)
    try:
        files = {Path(f).name: client.create_blob(out_dir / f) for f in plan.files}
        adapters = {Path(f).name: client.create_blob(out_dir / f) for f in plan.adapters}
        client.create(model=plan.model, from_=None if plan.files else plan.source, files=files or None,
                      adapters=adapters or None, template=plan.template, system=plan.system, quantize=plan.quantize,
                      parameters={"stop": plan.stops, "num_ctx": plan.num_ctx})
    except (ollama.ResponseError, ConnectionError, OSError) as exc:
        raise AtelierError(f"the export in {out_dir} is complete, but Ollama at {url} could not create "
                           f"{plan.model!r} ({exc}); run `{plan.command(out_dir)}` yourself") from None


def _maybe_create_in_ollama(registry: Registry, record: SpecialistRecord, out_dir: Path, plan: OllamaPlan,
                            create: bool | None) -> str | None:
    """Create the model when asked (or when a server answers) and register a version with served_by."""
    url = _ollama_url()
    if create is False or (create is None and not ollama_reachable(url)):
        return None
    create_in_ollama(plan, out_dir, url)
    served_by = f"ollama:{plan.model}" + ("" if url == DEFAULT_OLLAMA_URL else f"@{url}")
    registry.register(record.name, base_model=record.base_model, eval_report=record.eval_report,
                      keywords=record.keywords, description=record.description,
                      adapter_dir=None if record.full_model else Path(record.adapter_path or ""),
                      model_dir=Path(record.model_path or "") if record.full_model else None,
                      data_manifest_hashes=record.data_manifest_hashes, config=record.config,
                      route_exemplars=record.route_exemplars, served_by=served_by, run_dir=record.run_dir,
                      force=record.forced)
    return served_by


# ----------------------------------------------------------------------------- model card


def model_card(record: SpecialistRecord, target: str, staged: Staged) -> str:
    """README.md: Hugging Face YAML front matter (base_model, tags, datasets, model-index) and a body."""
    from huggingface_hub import EvalResult, ModelCardData

    from eval.report import METRICS

    report, hashes, lora, parity = record.eval_report or {}, record.data_manifest_hashes, record.config.get("lora", {}), staged.parity
    stages, final = report.get("stages", {}), report.get("final_stage", "")
    base = hub_id(record.base_model) or record.config.get("base") or record.base_model
    results = [EvalResult(task_type="text-generation", dataset_type="atelier-heldout", metric_type=metric,
                          dataset_name=f"{record.name} held-out split", metric_value=value, metric_name=METRICS[metric][1])
               for metric, value in stages.get(final, {}).items() if METRICS.get(metric, (None,))[0]]
    data = ModelCardData(base_model=base, library_name=staged.card.get("library_name"), pipeline_tag="text-generation",
                         tags=["atelier", "specialist", *staged.card.get("tags", [])], model_name=record.name,
                         datasets=[f"{record.name}-data@{hashes['data']}"] if "data" in hashes else sorted(hashes.values()),
                         eval_results=results or None)
    limits = [("It knows what its documents say and little else, and it can state wrong facts fluently: check its "
               "answers against the sources (Atelier's orchestrator retrieves and cites passages for this)."),
              "It was evaluated only on a held-out split of its own documents (below), not on general benchmarks."]
    if str(record.config.get("base", "")).startswith("scratch:"):
        limits.append("Its base is a tiny model trained from scratch: its text is far from fluent.")
    if record.forced:
        limits.append("It was registered with --force: it did NOT beat its base on the held-out split.")
    training = ("Full model (no adapter)." if record.full_model else
                f"LoRA: method {lora.get('method', '—')}, r {lora.get('r', '—')}, alpha {lora.get('alpha', '—')}, "
                f"targets {lora.get('target_modules', '—')}.")
    step = lambda s, key: record.config.get(s, {}).get(key, "—")
    sections = {
        "Intended use": [(f"Answering questions about the domain of its training documents (keywords: "
                          f"{', '.join(record.keywords[:12]) or '—'}), as a specialist that Atelier's orchestrator "
                          "routes questions to, or on its own through its chat template.")],
        "Limitations": [f"- {line}" for line in limits],
        "Training": [training, "", "| stage | steps | learning rate |", "|---|---|---|",
                     *[f"| {s} | {step(s, 'max_steps')} | {step(s, 'learning_rate')} |"
                       for s in record.config.get("stages", [])]],
        "Evaluation (held-out split)": [
            "| metric | " + " | ".join(stages) + " |", "|---|" + "---|" * len(stages),
            *[f"| {METRICS[m][1]} | " + " | ".join(_fmt(stages[s].get(m)) for s in stages) + " |"
              for m in METRICS if any(m in row for row in stages.values())], "", *report.get("reasons", [])[:1]],
        "Data": ["| file | sha256 |", "|---|---|", *[f"| {k} | `{v}` |" for k, v in sorted(hashes.items())]],
        "Export check": [(f"The {parity.artefact} ({parity.precision}) gave the same greedy continuations as the "
                          f"adapter on its base for {parity.prompts} held-out prompts ({parity.tokens} tokens); "
                          f"largest logit difference {parity.max_drift_sigma:.2g}σ.")],
    }
    lines = ["---", data.to_yaml(), "---", "", f"# {record.name} v{record.version}", "",
             f"{record.description}. An Atelier specialist built on `{base}`, exported {EXPORTED_AS[target]}."]
    for title, body in sections.items():
        lines += ["", f"## {title}", "", *body]
    return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    return "—" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


# ----------------------------------------------------------------------------- CLI


def register_export(app: typer.Typer) -> None:
    """Add `export` to the `atelier specialist` group."""
    app.command("export")(export_command)


def export_command(
    name: str = typer.Argument(..., help="Specialist to export (its active version unless --version)."),
    to: str = typer.Option(..., "--to", help="merged | gguf | ollama | vllm."),
    out: str | None = typer.Option(None, "--out", help="Output folder (default: ATELIER_HOME/exports/NAME-vN-TARGET)."),
    quantize: str | None = typer.Option(None, "--quantize", help="f32 | f16 | q8_0 | q4_k_m (gguf, ollama); f32 | f16 "
                                        "(merged). Default: f16 for GGUF, the base's dtype for merged."),
    version: int | None = typer.Option(None, "--version", min=1, help="Export this version, not the active one."),
    create: bool | None = typer.Option(None, "--create/--no-create", help="ollama: create the model in Ollama and "
                                       "register served_by (default: when a server answers at OLLAMA_HOST or 127.0.0.1:11434)."),
) -> None:
    """Export a specialist as merged weights, GGUF, an Ollama Modelfile or a vLLM LoRA adapter, parity-checked."""
    result = export_specialist(name, to, out=Path(out) if out else None, quantize=quantize, version=version,
                               create=create)
    parity = result.parity
    typer.echo(f"exported {result.name} v{result.version} to {result.target} in {result.seconds:.1f} s: {result.out_dir}")
    for path in result.files:
        typer.echo(f"  {path}")
    typer.echo(f"parity: {parity.prompts} prompts, {parity.tokens} greedy tokens matched; max logit drift "
               f"{parity.max_drift_sigma:.2g}σ ({parity.precision})")
    if result.served_by:
        typer.echo(f"created in Ollama; {result.name} is now served_by {result.served_by}")
    typer.echo("next:" if not result.served_by else "try:")
    for command in result.commands:
        typer.echo(f"  {command}")
