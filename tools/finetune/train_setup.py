"""Reading a run directory and building what the training entry point trains.

Everything here follows ``ft_contract.md``: ``RUN/spec.json`` (a ``FinetuneSpec`` dump plus
``base_model_path`` and ``job_id``), ``RUN/data/{train,eval}.jsonl`` (prepared prompt/completion
rows). Problems a user can fix (a missing file, a bad spec, QLoRA without a GPU) raise
:class:`TrainError` with a one-line message; heavy libraries are imported only when needed, so
those checks fail fast, before any model is loaded.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from tools.finetune.distributed import is_main_process, ranks  # noqa: F401  (is_main_process: re-exported)
from tools.finetune.rundir import RunPaths
from tools.finetune.spec import FinetuneSpec

# Keys ``spec.json`` may hold besides the ``FinetuneSpec`` fields (see the contract).
RUN_KEYS = ("base_model_path", "base_model_source", "job_id", "gradient_checkpointing", "checkpoint_every",
            "preflight", "speed", "sampling", "trial", "evaluate", "fsdp")
ROW_KEYS = ("prompt", "completion")
log = logging.getLogger("stackwise.finetune")


class TrainError(Exception):
    """An expected failure with a one-line message for the user (exit code 1, no traceback)."""


@dataclass
class Job:
    """A validated job: the spec, where the base model is, and the prepared rows."""

    spec: FinetuneSpec
    base_model_path: Path
    job_id: str | None
    gradient_checkpointing: bool
    train_rows: list[dict[str, str]]
    eval_rows: list[dict[str, str]] = field(default_factory=list)
    speed: Any = None          # tools.finetune.speed.Speedups once chosen; spec.json's "speed" options until then
    sampling: str = "random"   # "sequential": rows in file order (a reproducible global batch on any GPU count)
    engine: Any = None         # tools.finetune.engines.EngineChoice once the model is loaded
    evaluate: bool = True      # the held-out evaluation after training (spec.json "evaluate": false skips it)
    fsdp: bool = False         # shard a full fine-tune over the GPUs (the preflight's choice when one GPU is too small)
    checkpoint_every: int = 1  # with gradient checkpointing: only every n-th decoder layer (the preflight's choice)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def load_spec(paths: RunPaths) -> tuple[FinetuneSpec, dict[str, Any]]:
    """Read and validate ``spec.json``; return the spec and the run-level extras."""
    if not paths.spec.is_file():
        raise TrainError(f"missing {paths.spec}")
    try:
        raw = json.loads(paths.spec.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TrainError(f"spec.json is not valid JSON: {_one_line(exc)}") from None
    if not isinstance(raw, dict):
        raise TrainError("spec.json must hold a JSON object")
    extras = {k: raw.pop(k) for k in RUN_KEYS if k in raw}
    try:
        spec = FinetuneSpec(**raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'spec'}: {err['msg']}" for err in exc.errors()
        )
        raise TrainError(f"spec.json is invalid: {_one_line(problems)}") from None
    return spec, extras


def _base_model_path(extras: dict[str, Any]) -> Path:
    """The base model's folder on this machine: ``base_model_path`` when it is here, else the model that
    ``base_model_source`` names (a hub or ModelScope id), from this machine's cache or downloaded into it."""
    value, origin = extras.get("base_model_path"), extras.get("base_model_source")
    path = Path(value).expanduser() if isinstance(value, str) and value.strip() else None
    if path is not None and (path / "config.json").is_file():
        return path
    if origin is not None:
        if not isinstance(origin, dict) or not all(isinstance(origin.get(k), str) for k in ("source", "ref")):
            raise TrainError('spec.json base_model_source must be {"source": …, "ref": …}')
        if origin["source"] != "local":
            from tools.base import ToolError
            from tools.finetune.sources import fetch_model

            try:
                return fetch_model(origin["source"], origin["ref"])
            except ToolError as exc:
                raise TrainError(_one_line(exc.message)) from None
    if path is None:
        raise TrainError("spec.json has no base_model_path (a local model directory)")
    raise TrainError(f"base model not found: {path} has no config.json")


