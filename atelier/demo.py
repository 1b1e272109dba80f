"""`make demo`: the main job on embedded defaults.

Indexes the sample manuals in examples/docs into the embedded hybrid index under
ATELIER_HOME (default ./.atelier) and answers a few searches, showing where each answer
comes from. Re-running it re-embeds nothing: unchanged documents are skipped.
"""

from __future__ import annotations

import sys
from pathlib import Path

from atelier.errors import AtelierError

DOCS = Path(__file__).resolve().parents[1] / "examples" / "docs"
QUESTIONS = [
    "what torque for the HX-65 impeller nut",
    "what does fault code E14 mean",
    "how do I check for soft foot before aligning the motor",
    "pump makes a noise like gravel",  # the manual says "sounds like gravel": troubleshooting, cavitation
]


def main() -> None:
    from rich.console import Console

    from atelier.progress import progress_bar
    from retrieval.cli import _print_hits
    from retrieval.config import RetrievalConfig, Searcher, open_backend
    from retrieval.documents import load_folder
    from retrieval.embeddings import get_encoder
    from retrieval.indexer import index_documents, plan

    console = Console()
    config = RetrievalConfig(index="demo")
    console.rule("[bold]1. Index the sample manuals")
    loaded = load_folder(DOCS)
    encoder = get_encoder(config.embedding)
    store = open_backend(config, dim=encoder.dim)
    root = str(DOCS)
    work = plan(loaded.documents, store, config.chunking, config.embedding.model, root, prune=True)
    with progress_bar("embedding chunks", total=work.chunks_estimate) as advance:
        report = index_documents(loaded.documents, store, encoder.encode, chunking=config.chunking,
                                 model=config.embedding.model, root=root, progress=advance, planned=work)
    console.print(f"{len(loaded.documents)} documents from {DOCS}: {report.summary()}")
    searcher = Searcher(store, encoder, config.embedding)
    console.rule("[bold]2. Hybrid search (BM25 + dense, fused)")
    for question in QUESTIONS:
        console.print(f"\n[bold cyan]? {question}[/bold cyan]")
        _print_hits(searcher.search(question, k=3))
    searcher.close()
    console.print("\nTry your own: [bold].venv/bin/atelier search \"...\" --index demo[/bold]")


if __name__ == "__main__":
    try:
        main()
    except AtelierError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
