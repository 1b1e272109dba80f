"""README.md of an export: Hugging Face model card front matter (base_model, tags, datasets,
model-index) and a body with intended use, limitations, training, evaluation, data and the parity check.
"""

from __future__ import annotations

from typing import Any

from atelier.reports import METRICS
from specialists.export.common import Staged, hub_id
from specialists.registry import SpecialistRecord

EXPORTED_AS = {"merged": "as merged safetensors weights", "gguf": "as a GGUF file for llama.cpp",
               "ollama": "for Ollama", "vllm": "as a LoRA adapter for vLLM"}


def model_card(record: SpecialistRecord, target: str, staged: Staged) -> str:
    """README.md: Hugging Face YAML front matter (base_model, tags, datasets, model-index) and a body."""
    from huggingface_hub import EvalResult, ModelCardData

    report, hashes, lora, parity = record.eval_report, record.data_manifest_hashes, record.config.get("lora", {}), staged.parity
    stages, final = (report.stages, report.final_stage) if report else ({}, "")
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
              for m in METRICS if any(m in row for row in stages.values())], "", *(report.reasons[:1] if report else [])],
        "Data": ["| file | sha256 |", "|---|---|", *[f"| {k} | `{v}` |" for k, v in sorted(hashes.items())]],
        "Export check": [(f"The {parity.artefact} ({parity.precision}) gave the same greedy continuations as the "
                          f"adapter on its base for {parity.prompts} held-out prompts ({parity.tokens} tokens); "
                          f"largest logit difference {parity.max_drift_sigma:.2g}σ.")],
    }
    if (adapter := staged.adapter_parity) is not None:
        files = staged.details.get("llamacpp", {})
        sections["Export check"].append("")
        sections["Export check"].append(
            f"The GGUF LoRA adapter on its base GGUF ({adapter.precision}, `{files.get('base', '—')}`), run in "
            f"llama.cpp with the adapter turned on per request, gave the same greedy continuations for "
            f"{adapter.prompts} prompts ({adapter.tokens} tokens); largest log-probability difference "
            f"{adapter.max_drift_sigma:.2g}σ.")
    lines = ["---", data.to_yaml(), "---", "", f"# {record.name} v{record.version}", "",
             f"{record.description}. An Atelier specialist built on `{base}`, exported {EXPORTED_AS[target]}."]
    for title, body in sections.items():
        lines += ["", f"## {title}", "", *body]
    return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    return "—" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)
