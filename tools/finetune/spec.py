"""The fine-tune job spec (the ``launch_finetune`` args) and the job-id args, with bounds."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

JOB_ID = re.compile(r"^ft-\d{1,9}$")


class FinetuneSpec(BaseModel):
    """A LoRA / QLoRA / full SFT job."""

    model_config = ConfigDict(extra="forbid")

    base_model: str = Field(
        min_length=1, max_length=300,
        description="Hugging Face id (deepseek-ai/DeepSeek-R1-Distill-Qwen-7B) or a local path.",
    )
    dataset: str = Field(
        min_length=1, max_length=500,
        description="JSONL / JSON / CSV / Parquet file inside the allowed roots.",
    )
    data_format: Literal["auto", "cot", "chat", "alpaca"] = Field(
        "auto", description="Row format: chain-of-thought, chat messages, alpaca; auto-detected by default.")
    method: Literal["lora", "qlora", "full"] = Field("lora", description="Adapter method or full SFT.")
    lora_rank: int = Field(16, ge=1, le=1024, description="LoRA rank r.")
    lora_alpha: int | None = Field(None, ge=1, le=4096, description="LoRA alpha (default 2 × rank).")
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA path.")
    target_modules: list[str] | None = Field(
        None, description="Modules to adapt (default: all linear layers)."
    )
    epochs: float = Field(1.0, gt=0, le=100, description="Passes over the data set.")
    max_steps: int | None = Field(None, ge=1, le=10_000_000, description="Stop after this many steps.")
    learning_rate: float = Field(2e-4, gt=0, le=1.0, description="Peak learning rate.")
    batch_size: int = Field(4, ge=1, le=4096, description="Per-device micro-batch size.")
    grad_accum: int = Field(1, ge=1, le=4096, description="Gradient accumulation steps.")
    max_seq_len: int = Field(2048, ge=16, le=262_144, description="Truncate/pack to this many tokens.")
    packing: bool = Field(False, description="Pack short rows into full-length sequences.")
    eval_fraction: float = Field(0.05, ge=0.0, le=0.5, description="Share of rows held out.")
    seed: int = Field(42, ge=0, le=2**31 - 1, description="Random seed.")
    sample_rows: int | None = Field(
        None, ge=10, le=1_000_000,
        description="Trial run (\"try it on 500 rows first\"): train on a stratified sample of this many rows "
                    "with a short schedule; the full run on all rows can follow with the same spec.",
    )
    merge: bool = Field(False, description="Also save a merged model.")
    gpus: int | None = Field(
        None, ge=1, le=64,
        description="GPUs to train on, data-parallel (default: every GPU the worker has); batch_size is per GPU.",
    )
    engine: Literal["auto", "transformers", "unsloth"] = Field(
        "auto", description="Training engine: unsloth when installed on the worker (auto), or forced; falls back "
                            "to stackwise's own transformers + peft path with a notice.")

    @field_validator("target_modules")
    @classmethod
    def _modules(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and (not v or any(not m.strip() for m in v)):
            raise ValueError("target_modules must be a non-empty list of module names")
        return v

    @model_validator(mode="after")
    def _alpha(self) -> FinetuneSpec:
        if self.lora_alpha is None:
            self.lora_alpha = 2 * self.lora_rank
        return self


class JobRef(BaseModel):
    """Which job: a short id like ``ft-12``; empty means this user's latest job."""

    model_config = ConfigDict(extra="forbid")

    job_id: str | None = Field(None, description="Job id such as ft-12 (default: your latest job).")

    @field_validator("job_id")
    @classmethod
    def _job_id(cls, v: str | None) -> str | None:
        if v is not None and not JOB_ID.match(v.strip().lower()):
            raise ValueError("a job id looks like ft-12")
        return v.strip().lower() if v else v


class CancelArgs(JobRef):
    """Which job to cancel (required)."""

    job_id: str = Field(description="Job id such as ft-12.")
