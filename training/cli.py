"""`atelier specialist add NAME --docs DIR`: the whole specialist recipe in one command."""

from __future__ import annotations

from pathlib import Path

import typer

from atelier.config import config_file_option, config_option
from training.config import SpecialistConfig

CONFIG_FILE = config_file_option(SpecialistConfig, "specialist")


def add(
    name: str = typer.Argument(..., help="Specialist name: lowercase letters, digits, - or _."),
    docs: Path = typer.Option(..., "--docs", help="Folder of the domain's documents (.md .txt .html .pdf .jsonl)."),
    base: str | None = config_option(SpecialistConfig, "base", "--base"),
    teacher: str | None = config_option(SpecialistConfig, "teacher.name", "--teacher"),
    config_file: Path | None = CONFIG_FILE,
    stages: str | None = config_option(SpecialistConfig, "stages", "--stages"),
    preference: str | None = config_option(SpecialistConfig, "dpo.preference", "--preference"),
    lora: str | None = config_option(SpecialistConfig, "lora.method", "--finetune"),
    budget: float | None = config_option(SpecialistConfig, "budget_minutes", "--budget"),
    evaluate_stages: bool | None = config_option(SpecialistConfig, "evaluate_stages",
                                                    "--evaluate-stages/--no-evaluate-stages"),
    seed: int | None = config_option(SpecialistConfig, "seed", "--seed"),
    exam: Path | None = typer.Option(None, "--exam", help="Your own exam (JSONL of question and answer, optionally options and correct): base and specialist are scored on it too, and the gate applies to it."),
    force: bool = typer.Option(False, "--force", help="Register even if the specialist does not beat its base."),
    new_run: bool = typer.Option(False, "--new-run", help="Start a fresh run instead of continuing/reusing the last one."),
) -> None:
    """Build a specialist from documents: data -> DAPT -> SFT -> DPO -> evaluation -> registry."""
    import os
    import warnings

    from atelier.config import load_config

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # emitted by peft merges, harmless
    overrides = {"base": base, "teacher.name": teacher, "dpo.preference": preference, "lora.method": lora,
                 "stages": stages, "budget_minutes": budget, "evaluate_stages": evaluate_stages, "seed": seed}
    config = load_config(SpecialistConfig, config_file, overrides)
    from training.pipeline import run_pipeline

    with Display() as display:
        result = run_pipeline(name, docs, config, force=force, new_run=new_run, hooks=display.hooks(), exam=exam)
    _summary(result)


class Display:
    """Rich progress: one line per pipeline step, a bar for data generation and training steps."""

    def __enter__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from atelier.progress import stderr

        self.console = stderr
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[note]}"), TimeElapsedColumn(), console=stderr)
        self.progress.__enter__()
        self.task = None
        self._first = None  # (step, time, tokens) of the first step seen in this stage
        return self

    def __exit__(self, *exc):
        self.progress.__exit__(*exc)
        return False

    def hooks(self):
        from training.pipeline import PipelineHooks

        return PipelineHooks(step=self._step, data_progress=self._data, train_progress=self._train,
                             skipped=self._skipped, done=self._done)

    def _step(self, name: str, detail: str) -> None:
        self._first = None
        if self.task is not None:
            self.progress.remove_task(self.task)
        self.task = self.progress.add_task(f"{name:8}", total=None, note=detail)

    def _data(self, what: str, done: int, total: int) -> None:
        self.progress.update(self.task, completed=done, total=max(total, 1), note=what)

    def _train(self, step: int, total: int, loss: float | None, tokens_seen: int = 0) -> None:
        import time

        now = time.perf_counter()
        if self._first is None or step <= 1 or step < self._first[0]:
            self._first = (step, now, tokens_seen)
        note = f"loss {loss:.3f}" if loss is not None else ""
        first_step, first_time, first_tokens = self._first
        if step > first_step and now > first_time:
            rate = (tokens_seen - first_tokens) / (now - first_time)
            eta = (total - step) * (now - first_time) / (step - first_step)
            note += f"  {rate:,.0f} tokens/s  ETA {int(eta // 60)}:{int(eta % 60):02d}"
        self.progress.update(self.task, completed=step, total=max(total, 1), note=note)

    def _skipped(self, path: str, reason: str) -> None:
        self.console.print(f"[yellow]skipped[/yellow] {path}: {reason}")

    def _done(self, name: str, seconds: float, note: str) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
            self.task = None
        self.console.print(f"[green]✓[/green] {name:8} {seconds:6.1f} s  {note}")


def _summary(result) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    report = result.report
    metrics = ("perplexity", "mcq_accuracy", "token_f1", "rouge_l", "preference_accuracy")
    table = Table(title=f"{result.name}: held-out evaluation (run {result.run_dir.name})")
    table.add_column("metric")
    for stage in report.stages:
        table.add_column(stage, justify="right")
    for metric in metrics:
        table.add_row(metric, *(f"{report.stages[s].get(metric, float('nan')):.3f}" for s in report.stages))
    console.print(table)
    if result.exam_report:
        from eval.exam_report import print_table

        print_table(result.exam_report, console)
    verdict = {"beats": "beats its base (significantly, on every required metric)",
               "accepted": "is accepted: not significantly worse than its base, but not significantly better either",
               "refused": "does NOT beat its base"}[report.verdict]
    total = sum(v for k, v in result.timings.items())
    record = result.record
    console.print(f"{result.name} {verdict}; registered as v{record.version}" + (" (forced)" if record.forced else "")
                  + f" in {total / 60:.1f} min. Report: {result.run_dir / 'eval' / 'eval.md'}")


def register(specialist_app: typer.Typer) -> None:
    specialist_app.command("add")(add)