def _wants_fsdp(extras: dict[str, Any], spec: FinetuneSpec) -> bool:
    """FSDP for a full fine-tune when spec.json or its preflight asks for it (LoRA stays on DDP: its trainable
    part is small, and every GPU holding the whole frozen model is what makes it fast)."""
    preflight = extras.get("preflight")
    asked = extras.get("fsdp") is True or (isinstance(preflight, dict) and preflight.get("fsdp") is True)
    return asked and spec.method == "full"


def _wants_checkpointing(extras: dict[str, Any]) -> bool:
    if extras.get("gradient_checkpointing") is True:
        return True
    preflight = extras.get("preflight")
    return isinstance(preflight, dict) and preflight.get("gradient_checkpointing") is True


def _checkpoint_every(extras: dict[str, Any]) -> int:
    """Which decoder layers gradient checkpointing covers: every n-th (spec.json ``checkpoint_every``, else the
    preflight's choice, else every layer)."""
    preflight = extras.get("preflight")
    vram = preflight.get("vram") if isinstance(preflight, dict) else None
    value = extras.get("checkpoint_every", vram.get("checkpoint_every") if isinstance(vram, dict) else None)
    if value is None:
        return 1
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1000:
        raise TrainError(f"spec.json checkpoint_every must be a whole number from 1 to 1000, not {value!r}")
    return value


def read_rows(path: Path, *, required: bool) -> list[dict[str, str]]:
    """Read prepared JSONL rows (``prompt``, ``completion``, optional ``question``/``reference``)."""
    if not path.is_file():
        if required:
            raise TrainError(f"missing prepared data {path}")
        return []
    rows: list[dict[str, str]] = []
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TrainError(f"{path.name} line {number} is not valid JSON: {_one_line(exc)}") from None
            if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ROW_KEYS):
                raise TrainError(f"{path.name} line {number} needs string fields 'prompt' and 'completion'")
            if not row["completion"].strip():
                raise TrainError(f"{path.name} line {number} has an empty completion")
            rows.append({
                "prompt": row["prompt"],
                "completion": row["completion"],
                "question": str(row.get("question") or row["prompt"]),
                "reference": str(row.get("reference") or ""),
            })
    if required and not rows:
        raise TrainError(f"{path} has no rows")
    return rows


def load_job(paths: RunPaths) -> Job:
    """Validate the run directory and read the spec and the prepared data (no model is loaded)."""
    if not paths.root.is_dir():
        raise TrainError(f"run directory not found: {paths.root}")
    spec, extras = load_spec(paths)
    base = _base_model_path(extras)
    job_id = extras.get("job_id")
    speed = extras.get("speed")
    if speed is not None:
        from tools.finetune.speed import speedups

        try:
            speedups(speed if isinstance(speed, dict) else {"?": speed})
        except ValueError as exc:
            raise TrainError(f"spec.json speed: {exc}") from None
    return Job(
        spec=spec,
        base_model_path=base,
        job_id=str(job_id) if job_id is not None else None,
        gradient_checkpointing=_wants_checkpointing(extras),
        train_rows=read_rows(paths.train_data, required=True),
        eval_rows=read_rows(paths.eval_data, required=False),
        speed=speed,
        sampling=_sampling(extras),
        evaluate=extras.get("evaluate", True) is not False,
        fsdp=_wants_fsdp(extras, spec),
        checkpoint_every=_checkpoint_every(extras),
    )


def _sampling(extras: dict[str, Any]) -> str:
    value = extras.get("sampling", "random")
    if value not in ("random", "sequential"):
        raise TrainError(f"spec.json sampling must be 'random' or 'sequential', not {value!r}")
    return value


@dataclass(frozen=True)
class Device:
    """Where training runs and in which precision."""

    cuda: bool
    bf16: bool

    @property
    def fp16(self) -> bool:
        """Mixed fp16 on a CUDA GPU without bf16 (fp32 master weights)."""
        return self.cuda and not self.bf16

    @property
    def dtype(self):
        import torch

        return torch.bfloat16 if self.bf16 else torch.float32


def detect_device() -> Device:
    """CUDA with bf16 when available, else fp32 (CPU, or fp16 mixed precision on older GPUs)."""
    import torch

    cuda = torch.cuda.is_available()
    if cuda and ranks().distributed:
        torch.cuda.set_device(ranks().local_rank)   # one GPU per rank: everything below lands on "cuda" = this one
    return Device(cuda=cuda, bf16=bool(cuda and torch.cuda.is_bf16_supported()))


