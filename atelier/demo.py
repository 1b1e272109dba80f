"""`make demo`: the main job on embedded defaults, end to end.

1. Index the sample manuals in examples/docs into the embedded hybrid index (ATELIER_HOME,
   default ./.atelier); unchanged documents are skipped on later runs.
2. Build the demo specialist from the same manuals (`scratch:tiny`, about five minutes on two
   CPU cores) unless it is registered already.
3. Ask the orchestrator three questions — one for the documents, one for the specialist, one
   for a tool — and print the route each took. No orchestrator model is configured here, so
   Atelier runs router-only: each route's own output is the answer.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

from atelier.errors import AtelierError

DOCS = Path(__file__).resolve().parents[1] / "examples" / "docs"
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
    from training.cli import _Display
    from training.config import SpecialistConfig
    from training.pipeline import run_pipeline

    if "demo" in Registry().names():
        console.print("specialist 'demo' is registered already (remove it to rebuild: atelier specialist remove demo)")
        return
    with _Display() as display:
        result = run_pipeline("demo", DOCS, SpecialistConfig(base="scratch:tiny"), hooks=display.hooks())
    final = result.report["stages"][result.report["final_stage"]]
    base = result.report["stages"]["base"]
    console.print(f"specialist 'demo' v{result.record.version}: held-out perplexity {base['perplexity']:.0f} -> "
                  f"{final['perplexity']:.0f}, multiple-choice accuracy {base['mcq_accuracy']:.2f} -> "
                  f"{final['mcq_accuracy']:.2f}")


def ask_questions(console) -> None:
    from rich.markup import escape

    from agents.orchestrator import Orchestrator

    orchestrator = Orchestrator()
    try:
        for expected, question in QUESTIONS:
            answer = orchestrator.ask(question, thread_id=f"demo-{expected}")
            console.print(f"\n[bold cyan]? {question}[/bold cyan]\n[dim]→ route {answer.route} "
                          f"(confidence {answer.confidence:.2f}; expected {expected})[/dim]")
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
    console.rule("[bold]2. The demo specialist: documents -> data -> DAPT -> SFT -> DPO -> eval -> registry")
    build_specialist(console)
    console.rule("[bold]3. The orchestrator routes each question")
    ask_questions(console)


if __name__ == "__main__":
    try:
        main()
    except AtelierError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
