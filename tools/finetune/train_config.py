"""The trainer's configuration: LoRA settings, ``SFTConfig`` (trl 1.16 names) and the step schedule.

The schedule (how often to log, evaluate and checkpoint) depends on the total number of optimizer
steps, which is known only once trl has tokenized (and maybe packed) the data set, so
:func:`apply_schedule` sets it on the built trainer, before ``train()``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

from tools.finetune.distributed import ranks
from tools.finetune.spec import FinetuneSpec
from tools.finetune.train_setup import Device, Job, TrainError

log = logging.getLogger("stackwise.train")
MAX_LOG_LINES = 50  # aim for about this many progress lines per run
SAVE_FRACTION = 0.1  # checkpoint every ~10 % of the run ...
SAVE_EVERY_MAX = 50  # ... and at least every 50 steps


def lora_config(spec: FinetuneSpec):
    """The PEFT LoRA config for ``lora`` / ``qlora``; ``None`` for full fine-tuning."""
    if spec.method == "full":
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=spec.lora_rank,
        lora_alpha=spec.lora_alpha,
        lora_dropout=spec.lora_dropout,
        target_modules=list(spec.target_modules) if spec.target_modules else "all-linear",
        task_type="CAUSAL_LM",
    )


def _field_names(config_cls) -> set[str]:
    """The arguments this transformers/trl version's config class takes (names change between versions)."""
    import dataclasses

    return {f.name for f in dataclasses.fields(config_cls)}


def _checkpointing_arg(config_cls, enabled: bool) -> dict[str, bool]:
    """transformers >= 5.2x renamed ``gradient_checkpointing`` to ``activation_checkpointing``; use what exists."""
    names = _field_names(config_cls)
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": enabled}


class PartialCheckpointing:
    """Gradient checkpointing on every ``every``-th decoder layer only (the first, the (every+1)-th, …; the
    others keep their activations and skip the recomputation). The Trainer turns checkpointing on for every
    layer as training starts; this callback then switches it off on the layers that do not need it — the same
    choice as transformers' own ``every_n_layers``, which not every transformers version we run has."""

    def __init__(self, every: int):
        self.every = every
        self.layers: tuple[int, int] = (0, 0)   # (checkpointed, of all), for the log and the tests

    def callback(self):
        from transformers import TrainerCallback

        outer = self

        class _Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kwargs):
                if model is not None:
                    outer.apply(model)

        return _Callback()

    def apply(self, model) -> tuple[int, int]:
        from transformers.modeling_layers import GradientCheckpointingLayer

        layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
        for index, layer in enumerate(layers):
            layer.gradient_checkpointing = bool(layer.gradient_checkpointing) and index % self.every == 0
        self.layers = (sum(bool(m.gradient_checkpointing) for m in layers), len(layers))
        log.info("gradient checkpointing on %d of %d layers (every %d)", *self.layers, self.every)
        return self.layers


def sft_config(job: Job, device: Device, output_dir: Path, *, has_eval: bool):
    """The ``SFTConfig`` (trl 1.16 names); the step schedule is set later by :func:`apply_schedule`."""
    from trl import SFTConfig

    spec = job.spec
    return SFTConfig(
        output_dir=str(output_dir),
        num_train_epochs=spec.epochs,
        max_steps=spec.max_steps or -1,
        learning_rate=spec.learning_rate,
        per_device_train_batch_size=spec.batch_size,
        per_device_eval_batch_size=spec.batch_size,
        gradient_accumulation_steps=spec.grad_accum,
        seed=spec.seed,
        max_length=spec.max_seq_len,
        packing=spec.packing,
        completion_only_loss=True,
        **_checkpointing_arg(SFTConfig, job.gradient_checkpointing and not fsdp_on(job)),
        bf16=device.bf16,
        fp16=device.fp16,
        use_cpu=not device.cuda,
        logging_strategy="steps",
        logging_steps=1,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=1,
        save_total_limit=2,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=1 if has_eval else None,
        prediction_loss_only=True,
        include_num_input_tokens_seen="non_padding",
        # The trackers' integrations are held by tools/finetune/tracking.py (a failing tracker is dropped there
        # instead of failing the job), so the Trainer builds none itself; the run is named after the job.
        report_to="none",
        run_name=job.job_id,
        disable_tqdm=True,
        dataloader_num_workers=0,
        **_speed_args(job, device),
        **_parallel_args(SFTConfig, job),
    )


