"""What exporting a finished run starts from: which weights, which base, which dtype — decided without torch.

A run's model reaches the export folder one of three ways:

- ``merge``: a LoRA / QLoRA adapter (``RUN/adapter``) merged into its base model now. The base is loaded
  unquantized in its own precision (bf16 / fp16 as stored) — never in 4 bits, even for a QLoRA run, since
  merging into 4-bit weights would round the update away;
- ``merged``: the training already merged it (``merge: true`` in the spec → ``RUN/merged``); reused;
- ``full``: a full fine-tune already saved the whole model in ``RUN/adapter``; reused.

The base's own ``config.json`` and tokenizer files go into the export (see :mod:`tools.finetune.export_folder`),
so a serving stack reads what it reads for the base model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tools.base import ToolError
from tools.finetune.rundir import RunPaths

DTYPES = {"bfloat16": 2, "float16": 2, "float32": 4}     # the precisions an export is written in, and their bytes
WEIGHT_GLOBS = ("*.safetensors", "*.bin")
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


@dataclass(frozen=True)
class ExportSource:
    """Where the exported model comes from (see the module docstring for ``kind``)."""

    job_id: str
    run: Path
    method: str                  # lora | qlora | full
    kind: str                    # merge | merged | full
    weights: Path                # the adapter to merge (merge), or the folder whose weights are reused
    base: Path                   # the base model folder: its config and tokenizer files are copied
    dtype: str                   # the precision of the exported weights
    adapter: Path | None = None  # the LoRA adapter (also what vLLM can serve on the base without merging)
    lora_rank: int | None = None
    base_model: str | None = None    # as the user named it (a hub id, a path)
    notes: list[str] = field(default_factory=list)

    def stamp(self) -> dict[str, Any]:
        """What the export is made from; an export with the same stamp is up to date."""
        return {"kind": self.kind, "weights": str(self.weights), "weights_changed_ns": newest_mtime(self.weights),
                "base": str(self.base), "dtype": self.dtype}


def read_spec(run: Path) -> dict[str, Any]:
    """``RUN/spec.json`` as written by the launcher (read raw: only the keys the export needs)."""
    path = RunPaths(run).spec
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ToolError("no_run", f"The run folder {run} has no spec.json (was it moved or deleted?).") from None
    except (OSError, ValueError) as e:
        raise ToolError("no_run", f"I can't read {path}: {e}") from None
    if not isinstance(spec, dict):
        raise ToolError("no_run", f"{path} does not hold a JSON object.")
    return spec


def read_config(folder: Path) -> dict[str, Any]:
    """``folder/config.json`` as a dict (``{}`` when it is missing or unreadable)."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def config_dtype(config: dict[str, Any]) -> str | None:
    """The precision a ``config.json`` declares (``torch_dtype`` in transformers 4, ``dtype`` in 5)."""
    for key in ("torch_dtype", "dtype"):
        value = config.get(key)
        if isinstance(value, str) and value in DTYPES:
            return value
    return None


def merge_dtype(base_config: dict[str, Any]) -> str:
    """The precision to merge in: the base's own (bf16 / fp16 / fp32), bf16 when it declares none."""
    return config_dtype(base_config) or "bfloat16"


def is_quantized(config: dict[str, Any]) -> bool:
    """The model is stored quantized (bitsandbytes, GPTQ, AWQ …): its ``config.json`` has a ``quantization_config``."""
    return bool(config.get("quantization_config"))


