"""What a finished run leaves behind: the adapter (or model), the merged model, the before/after
comparison and ``summary.json`` (see ``ft_contract.md``)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

COMPARE_ROWS = 3
COMPARE_NEW_TOKENS = 64


def count_params(model) -> tuple[int, int]:
    """(trainable, total) parameters; PEFT's own count handles 4-bit packed weights."""
    if hasattr(model, "get_nb_trainable_parameters"):
        trainable, total = model.get_nb_trainable_parameters()
        return int(trainable), int(total)
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (a reader never sees half a file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def generate(model, tokenizer, prompts: Iterable[str], *, adapter_off: bool = False) -> list[str]:
    """Greedy, short answers for ``prompts`` (tokenized as in training); ``adapter_off`` gives the base model's."""
    import torch

    was_training = model.training
    model.eval()
    answers = []
    ctx = model.disable_adapter() if adapter_off else nullcontext()
    with ctx, torch.no_grad():
        for prompt in prompts:
            enc = tokenizer(prompt, return_tensors="pt").to(model.device)
            out = model.generate(
                **enc,
                max_new_tokens=COMPARE_NEW_TOKENS,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                use_cache=True,
            )
            answers.append(tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    model.train(was_training)
    return answers


def comparison_rows(eval_rows: list[dict], train_rows: list[dict]) -> list[dict]:
    """Up to three held-out rows (training rows only when there is no eval set)."""
    return (eval_rows or train_rows)[:COMPARE_ROWS]


def write_comparison(path: Path, rows: list[dict], before: list[str], after: list[str]) -> None:
    """``[{"question", "reference", "before", "after"}]``."""
    write_json(path, [
        {"question": r["question"], "reference": r["reference"], "before": b, "after": a}
        for r, b, a in zip(rows, before, after, strict=True)
    ])


def save_adapter(model, tokenizer, out: Path) -> None:
    """Save the PEFT adapter (LoRA/QLoRA) or the whole model (full) with the tokenizer."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def save_merged(model, tokenizer, out: Path, *, base_model_path: Path, quantized: bool, dtype):
    """Merge the LoRA weights into the base, save it with the tokenizer, and return the merged model.

    A non-quantized model is merged in place (no second copy in memory); a 4-bit QLoRA base is
    reloaded unquantized in ``dtype`` and the saved adapter merged into it, since merging into
    4-bit weights would round the update away.
    """
    out.mkdir(parents=True, exist_ok=True)
    if quantized:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(base_model_path, dtype=dtype, attn_implementation="sdpa")
        model = PeftModel.from_pretrained(base, str(out.parent / "adapter"))
    merged = model.merge_and_unload()
    merged.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return merged


def summary(status: str, *, error: str | None = None, **fields: Any) -> dict[str, Any]:
    """A ``summary.json`` object with every contract key (unknown values are null)."""
    data: dict[str, Any] = {
        "status": status,
        "steps": 0,
        "total_steps": None,
        "final_loss": None,
        "eval_loss": None,
        "train_seconds": None,
        "tokens_per_s": None,
        "peak_gpu_mem_gb": None,
        "trainable_params": None,
        "total_params": None,
        "speed": None,          # the speed-ups used: {"liger", "fused_adamw", "applied", "skipped"}
        "engine": None,         # {"requested", "used", "notice"}: transformers (ours) or unsloth
        "gpus": None,           # data-parallel processes (one per GPU; 1 on CPU)
        "global_batch": None,   # rows per optimizer step over all GPUs: batch_size × grad_accum × gpus
        "evaluation": None,     # held-out loss, <think> format, exact match before/after (tools/finetune/evaluate.py)
        "tracking": None,       # TensorBoard / W&B / MLflow runs of this job (tools/finetune/tracking.py)
        "error": error,
        "artifacts": {"adapter": None, "merged": None, "comparison": None},
    }
    for key, value in fields.items():
        if key not in data:
            raise KeyError(f"not a summary key: {key}")
        data[key] = value
    return data


def previous_train_seconds(path: Path) -> float:
    """Training time already spent by earlier sessions of this run (for ``--resume``)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get("train_seconds")
        return float(value) if value is not None else 0.0
    except (OSError, ValueError, AttributeError, TypeError):
        return 0.0