def check_method(spec: FinetuneSpec, device: Device) -> None:
    """QLoRA needs a CUDA GPU and bitsandbytes; fail before loading anything when either is missing."""
    if spec.method != "qlora":
        return
    if not device.cuda:
        raise TrainError("QLoRA needs a CUDA GPU (bitsandbytes 4-bit); none found — use method 'lora' or 'full'")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise TrainError("QLoRA needs the bitsandbytes package, which is not installed — install it or use 'lora'")


def _choose_speedups(job: Job, device: Device) -> None:
    """Decide the speed-ups (tools/finetune/speed.py) from the run's options and the model's size; Liger is
    applied by the Trainer (``use_liger_kernel``), which also tells trl that there are no full logits."""
    from tools.finetune.speed import choose

    config = json.loads((job.base_model_path / "config.json").read_text(encoding="utf-8"))
    total = None
    try:
        from tools.finetune.preflight import count_params

        spec = job.spec
        total = count_params(config, spec.method, spec.lora_rank, spec.target_modules)["total"]
    except Exception:    # an unusual config: no size-based defaults, the explicit options still apply
        pass
    speed = choose(job.speed if isinstance(job.speed, dict) else None, total_params=total, method=job.spec.method,
                   cuda=device.cuda)
    if speed.liger and not device.cuda:
        speed.liger, speed.skipped["liger"] = False, "needs a CUDA GPU"
    elif speed.liger and importlib.util.find_spec("liger_kernel") is None:
        speed.liger, speed.skipped["liger"] = False, "liger-kernel is not installed"
    elif speed.liger:
        speed.applied.append("liger")
    job.speed = speed


def _choose_engine(job: Job, device: Device):
    from tools.finetune.engines import choose_engine

    try:
        model_type = json.loads((job.base_model_path / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        model_type = None
    job.engine = choose_engine(job.spec.engine, cuda=device.cuda, processes=ranks().world_size,
                               model_type=model_type)
    if job.engine.notice:
        log.warning("engine: %s", job.engine.notice)
    return job.engine


def _load_unsloth(job: Job, device: Device):
    from tools.finetune.engines import load_unsloth

    if job.speed.liger:     # unsloth brings its own fused kernels
        job.speed.liger, job.speed.skipped["liger"] = False, "unsloth has its own kernels"
        job.speed.applied = [a for a in job.speed.applied if a != "liger"]
    if job.speed.fused_lora:
        job.speed.fused_lora, job.speed.skipped["fused_lora"] = False, "unsloth has its own LoRA kernels"
    try:
        return load_unsloth(job, device, max_seq_len=job.spec.max_seq_len)
    except (OSError, ValueError, KeyError, NotImplementedError, RuntimeError) as exc:
        raise TrainError(f"unsloth could not load {job.base_model_path}: {_one_line(exc)} — set engine "
                         "'transformers' to train with stackwise's own path") from None


def reload_full_model(folder: Path, device: Device):
    """A fully fine-tuned model as saved (after FSDP training, whose in-memory weights are shards), on this GPU."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=device.dtype, attn_implementation="sdpa")
    return model.to(torch.cuda.current_device()) if device.cuda else model


def load_model(job: Job, device: Device):
    """Load the tokenizer and the base model (SDPA attention; 4-bit NF4 for QLoRA)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"dtype": device.dtype, "attn_implementation": "sdpa"}
    _choose_speedups(job, device)
    if _choose_engine(job, device).used == "unsloth":
        return _load_unsloth(job, device)
    if job.spec.method == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if device.bf16 else torch.float16,
        )
        kwargs["dtype"] = torch.bfloat16 if device.bf16 else torch.float16
        kwargs["device_map"] = {"": torch.cuda.current_device()}   # this rank's GPU (set by detect_device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(job.base_model_path)
        model = AutoModelForCausalLM.from_pretrained(job.base_model_path, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise TrainError(f"cannot load the base model from {job.base_model_path}: {_one_line(exc)}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if job.spec.method == "full":
        model.requires_grad_(True)
    if device.cuda and job.spec.method != "qlora":
        # the trainer would move it anyway; the "before" answers of a full run need it there now
        model.to(torch.cuda.current_device())
    return model, tokenizer