def fsdp_on(job: Job) -> bool:
    """Whether this run shards the model with FSDP (a full fine-tune that asked for it, on several processes)."""
    return job.fsdp and ranks().distributed


def _parallel_args(config_cls, job: Job) -> dict:
    """Data-parallel settings (every trainable parameter gets a gradient each step, so DDP need not search for
    unused ones) and the sampling order (``sequential`` keeps the rows in file order: the same global batches
    on one GPU and on several — how the multi-GPU loss is checked against one GPU)."""
    names = _field_names(config_cls)
    args: dict = {}
    if fsdp_on(job):
        # FSDP2 shards weights, gradients and optimizer state over the GPUs; its own activation checkpointing
        # (the Trainer's would add an all-gather per layer in the backward)
        args.update(fsdp=True, fsdp_config={"version": 2, "activation_checkpointing": job.gradient_checkpointing,
                                            "state_dict_type": "FULL_STATE_DICT"})
    elif ranks().distributed:
        args["ddp_find_unused_parameters"] = False
    if job.sampling == "sequential":
        if "train_sampling_strategy" not in names:
            raise TrainError("sequential sampling needs transformers >= 5.10 (train_sampling_strategy)")
        args["train_sampling_strategy"] = "sequential"
    return args


def _speed_args(job: Job, device: Device) -> dict:
    """The Trainer arguments of the chosen speed-ups (``job.speed``, see tools/finetune/speed.py)."""
    from tools.finetune.speed import Speedups, optimizer_name

    speed = job.speed if isinstance(job.speed, Speedups) else Speedups()
    args: dict = {"use_liger_kernel": bool(speed.liger)}
    if speed.fused_adamw:           # otherwise the Trainer's own default optimizer
        args["optim"] = optimizer_name(speed, cuda=device.cuda)
    if speed.compile and device.cuda:
        args["torch_compile"] = True     # the Trainer compiles the model (inductor) as training starts
        speed.applied.append("compile")
    elif speed.compile:
        speed.skipped["compile"] = "needs a CUDA GPU (compiling for CPU costs more than it saves here)"
    return args


@dataclass(frozen=True)
class Schedule:
    """Total optimizer steps and how often to log, evaluate and checkpoint."""

    total: int
    logging_steps: int
    save_steps: int
    eval_steps: int


def plan_schedule(train_len: int, *, batch_size: int, grad_accum: int, epochs: float,
                  max_steps: int | None, world_size: int = 1) -> Schedule:
    """Mirror ``Trainer``'s step count (``world_size`` data-parallel processes split each global batch) and derive
    ~50 log lines and ~10 checkpoints."""
    batches = max(math.ceil(math.ceil(train_len / batch_size) / max(world_size, 1)), 1)
    per_epoch = max(math.ceil(batches / grad_accum), 1)
    total = max_steps if max_steps else max(math.ceil(epochs * per_epoch), 1)
    logging_steps = max(math.ceil(total / MAX_LOG_LINES), 1)
    save_steps = max(min(math.ceil(total * SAVE_FRACTION), SAVE_EVERY_MAX), 1)
    eval_steps = logging_steps * max(round(save_steps / logging_steps), 1)
    return Schedule(total=total, logging_steps=logging_steps, save_steps=save_steps, eval_steps=eval_steps)


def apply_schedule(trainer, job: Job) -> Schedule:
    """Size the schedule on the prepared (tokenized, maybe packed) data set and set it on the trainer."""
    spec = job.spec
    schedule = plan_schedule(
        len(trainer.train_dataset), batch_size=spec.batch_size, grad_accum=spec.grad_accum,
        epochs=spec.epochs, max_steps=spec.max_steps, world_size=ranks().world_size,
    )
    args = trainer.args
    args.logging_steps = schedule.logging_steps
    args.save_steps = schedule.save_steps
    if args.eval_strategy != "no":
        args.eval_steps = schedule.eval_steps
    return schedule