def merge_load_kwargs(dtype: str) -> dict[str, Any]:
    """``from_pretrained`` arguments for the base of a merge: full precision ``dtype``, on the CPU, and never a
    quantization config (a QLoRA adapter merges into the unquantized base)."""
    import torch

    if dtype not in DTYPES:
        raise ValueError(f"cannot merge in {dtype!r}; one of {', '.join(DTYPES)}")
    return {"dtype": getattr(torch, dtype), "device_map": "cpu"}


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a model folder (safetensors preferred, else PyTorch .bin)."""
    for pattern in WEIGHT_GLOBS:
        found = sorted(p for p in folder.glob(pattern) if not p.name.startswith("adapter_model"))
        if found:
            return found
    return []


def weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in weight_files(folder))


def newest_mtime(folder: Path) -> int:
    try:
        return max((p.stat().st_mtime_ns for p in folder.iterdir() if p.is_file()), default=0)
    except OSError:
        return 0


def plan_source(job_id: str, run: Path, base_override: Path | None = None) -> ExportSource:
    """Decide where ``job_id``'s exported model comes from; ``ToolError`` when the run has nothing to export."""
    spec = read_spec(run)
    paths = RunPaths(run)
    method = str(spec.get("method") or "lora")
    base = base_override or (Path(spec["base_model_path"]) if spec.get("base_model_path") else None)
    has_base = base is not None and (base / "config.json").is_file()
    common = {"job_id": job_id, "run": run, "method": method, "base_model": spec.get("base_model")}
    if method == "full":
        if not weight_files(paths.adapter) or not (paths.adapter / "config.json").is_file():
            raise ToolError("no_adapter", f"{job_id} has no saved model in {paths.adapter} yet.")
        # Without the base folder the saved model's own config and tokenizer files are used.
        return ExportSource(kind="full", weights=paths.adapter, base=base if has_base else paths.adapter,
                            dtype=config_dtype(read_config(paths.adapter)) or "bfloat16",
                            notes=["a full fine-tune: the saved model is the whole model, nothing to merge"], **common)
    adapter = paths.adapter
    if not (adapter / "adapter_config.json").is_file() or not any((adapter / n).is_file() for n in ADAPTER_WEIGHTS):
        raise ToolError("no_adapter", f"{job_id} has no LoRA adapter in {adapter} (adapter_config.json and "
                                      "adapter_model.safetensors); the training may not have finished writing it.")
    rank = spec.get("lora_rank") if isinstance(spec.get("lora_rank"), int) else None
    merged = paths.merged
    if base_override is None and weight_files(merged) and (merged / "config.json").is_file():
        return ExportSource(kind="merged", weights=merged, adapter=adapter, lora_rank=rank,
                            base=base if has_base else merged, dtype=config_dtype(read_config(merged)) or "bfloat16",
                            notes=["the training merged it already (RUN/merged): reused"], **common)
    if not has_base:
        raise ToolError("no_base", f"The base model of {job_id} is not at {base} any more (no config.json), so "
                                   "there is nothing to merge the adapter into. Give the base model's folder.")
    base_config = read_config(base)
    if is_quantized(base_config):
        raise ToolError("quantized_base", f"The base model {base} is stored quantized (its config.json has a "
                                          "quantization_config); merging the adapter into quantized weights would "
                                          "lose the update. Give the unquantized (bf16/fp16) base model to merge onto.")
    if not weight_files(base):
        raise ToolError("no_base", f"The base model folder {base} has no weights (*.safetensors or *.bin).")
    dtype = merge_dtype(base_config)
    notes = [f"merge the adapter into {base.name} in {dtype}"]
    if method == "qlora":
        notes.append("QLoRA: merged into the unquantized base (the adapter was trained against 4-bit weights, so "
                     "answers can differ slightly from the 4-bit model's)")
    return ExportSource(kind="merge", weights=adapter, adapter=adapter, lora_rank=rank, base=base, dtype=dtype,
                        notes=notes, **common)


def export_bytes(source: ExportSource, same_disk: bool) -> int:
    """About how many bytes the export folder takes (links cost nothing on the same disk)."""
    if source.kind != "merge":
        return 0 if same_disk else weights_bytes(source.weights)
    base_config = read_config(source.base)
    stored = DTYPES.get(config_dtype(base_config) or source.dtype, 2)
    return weights_bytes(source.base) * DTYPES[source.dtype] // stored


def gguf_bytes(folder_bytes: int, dtype: str, gguf_type: str) -> int:
    """About how big the GGUF file of a model folder of ``folder_bytes`` in ``dtype`` is."""
    params = folder_bytes / DTYPES.get(dtype, 2)
    per_param = {"f16": 2.0, "bf16": 2.0, "q8_0": 1.07, "f32": 4.0}.get(gguf_type, 2.0)
    return int(params * per_param)
