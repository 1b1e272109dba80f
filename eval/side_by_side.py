"""A registered specialist on an exam, side by side with its base and other systems.

`evaluate_specialist` is what `atelier eval specialist` runs; `exam_gate` is what the
registration gate runs for `specialist add --exam`.
Heavy imports stay inside the functions.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from pathlib import Path

from atelier.errors import AtelierError


def _general_texts(path: Path) -> list[str]:
    """Paragraphs of a general-text file (.txt), or the "text" of each line of a .jsonl."""
    path = Path(path)
    if not path.is_file():
        raise AtelierError(f"--general {path} does not exist; pass a text or JSONL file of general English")
    if path.suffix == ".jsonl":
        from eval.specialist import read_jsonl

        texts = [str(r.get("text", "")) for r in read_jsonl(path)]
    else:
        texts = re.split(r"\n\s*\n", path.read_text(encoding="utf-8", errors="replace"))
    texts = [t.strip() for t in texts if t.strip()]
    if not texts:
        raise AtelierError(f"--general {path} holds no text")
    return texts


def specialist_systems(record, config, passages=None) -> dict:
    """`base` and `specialist` (and `specialist+search` with passages) for a registry record."""
    from eval.systems import LocalModel
    from specialists.registry import check_adapter_files

    if record.full_model:
        model = Path(record.model_path or "")
        systems = {"base": LocalModel("base", Path(record.base_model), config=config)} \
            if Path(record.base_model).resolve() != model.resolve() else {}
        systems["specialist"] = LocalModel("specialist", model, config=config)
    else:
        adapter = check_adapter_files(record)
        systems = {"base": LocalModel("base", Path(record.base_model), config=config),
                   "specialist": LocalModel("specialist", Path(record.base_model), [adapter], config=config)}
    if passages is not None:
        main = systems["specialist"]
        systems["specialist+search"] = LocalModel("specialist+search", main.model_dir, main.adapters, config=config,
                                                  passages=passages)
    return systems


def evaluate_specialist(name: str, *, exam: Path | None = None, against: Sequence[str] = (), rag: bool = False,
                        docs: Path | None = None, index: str | None = None, general: Path | None = None,
                        config=None, home: Path | None = None,
                        status=None) -> tuple[dict, list[dict]]:
    """A registered specialist on an exam (its held-out split without one), side by side with its base,
    every `against` model and, with `rag`, search alone and the specialist with passages in its prompt.

    Returns (summary, per-item rows): the summary is `eval.exam_eval.summarise`'s dict, with
    `seconds` and the exam's problems; see `atelier eval specialist --help` for the systems.
    """
    from atelier.home import atelier_home
    from eval.exam import exam_from_heldout, read_exam
    from eval.exam_eval import item_rows, run_system, summarise
    from eval.specialist import SpecialistEvalConfig
    from eval.systems import SERVED_PREFIXES, LocalModel, SearchSystem, ServedModel, open_passages, resolve_local
    from specialists.registry import Registry

    config = config or SpecialistEvalConfig()
    started = time.perf_counter()
    record = Registry(home).get(name)
    if exam is not None:
        the_exam = read_exam(exam)
    else:
        if not record.run_dir or not (Path(record.run_dir) / "data").is_dir():
            raise AtelierError(f"specialist {name!r} has no training data to hold out from (run folder "
                               f"{record.run_dir or 'unknown'}); pass --exam FILE.jsonl")
        the_exam = exam_from_heldout(Path(record.run_dir) / "data", max_items=config.max_mcq_items,
                                     options=config.mcq_options, seed=config.seed)
    general_texts = _general_texts(general) if general else None
    passages = open_passages(docs, index, config.rag_passages, config.rag_passage_chars) if rag else None
    try:
        systems = specialist_systems(record, config, passages)
        for spec in against:
            if spec in systems:
                raise AtelierError(f"--against {spec} is already in the run; name each other model once")
            if spec.startswith(SERVED_PREFIXES):
                systems[spec] = ServedModel(spec, max_tokens=config.exam_max_new_tokens)
            else:
                folder = resolve_local(spec, (Path(home) if home else atelier_home()) / "eval" / "bases")
                systems[spec] = LocalModel(spec, folder, config=config)
        if passages is not None:
            systems["search"] = SearchSystem(passages)
        runs = {label: run_system(system, the_exam, general_texts=general_texts, status=status)
                for label, system in systems.items()}
    finally:
        if passages is not None:
            passages.close()
    summary = summarise(the_exam, runs, config.gate)
    summary["specialist"] = {"name": record.name, "version": record.version, "base_model": record.base_model}
    summary["seconds"] = round(time.perf_counter() - started, 1)
    return summary, item_rows(the_exam, runs)


def exam_gate(base_model: Path, specialist_model: Path, adapter: Path | Sequence[Path] | None, exam: Path,
              config=None, status=None) -> dict:
    """Base and specialist on a user's exam, for the registration gate (`specialist add --exam`).

    `base_model` is the model training started from; the specialist is `specialist_model` (the
    same folder for LoRA runs, the DAPT-trained model for scratch bases) with `adapter` merged in.
    Returns the `eval.exam_eval.summarise` dict, whose `gate` the registry checks: refused when
    significantly worse than the base on a `gate.required_exam` metric.
    """
    from eval.exam import read_exam
    from eval.exam_eval import run_system, summarise
    from eval.specialist import SpecialistEvalConfig, adapter_list
    from eval.systems import LocalModel

    config = config or SpecialistEvalConfig()
    the_exam = read_exam(exam)
    runs = {"base": run_system(LocalModel("base", Path(base_model), config=config), the_exam, status=status),
            "specialist": run_system(LocalModel("specialist", Path(specialist_model), adapter_list(adapter),
                                                config=config), the_exam, status=status)}
    return summarise(the_exam, runs, config.gate)
