"""Which library builds the model the trainer trains: our own path (transformers + peft, with the speed-ups of
``speed.py``) or unsloth's ``FastLanguageModel`` when the worker has it.

The spec's ``engine`` is ``auto`` (unsloth when it is installed, the run has one CUDA GPU and the model family
is one unsloth patches; our path otherwise, silently), ``transformers`` (always ours) or ``unsloth`` (asked for:
when it cannot be used, the run falls back to our path and says why — in ``train.log`` and in
``summary.json``'s ``engine``). Training itself is the same trl ``SFTTrainer`` either way, so progress,
checkpoints, cancellation, the adapter and the reports do not depend on the engine.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import asdict, dataclass
from typing import Any

log = logging.getLogger("stackwise.finetune")

# Model families unsloth's FastLanguageModel patches (config.json ``model_type``).
UNSLOTH_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3",
                                 "gemma3_text", "phi3", "cohere", "granite", "falcon_h1"})


@dataclass
class EngineChoice:
    requested: str                 # auto | transformers | unsloth
    used: str                      # transformers | unsloth
    notice: str | None = None      # why the asked-for engine is not the one used

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def unsloth_installed() -> bool:
    return importlib.util.find_spec("unsloth") is not None


def choose_engine(requested: str, *, cuda: bool, processes: int, model_type: str | None,
                  installed: bool | None = None) -> EngineChoice:
    """The engine for a run; never raises (an engine that cannot run falls back to ``transformers``)."""
    if requested == "transformers":
        return EngineChoice(requested, "transformers")
    installed = unsloth_installed() if installed is None else installed
    reason = None
    if not installed:
        reason = "unsloth is not installed on the worker (pip install unsloth)"
    elif not cuda:
        reason = "unsloth needs a CUDA GPU"
    elif processes > 1:
        reason = f"this run is data-parallel on {processes} GPUs; unsloth's open-source engine trains on one"
    elif (model_type or "").lower() not in UNSLOTH_MODEL_TYPES:
        reason = f"unsloth does not support the model family {model_type or 'unknown'!r}"
    if reason is None:
        return EngineChoice(requested, "unsloth")
    if requested == "unsloth":
        return EngineChoice(requested, "transformers", f"{reason}: trained with stackwise's own path instead")
    return EngineChoice(requested, "transformers")


def preload_for_run(argv: list[str]) -> bool:
    """Import unsloth before anything imports transformers, peft or trl (it patches them as they load), when the
    run the command line names will train with it. Called first thing by ``python -m tools.finetune.train``;
    never raises (the engine choice itself comes later and reports any problem)."""
    import json
    import os
    from pathlib import Path

    try:
        run = next(a for a in argv if not a.startswith("-"))
        raw = json.loads((Path(run) / "spec.json").read_text(encoding="utf-8"))
        requested = raw.get("engine", "auto")
        if requested == "transformers" or not unsloth_installed():
            return False
        config = json.loads((Path(raw["base_model_path"]) / "config.json").read_text(encoding="utf-8"))
        import torch

        choice = choose_engine(requested, cuda=torch.cuda.is_available(),
                               processes=int(os.environ.get("WORLD_SIZE", "1")), model_type=config.get("model_type"),
                               installed=True)
        if choice.used != "unsloth":
            return False
        import unsloth  # noqa: F401
        return True
    except Exception:  # noqa: BLE001 - a bad run directory is reported by the trainer itself
        return False


def load_unsloth(job, device, *, max_seq_len: int):
    """(model, tokenizer) from unsloth: the base in bf16 (4-bit for QLoRA) and, for LoRA/QLoRA, the adapter
    already attached — the trainer then gets no ``peft_config``."""
    from unsloth import FastLanguageModel

    spec = job.spec
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=str(job.base_model_path),
        max_seq_length=max_seq_len,
        dtype=device.dtype,
        load_in_4bit=spec.method == "qlora",
        full_finetuning=spec.method == "full",
        local_files_only=True,
    )
    if spec.method != "full":
        model = FastLanguageModel.get_peft_model(
            model,
            r=spec.lora_rank,
            lora_alpha=spec.lora_alpha,
            lora_dropout=spec.lora_dropout,
            target_modules=list(spec.target_modules) if spec.target_modules else
            ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            bias="none",
            use_gradient_checkpointing="unsloth" if job.gradient_checkpointing else False,
            random_state=spec.seed,
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
