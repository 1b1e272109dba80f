"""The one typed config of `atelier specialist add`: defaults < YAML (--config) < CLI flags.

Each part is the config of the module that uses it (data generation, LoRA, each training
stage, evaluation), so a field and its behaviour live side by side; this file only
assembles them. Unknown keys anywhere are errors.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from atelier.config import StrictModel
from eval.specialist import SpecialistEvalConfig
from retrieval.chunking import ChunkConfig
from retrieval.documents import DocumentsConfig
from training.dapt import DaptConfig
from training.data import DEFAULT_CHUNKING, DataConfig
from training.dpo import DpoConfig
from training.lora import LoraSettings
from training.sft import SftConfig
from training.teacher import TeacherConfig

StageName = Literal["dapt", "sft", "dpo"]
STAGE_ORDER: tuple[StageName, ...] = ("dapt", "sft", "dpo")
SEEDED = ("data", *STAGE_ORDER)  # the sections whose own seed follows the run's `seed` unless set there


class SpecialistConfig(StrictModel):
    """Everything `atelier specialist add` does: base, teacher, data, the DAPT/SFT/DPO stages, evaluation."""

    derived_fields: ClassVar[tuple[str, ...]] = tuple(f"{section}.seed" for section in SEEDED)

    base: str = Field("smollm2-135m", description="Base model: smollm2-135m or gemma3-270m (installed GGUF models), "
                      "a .gguf file, a Hugging Face causal LM id or local folder, or scratch:tiny / scratch:small "
                      "(a small Llama trained from scratch on the documents, for fast offline toy runs).")
    teacher: TeacherConfig | None = Field(None, description="Teacher model that writes training data "
                                          "(provider:model); none: offline generators.")
    stages: list[StageName] = Field(list(STAGE_ORDER), description="Training stages to run, in order: dapt, sft, dpo.")
    seed: int = Field(0, description="Seed of the run: the held-out split and the generated data (data.seed), new "
                      "weights and data order of every stage (dapt.seed, sft.seed, dpo.seed) follow it unless set "
                      "there, and so does a scratch base's initialisation.")
    budget_minutes: float | None = Field(None, gt=0, description="Wall-clock budget of the whole run in minutes: "
                                         "stage lengths are sized from the training throughput measured on the "
                                         "real model, and each stage stops at its share. Unset: the full recipe.")
    evaluate_stages: bool = Field(False, description="Also evaluate every intermediate stage on the held-out split "
                                  "(minutes each on a real base); off: the base and the final specialist only.")
    route_exemplars: int = Field(40, ge=0, description="Training instructions kept in the registry record for the router.")
    chunking: ChunkConfig = Field(default_factory=DEFAULT_CHUNKING.model_copy, description="How documents are cut "
                                  "into the passages data is generated from (no overlap: DAPT would train on the "
                                  "repeated text twice).")
    documents: DocumentsConfig = Field(default_factory=DocumentsConfig, description="Which files of --docs load: "
                                       "symlinks leading outside it, the size cap (documents.max_file_mb).")
    data: DataConfig = Field(default_factory=DataConfig, description="Guided data generation and filters.")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="Adapter shape, or full fine-tuning.")
    dapt: DaptConfig = Field(default_factory=DaptConfig, description="Domain-adaptive pretraining stage.")
    sft: SftConfig = Field(default_factory=SftConfig, description="Supervised fine-tuning stage.")
    dpo: DpoConfig = Field(default_factory=DpoConfig, description="Preference-tuning stage (dpo, simpo, orpo, kto).")
    eval: SpecialistEvalConfig = Field(default_factory=SpecialistEvalConfig, description="Held-out evaluation.")

    @model_validator(mode="before")
    @classmethod
    def _one_seed(cls, data: Any) -> Any:
        """`seed` seeds the split, new weights and data order: each seeded section takes it unless it sets its own."""
        if not isinstance(data, dict):
            return data
        seed, data = data.get("seed", cls.model_fields["seed"].default), dict(data)
        for section in SEEDED:
            part = data.get(section)
            if part is None:
                data[section] = {"seed": seed}
            elif isinstance(part, dict) and "seed" not in part:
                data[section] = {**part, "seed": seed}
            elif isinstance(part, BaseModel) and "seed" not in part.model_fields_set:
                data[section] = part.model_copy(update={"seed": seed})
        return data

    @field_validator("stages")
    @classmethod
    def _ordered(cls, stages: list[str]) -> list[str]:
        if not stages:
            raise ValueError("name at least one stage (dapt, sft, dpo)")
        if len(set(stages)) != len(stages) or stages != [s for s in STAGE_ORDER if s in stages]:
            raise ValueError("stages run in the order dapt, sft, dpo, each at most once")
        return stages
