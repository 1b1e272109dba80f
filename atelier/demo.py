"""`make demo`: the main job on embedded defaults, end to end.

1. Index the sample manuals in examples/docs into the embedded hybrid index (ATELIER_HOME,
   default ./.atelier); unchanged documents are skipped on later runs.
2. Build the demo specialist from the same manuals on the real SmolLM2-135M-Instruct base
   (installed from the package registry), with a time budget that keeps the whole demo
   within about 15 minutes on two CPU cores, unless it is registered already; then print,
   for one domain question, the base's answer and the specialist's side by side. The full
   recipe (no budget) is `atelier specialist add NAME --docs DIR` and takes over an hour here.
3. Ask the orchestrator three questions — one for the documents, one for the specialist, one
   for a tool — and print the route each took. No orchestrator model is configured here, so
   Atelier runs router-only: each route's own output is the answer.

`ATELIER_DEMO_BASE` and `ATELIER_DEMO_BUDGET` (minutes) change the base and the budget.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

from atelier.errors import AtelierError

DOCS = Path(__file__).resolve().parents[1] / "examples" / "docs"
DEMO_BASE = os.environ.get("ATELIER_DEMO_BASE", "smollm2-135m")
DEMO_BUDGET_MINUTES = float(os.environ.get("ATELIER_DEMO_BUDGET", "8"))
SIDE_BY_SIDE = "What is the tightening torque of the impeller nut on the HX-65?"
QUESTIONS = [
    ("search", "what torque for the HX-65 impeller nut"),
    ("specialist", "what does fault code E14 mean"),
    ("tool", "convert 80 N m to lbf ft"),
]


def index_docs(console) -> None:
    from retrieval.config import RetrievalConfig, index_with_progress, open_backend
    from retrieval.documents import load_folder
    from retrieval.embeddings import get_encoder

    config = RetrievalConfig()
    loaded = load_folder(DOCS)
    encoder = get_encoder(config.embedding)
    store = open_backend(config, dim=encoder.dim)
    try:
        report = index_with_progress(loaded.documents, store, encoder, config, root=str(DOCS), prune=True)
    finally:
        store.close()
    console.print(f"{len(loaded.documents)} documents from {DOCS}: {report.summary()}")


def build_specialist(console) -> None:
    from specialists.registry import Registry
    from training.cli import Display
    from training.config import SpecialistConfig
    from training.pipeline import run_pipeline

    if "demo" in Registry().names():
        console.print("specialist 'demo' is registered already (remove it to rebuild: atelier specialist remove demo)")
        return
    config = SpecialistConfig(base=DEMO_BASE, budget_minutes=DEMO_BUDGET_MINUTES)
    console.print(f"base {DEMO_BASE}, budget {DEMO_BUDGET_MINUTES:g} min (the full recipe takes longer and learns more)")
    with Display() as display:
        result = run_pipeline("demo", DOCS, config, force=True, hooks=display.hooks())
    report = result.report
    final, base = report.final, report.base
    verdict = {"beats": "beats its base", "accepted": "is not significantly better than its base yet",
               "refused": "does not beat its base yet (registered anyway)"}[report.verdict]
    console.print(f"specialist 'demo' v{result.record.version} {verdict}: held-out perplexity "
                  f"{base['perplexity']:.1f} -> {final['perplexity']:.1f}, multiple-choice accuracy "
                  f"{base['mcq_accuracy']:.2f} -> {final['mcq_accuracy']:.2f}")


def side_by_side(console, question: str = SIDE_BY_SIDE) -> None:
    """The base's answer and the specialist's to one domain question, greedy, the same prompt."""
    from rich.markup import escape

    from specialists.loading import load_model, load_tokenizer
    from specialists.registry import Registry

    record = Registry().get("demo")
    tokenizer = load_tokenizer(record.base_model)
    model = load_model(record.base_model, record.adapter_path)
    console.print(f"[bold cyan]? {question}[/bold cyan]")
    for label, adapter_on in (("base", False), ("specialist", True)):
        console.print(f"[bold]{label:>10}[/bold]: {escape(_greedy(model, tokenizer, question, adapter_on))}")


def _greedy(model, tokenizer, question: str, adapter_on: bool, max_new_tokens: int = 40) -> str:
    import contextlib

    import torch

    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    scope = contextlib.nullcontext() if adapter_on or not hasattr(model, "disable_adapter") else model.disable_adapter()
    with torch.inference_mode(), scope:
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def ask_questions(console) -> None:
    from rich.markup import escape

    from agents.orchestrator import Orchestrator

    orchestrator = Orchestrator()
    try:
        for expected, question in QUESTIONS:
            answer = orchestrator.ask(question, thread_id=f"demo-{expected}")
            console.print(f"\n[bold cyan]? {question}[/bold cyan]\n[dim]→ route {answer.route} "
                          f"(confidence {answer.confidence:.2f}; expected {expected}; "
                          f"model {answer.model or 'none, router-only'})[/dim]")
            text = answer.text if len(answer.text) < 900 else answer.text[:900] + "…"
            console.print(escape(text))
    finally:
        orchestrator.close()
    console.print("\nTry your own: [bold].venv/bin/atelier chat[/bold], [bold].venv/bin/atelier ask \"...\"[/bold], "
                  "[bold].venv/bin/atelier search \"...\"[/bold]")


def main() -> None:
    from rich.console import Console

    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    console = Console()
    console.rule("[bold]1. Index the sample manuals (hybrid search: BM25 + dense vectors)")
    index_docs(console)
    console.rule("[bold]2. The demo specialist: documents -> data -> training (the stages the budget fits) -> eval -> registry")
    build_specialist(console)
    side_by_side(console)
    console.rule("[bold]3. The orchestrator routes each question")
    ask_questions(console)


if __name__ == "__main__":
    try:
        main()
    except AtelierError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
