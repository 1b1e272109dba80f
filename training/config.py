"""The one typed config of `atelier specialist add`: defaults < YAML (--config) < CLI flags.

Each part is the config of the module that uses it (data generation, LoRA, each training
stage, evaluation), so a field and its behaviour live side by side; this file only
assembles them. Unknown keys anywhere are errors.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from atelier.config import StrictModel
from eval.specialist import SpecialistEvalConfig
from retrieval.chunking import ChunkConfig
from retrieval.documents import DocumentsConfig
from training.dapt import DaptConfig
from training.data import DataConfig
from training.dpo import DpoConfig
from training.lora import LoraSettings
from training.sft import SftConfig
from training.teacher import TeacherConfig

StageName = Literal["dapt", "sft", "dpo"]
STAGE_ORDER: tuple[StageName, ...] = ("dapt", "sft", "dpo")


class SpecialistConfig(StrictModel):
    base: str = Field("smollm2-135m", description="Base model: smollm2-135m or gemma3-270m (installed GGUF models), "
                      "a .gguf file, a Hugging Face causal LM id or local folder, or scratch:tiny / scratch:small "
                      "(a small Llama trained from scratch on the documents, for fast offline toy runs).")
    teacher: TeacherConfig | None = Field(None, description="Teacher model that writes training data "
                                          "(provider:model); none: offline generators.")
    stages: list[StageName] = Field(list(STAGE_ORDER), description="Training stages to run, in order: dapt, sft, dpo.")
    seed: int = Field(0, description="Seed for data splits, new weights and data order.")
    budget_minutes: float | None = Field(None, gt=0, description="Wall-clock budget of the whole run in minutes: "
                                         "stage lengths are sized from the training throughput measured on the "
                                         "real model, and each stage stops at its share. Unset: the full recipe.")
    evaluate_stages: bool = Field(False, description="Also evaluate every intermediate stage on the held-out split "
                                  "(minutes each on a real base); off: the base and the final specialist only.")
    route_exemplars: int = Field(40, ge=0, description="Training instructions kept in the registry record for the router.")
    chunking: ChunkConfig = Field(default_factory=lambda: ChunkConfig(max_chars=1200, overlap_chars=0),
                                  description="How documents are cut into the passages data is generated from.")
    documents: DocumentsConfig = Field(default_factory=DocumentsConfig, description="Which files of --docs load: "
                                       "symlinks leading outside it, the size cap (documents.max_file_mb).")
    data: DataConfig = Field(default_factory=DataConfig, description="Guided data generation and filters.")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="Adapter shape, or full fine-tuning.")
    dapt: DaptConfig = Field(default_factory=DaptConfig, description="Domain-adaptive pretraining stage.")
    sft: SftConfig = Field(default_factory=SftConfig, description="Supervised fine-tuning stage.")
    dpo: DpoConfig = Field(default_factory=DpoConfig, description="Preference-tuning stage (dpo, simpo, orpo, kto).")
    eval: SpecialistEvalConfig = Field(default_factory=SpecialistEvalConfig, description="Held-out evaluation.")

    @field_validator("stages")
    @classmethod
    def _ordered(cls, stages: list[str]) -> list[str]:
        if not stages:
            raise ValueError("name at least one stage (dapt, sft, dpo)")
        if len(set(stages)) != len(stages) or stages != [s for s in STAGE_ORDER if s in stages]:
            raise ValueError("stages run in the order dapt, sft, dpo, each at most once")
        return stages
