"""The training entry point: ``python -m tools.finetune.train RUN [--resume]``.

Reads ``RUN/spec.json`` and ``RUN/data/*.jsonl`` (see ``ft_contract.md``), fine-tunes the base
model with trl's ``SFTTrainer`` (LoRA, QLoRA or full; loss on the completion only), and writes
``progress.jsonl``, checkpoints, the adapter (or model), the merged model, ``comparison.json``
and ``summary.json`` into ``RUN``. Exit codes: 0 succeeded, 1 failed (one-line message in
``summary.json`` and on stderr; a traceback only in ``RUN/train.log`` and only for bugs),
3 cancelled by SIGTERM/SIGINT after saving a checkpoint; ``--resume`` continues from the latest one.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":   # unsloth, when this run uses it, must be imported before transformers / peft / trl
    from tools.finetune.engines import preload_for_run

    preload_for_run(sys.argv[1:])

import argparse  # noqa: E402
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tools.finetune.distributed import finish, keep_until_exit, leave, peer_failure, ranks, record_failure
from tools.finetune.evaluate import HeldOutEvaluation
from tools.finetune.speed import Speedups, training_callbacks
from tools.finetune.tracking import TrackingCallback
from tools.finetune.train_config import PartialCheckpointing, apply_schedule, fsdp_on, lora_config, sft_config
from tools.finetune.train_progress import CancelFlag, ProgressCallback, gpu_mem_gb, run_logging
from tools.finetune.train_report import (
    comparison_rows,
    count_params,
    generate,
    previous_train_seconds,
    save_adapter,
    save_merged,
    summary,
    write_comparison,
    write_json,
)
from tools.finetune.train_setup import (
    RunPaths,
    TrainError,
    check_method,
    detect_device,
    load_job,
    load_model,
    reload_full_model,
)

log = logging.getLogger("stackwise.finetune")
EXIT_OK, EXIT_FAILED, EXIT_CANCELLED = 0, 1, 3
OOM_HINT = "try method 'qlora', a smaller batch_size or max_seq_len, or gradient checkpointing"


@dataclass
class Outcome:
    """What :func:`run` did: the exit code, the summary written, and (on success) the trained model —
    the PEFT model for LoRA/QLoRA, the merged model when a LoRA run merged in place, the model for full."""

    code: int
    summary: dict[str, Any]
    model: Any = None
    tokenizer: Any = None


class _Cancelled(Exception):
    """Raised between phases when a cancellation arrived outside the training loop."""


class _Facts:
    """What is known so far about the run, for whichever summary ends it."""

    def __init__(self) -> None:
        self.fields: dict[str, Any] = {}
        self.trainer = None
        self.progress: ProgressCallback | None = None
        self.tracking: TrackingCallback | None = None
        self.earlier_seconds = 0.0

    def collect(self) -> dict[str, Any]:
        """Summary fields from the trainer state (which survives ``--resume``) and the callback."""
        fields = dict(self.fields)
        if self.trainer is not None:
            state = self.trainer.state
            fields["steps"] = state.global_step
            fields["total_steps"] = state.max_steps or fields.get("total_steps")
            losses = [e["loss"] for e in state.log_history if "loss" in e]
            evals = [e["eval_loss"] for e in state.log_history if "eval_loss" in e]
            fields["final_loss"] = round(float(losses[-1]), 6) if losses else None
            fields["eval_loss"] = round(float(evals[-1]), 6) if evals else None
        if self.progress is not None and self.progress.train_seconds:
            fields["train_seconds"] = round(self.earlier_seconds + self.progress.train_seconds, 2)
            fields["tokens_per_s"] = self.progress.tokens_per_s
        if "torch" in sys.modules:
            fields["peak_gpu_mem_gb"] = gpu_mem_gb()
        return fields


def _is_oom(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError | MemoryError) and ("out of memory" in text or "can't allocate" in text)


def _fresh_start(paths: RunPaths) -> None:
    """A run that is not resumed starts clean: no stale progress, checkpoints or artifacts."""
    for path in (paths.progress, paths.comparison, paths.summary):
        path.unlink(missing_ok=True)
    for folder in (paths.checkpoints, paths.adapter, paths.merged):
        shutil.rmtree(folder, ignore_errors=True)


def _latest_checkpoint(paths: RunPaths) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(paths.checkpoints)) if paths.checkpoints.is_dir() else None


def _check_cancel(cancel: CancelFlag) -> None:
    if cancel.is_set:
        raise _Cancelled


def _sharded_trainer():
    """trl's SFTTrainer with the model's own loss, for FSDP runs. trl computes the loss with a fused LM head that
    calls the model's backbone from outside the model's forward, and there FSDP2 has not gathered the final norm's
    sharded weight (2 H200s, trl 1.16, torch 2.11: "aten.mul.Tensor got mixed torch.Tensor and DTensor",
    evals/gpu/fsdp_check.py). The model's own forward computes the same loss from the same labels (-100 outside
    the completion; summed over the batch's tokens like trl's); trl's entropy and token-accuracy metrics are not
    logged for these runs."""
    from transformers import Trainer
    from trl import SFTTrainer

    class ShardedSFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return Trainer.compute_loss(self, model, {**inputs, "use_cache": False}, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    return ShardedSFTTrainer


def _train(paths: RunPaths, resume: bool, cancel: CancelFlag, facts: _Facts) -> Outcome:
    me = ranks()
    job = load_job(paths)
    spec = job.spec
    device = detect_device()
    check_method(spec, device)
    checkpoint = _latest_checkpoint(paths) if resume else None
    if resume and checkpoint is None:
        log.info("no checkpoint to resume from in %s: starting from the beginning", paths.checkpoints)
    if checkpoint is None:
        if me.main:
            _fresh_start(paths)
    else:
        facts.earlier_seconds = previous_train_seconds(paths.summary)
        log.info("resuming from %s", checkpoint)
    _check_cancel(cancel)

    log.info("loading %s (%s, %s)", job.base_model_path, spec.method,
             "bf16" if device.bf16 else "fp16 mixed" if device.fp16 else "fp32 on CPU")
    model, tokenizer = load_model(job, device)
    _check_cancel(cancel)

    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import SFTTrainer

    def dataset(rows):
        # An explicit fingerprint (a hash of the rows): datasets would otherwise pickle the whole Arrow
        # table to make one, which fails with some dill/pyarrow/Python combinations (seen on Python 3.12).
        import hashlib

        import pyarrow as pa

        pairs = [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows]
        digest = hashlib.sha256(json.dumps(pairs, ensure_ascii=False).encode()).hexdigest()[:32]
        return Dataset(pa.Table.from_pylist(pairs), fingerprint=digest)

    shown = comparison_rows(job.eval_rows, job.train_rows)
    before = None
    if spec.method == "full" and me.main:  # no adapter to switch off afterwards: answer with the base weights now
        before = generate(model, tokenizer, [r["prompt"] for r in shown])
    held_out = HeldOutEvaluation.for_job(job, stop=lambda: cancel.is_set)   # loss, <think> format, exact match
    if spec.method == "full" and me.main:    # its "before" is the base weights: measure them now
        held_out.measure_base(model, tokenizer)

    progress = ProgressCallback(paths.progress if me.main else None, cancel, sync=me.distributed)
    tracking = TrackingCallback(paths.root, job)     # TensorBoard always; W&B, MLflow when configured
    facts.fields["tracking"] = tracking.links        # summary.json links the runs (filled in as they start)
    facts.tracking = tracking
    unsloth = job.engine is not None and job.engine.used == "unsloth"
    callbacks = [progress, tracking]
    if job.gradient_checkpointing and job.checkpoint_every > 1 and not unsloth and not fsdp_on(job):
        callbacks.append(PartialCheckpointing(job.checkpoint_every).callback())   # only the layers memory needs
    if isinstance(job.speed, Speedups) and not unsloth:   # FP8, the fused LoRA layer (GPU default), CUDA graphs
        callbacks += training_callbacks(job.speed, spec.method, cuda=device.cuda, lora_dropout=spec.lora_dropout,
                                        accumulating=spec.grad_accum > 1)
    trainer_class = SFTTrainer
    if fsdp_on(job):
        log.info("FSDP: the loss is the model's own (trl's fused LM head runs outside FSDP's gathering)")
        trainer_class = _sharded_trainer()
    trainer = trainer_class(
        model=model,
        args=sft_config(job, device, paths.checkpoints, has_eval=bool(job.eval_rows)),
        train_dataset=dataset(job.train_rows),
        eval_dataset=dataset(job.eval_rows) if job.eval_rows else None,
        processing_class=tokenizer,
        peft_config=None if unsloth else lora_config(spec),
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)  # progress.jsonl and train.log replace the printed dicts
    graphs = isinstance(job.speed, Speedups) and job.speed.cuda_graphs and "cuda_graphs" not in job.speed.skipped
    if (spec.packing or graphs) and not unsloth:
        # packed examples as rows instead of trl's one flattened row (which SDPA attends as one sequence under a
        # mask: measured 4× slower at 8 × 2048); rows of max_seq_len, one batch shape, for graphed layers. trl's
        # constructor refuses a custom collator with packing, so it is set here, before any batch is drawn.
        from tools.finetune.row_packing import row_collator

        trainer.data_collator = row_collator(tokenizer.pad_token_id, spec.max_seq_len, fixed_length=graphs)
    facts.trainer, facts.progress = trainer, progress
    if len(trainer.train_dataset) == 0:
        raise TrainError(f"no training row has a completion token left within max_seq_len={spec.max_seq_len} "
                         "— raise max_seq_len")
    if trainer.eval_dataset is not None and len(trainer.eval_dataset) == 0:
        log.info("no eval row fits in max_seq_len=%d: training without evaluation", spec.max_seq_len)
        trainer.eval_dataset, trainer.args.eval_strategy = None, "no"
    schedule = apply_schedule(trainer, job)
    model = trainer.accelerator.unwrap_model(trainer.model)
    trainable, total = count_params(model)
    facts.fields.update(total_steps=schedule.total, trainable_params=trainable, total_params=total,
                        gpus=me.world_size, global_batch=spec.batch_size * spec.grad_accum * me.world_size,
                        engine=job.engine.to_dict() if job.engine is not None else None,
                        speed=job.speed.to_dict() if hasattr(job.speed, "to_dict") else None)
    if me.distributed:
        log.info("data-parallel on %d processes (%s)", me.world_size,
                 "FSDP: the model sharded" if trainer.is_fsdp_enabled else "DDP: a whole model on each")
    log.info("training %d steps on %d rows (%d held out); %d of %d parameters trainable; "
             "log every %d, checkpoint every %d", schedule.total, len(job.train_rows), len(job.eval_rows),
             trainable, total, schedule.logging_steps, schedule.save_steps)

    trainer.train(resume_from_checkpoint=checkpoint)
    if isinstance(job.speed, Speedups):    # what applied as training started (FP8) joins what applied at load time
        facts.fields["speed"] = job.speed.to_dict()
    if progress.cancelled:
        raise _Cancelled
    sharded = fsdp_on(job)
    if sharded:   # the weights are spread over the ranks: gather them into one saved model, all ranks taking part
        trainer.save_model(str(paths.adapter))
    finish()   # the ranks part here: saving, comparing and reporting are rank 0's alone
    if not me.main:
        return Outcome(EXIT_OK, {})
    _check_cancel(cancel)

    artifacts: dict[str, str | None] = {"adapter": str(paths.adapter), "merged": None,
                                        "comparison": str(paths.comparison)}
    if sharded:   # rank 0 answers the comparison with the whole trained model, read back from what was saved
        tokenizer.save_pretrained(str(paths.adapter))
        model = reload_full_model(paths.adapter, device)
    else:
        save_adapter(model, tokenizer, paths.adapter)
    _check_cancel(cancel)
    prompts = [r["prompt"] for r in shown]
    if before is None:
        before = generate(model, tokenizer, prompts, adapter_off=True)
    write_comparison(paths.comparison, shown, before, generate(model, tokenizer, prompts))
    if job.evaluate:
        facts.fields["evaluation"] = held_out.result(model, tokenizer)   # never raises: a failure is a note
    _check_cancel(cancel)
    if spec.merge and spec.method == "full":
        log.info("merge: full fine-tuning already saved the whole model in %s", paths.adapter)
    elif spec.merge:
        merged = save_merged(model, tokenizer, paths.merged, base_model_path=job.base_model_path,
                             quantized=spec.method == "qlora", dtype=device.dtype)
        if spec.method == "lora":  # merged in place: the trained weights now live in ``merged``
            model = merged
        artifacts["merged"] = str(paths.merged)
    facts.fields["artifacts"] = artifacts
    result = summary("succeeded", **facts.collect())
    write_json(paths.summary, result)
    log.info("succeeded: %d steps, final loss %s, eval loss %s, %s tokens/s", result["steps"],
             result["final_loss"], result["eval_loss"], result["tokens_per_s"])
    return Outcome(EXIT_OK, result, model=model, tokenizer=tokenizer)


def _end(paths: RunPaths, status: str, code: int, facts: _Facts, error: str | None = None, *,
         peer_first: bool = False) -> Outcome:
    """Write the summary that ends the run (rank 0 only; another rank records a failure for rank 0 to report).
    ``peer_first``: a failure another rank recorded explains this end better (a stop or a broken collective
    that followed it)."""
    me = ranks()
    if facts.tracking is not None and status == "failed":
        try:          # a run that raised never reached on_train_end: mark its W&B / MLflow runs failed
            facts.tracking.close(failed=True)
        except Exception as exc:  # noqa: BLE001 - tracking must not hide why the run failed
            log.warning("tracking: could not close the runs: %s", exc)
    if not me.main:
        if status == "failed":
            record_failure(paths.root, me.rank, error or "failed")
        return Outcome(code, summary(status, error=error))
    peer = peer_failure(paths.root) if me.distributed and (peer_first or status == "cancelled") else None
    if peer is not None:
        status, code, error = "failed", EXIT_FAILED, f"a training process on another GPU failed: {peer}"
    result = summary(status, error=error, **facts.collect())
    try:
        write_json(paths.summary, result)
    except OSError as exc:
        log.error("cannot write %s: %s", paths.summary, exc)
    return Outcome(code, result)


def run(run_dir: str | Path, *, resume: bool = False, cancel: CancelFlag | None = None) -> Outcome:
    """Train the job in ``run_dir``; never raises for a failed run (see :class:`Outcome`)."""
    paths = RunPaths(Path(run_dir))
    if not paths.root.is_dir():
        print(f"train: run directory not found: {paths.root}", file=sys.stderr)
        return Outcome(EXIT_FAILED, summary("failed", error=f"run directory not found: {paths.root}"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cancel = cancel or CancelFlag()
    facts = _Facts()
    me = ranks()
    if me.distributed:   # the trainer it will hold must outlive this call: see distributed.leave
        keep_until_exit(facts)
    log_path = paths.log if me.main else paths.root / f"train.rank{me.rank}.log"
    with run_logging(log_path, "train" if me.main else f"train[rank {me.rank}]"):
        try:
            return _train(paths, resume, cancel, facts)
        except KeyboardInterrupt:  # a second Ctrl-C: stop now, without a new checkpoint
            log.info("interrupted; resume continues from the last saved checkpoint, if any")
            return _end(paths, "cancelled", EXIT_CANCELLED, facts)
        except _Cancelled:
            checkpoint = _latest_checkpoint(paths)
            log.info("cancelled (%s) at step %s; %s", cancel.signal_name or "request", facts.collect().get("steps"),
                     f"resume from {checkpoint}" if checkpoint else "no checkpoint yet")
            return _end(paths, "cancelled", EXIT_CANCELLED, facts)
        except TrainError as exc:
            log.error("failed: %s", exc)
            return _end(paths, "failed", EXIT_FAILED, facts, str(exc))
        except Exception as exc:  # the run must end with a summary, whatever happened
            if _is_oom(exc):
                message = f"out of memory: {' '.join(str(exc).split())[:300]} — {OOM_HINT}"
                log.error("failed: %s", message)
                return _end(paths, "failed", EXIT_FAILED, facts, message)
            logging.getLogger("stackwise.traceback").error("unexpected error", exc_info=exc)
            message = f"internal error: {type(exc).__name__}: {' '.join(str(exc).split())[:300]} (see {log_path})"
            log.error("failed: %s", message)
            return _end(paths, "failed", EXIT_FAILED, facts, message, peer_first=True)


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m tools.finetune.train RUN [--resume]``."""
    parser = argparse.ArgumentParser(prog="python -m tools.finetune.train", description=__doc__.splitlines()[0])
    parser.add_argument("run", help="the job's run directory (holds spec.json and data/)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    args = parser.parse_args(argv)
    cancel = CancelFlag().install()
    try:
        code = run(args.run, resume=args.resume, cancel=cancel).code
    finally:
        cancel.restore()
    if ranks().distributed:
        leave(code)   # no teardown: a process group's destructor can deadlock (see distributed.leave)
    return code


if __name__ == "__main__":
    sys.exit(main())
