"""The `atelier specialist export` command: parse, export, report (the work is in pipeline.py)."""

from __future__ import annotations

from pathlib import Path

import typer

from specialists.export.pipeline import export_specialist


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
    serve: bool = typer.Option(False, "--serve", help="gguf: register a version served by llama.cpp in-process from "
                               "this export (base GGUF + GGUF LoRA adapter): served_by llamacpp:OUT_DIR."),
) -> None:
    """Export a specialist as merged weights, GGUF, an Ollama Modelfile or a vLLM LoRA adapter, parity-checked."""
    result = export_specialist(name, to, out=Path(out) if out else None, quantize=quantize, version=version,
                               create=create, serve=serve)
    parity = result.parity
    typer.echo(f"exported {result.name} v{result.version} to {result.target} in {result.seconds:.1f} s: {result.out_dir}")
    for path in result.files:
        typer.echo(f"  {path}")
    typer.echo(f"parity: {parity.prompts} prompts, {parity.tokens} greedy tokens matched; max logit drift "
               f"{parity.max_drift_sigma:.2g}σ ({parity.precision})")
    if (adapter := result.adapter_parity) is not None:
        typer.echo(f"adapter parity: {adapter.prompts} prompts, {adapter.tokens} greedy tokens matched; max drift "
                   f"{adapter.max_drift_sigma:.2g}σ (base {adapter.precision}, GGUF LoRA adapter in llama.cpp)")
    if result.served_by:
        where = "created in Ollama" if result.served_by.startswith("ollama:") else "registered for llama.cpp"
        typer.echo(f"{where}; {result.name} is now served_by {result.served_by}")
    typer.echo("next:" if not result.served_by else "try:")
    for command in result.commands:
        typer.echo(f"  {command}")
