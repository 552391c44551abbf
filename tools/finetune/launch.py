"""``launch_finetune``'s work: find the base model offline, check the job (the preflight the user confirms
against), and queue it with a ready run directory.

Base models are found offline (a folder in the allowed roots, the Hugging Face or ModelScope cache) by
tools/finetune/sources.py; ``spec.json`` records the folder (``base_model_path``) and how it was named
(``base_model_source``), so a worker without that folder can find or fetch the model itself.

The GPU the user told us they have (``ctx.extras["user_gpu"]``, from user memory) adds advice to the preflight:
a warning with the QLoRA estimate when the job will not fit it (it never blocks: the worker's GPU decides).

The worker's GPU comes from ``ctx.extras["worker_gpu"]``: ``{"name", "memory_gb"}`` for a known GPU,
``None`` for a known CPU-only worker, or a callable returning one of those (a probe run only when a job is
checked); without the key the GPU is unknown — no fit verdict, QLoRA is not
refused, and the time is estimated for the reference H200 (DESIGN §9).

The checked job (rendered rows + preflight) is remembered for the last data set, so the run after "yes"
neither reads the file nor renders it again unless the file, the model or the spec changed.

``RUN`` is ``home/jobs/<user>/ft-N``. The store hands out N only when the record is created, and a record
is claimable at once, so the run is written first — in a staging folder, renamed to the number the store
will most likely give next (the newest job's + 1) — and the record created after: a worker never sees a
half-written run. Should another process take that number meanwhile, the record's id wins and
``spec.json`` is rewritten with it (the folder keeps the predicted name; the record's ``run_dir`` is right).
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import tempfile
import threading
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from tools.base import ToolContext, ToolError, safe_segment
from tools.finetune.data import TOKENIZER_FILES, PreparedData, load_tokenizer
from tools.finetune.preflight import parallel_speedup, preflight, tokens_per_second, user_gpu_advice
from tools.finetune.rundir import RunPaths
from tools.finetune.sample import memo_key, prepare_data, spec_fields, trial_warning
from tools.finetune.sources import ResolvedModel, resolve_model
from tools.finetune.spec import FinetuneSpec
from tools.finetune.status import open_jobs
from tools.paths import resolve_user_path

REFERENCE_GPU = {"name": "H200", "memory_gb": 141}
MEMO_MAX_ROWS = 200_000          # bigger data sets are rendered again after "yes" rather than kept in memory
NEXT = "the worker runs it: `stackwise worker`"
log = logging.getLogger(__name__)


@dataclass
class CheckedJob:
    """Everything the preflight learned; the run reuses it."""

    spec: FinetuneSpec
    data_path: Path
    model: ResolvedModel
    data: PreparedData
    report: dict


# ---- base model (found by tools/finetune/sources.py) ------------------------------------------------

def _read_config(folder: Path, shown: str) -> dict:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ToolError("bad_model", f"I can't read config.json of {shown!r}: {e}") from None
    if not isinstance(config, dict):
        raise ToolError("bad_model", f"config.json of {shown!r} is not a JSON object.")
    return config


@lru_cache(maxsize=4)
def _tokenizer(folder: str, stamp: tuple):
    return load_tokenizer(folder)


def _stamp(path: Path) -> tuple:
    st = path.stat()
    return str(path), st.st_mtime_ns, st.st_size, st.st_ino


# ---- the check ----------------------------------------------------------------------------------------

_memo: dict[tuple, CheckedJob] = {}
_memo_lock = threading.Lock()
_queue_lock = threading.Lock()     # launches in one process (bot threads) take job numbers one at a time


def check_job(spec: FinetuneSpec, ctx: ToolContext) -> CheckedJob:
    """Resolve the data set and the model, render the rows, run the preflight; queue nothing."""
    data_path = resolve_user_path(spec.dataset, ctx)
    if data_path.is_dir():
        raise ToolError("bad_data", f"{spec.dataset!r} is a folder, not a data file.")
    model = resolve_model(spec.base_model, ctx)
    gpu_known, gpu = "worker_gpu" in ctx.extras, ctx.extras.get("worker_gpu")
    if callable(gpu):
        gpu = gpu()
    config_path = model.path / "config.json"
    key = (_stamp(data_path), _stamp(config_path), spec.model_dump_json(), gpu_known, json.dumps(gpu),
           memo_key(spec, ctx.lang))
    with _memo_lock:
        if key in _memo:
            return _with_user_gpu(_memo[key], ctx)
    tokenizer_file = next(model.path / f for f in TOKENIZER_FILES if (model.path / f).is_file())
    tokenizer = _tokenizer(str(model.path), _stamp(tokenizer_file))
    if tokenizer is None:
        raise ToolError("bad_model", f"I can't load a tokenizer from {model.ref!r}.")
    try:
        spec, data, trial = prepare_data(spec, data_path, tokenizer)    # a trial (sample_rows) draws its sample
    except OSError as e:     # permissions, a file removed meanwhile, an I/O error
        raise ToolError("bad_data", f"I can't read {data_path.name}: {e.strerror or e}.") from None
    config = _read_config(model.path, model.ref)
    try:
        report = preflight(spec, data, tokenizer, config, gpu)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:   # a config.json of an unusual shape
        report = preflight(spec, data, tokenizer, None, gpu)
        report["warnings"].append({"level": "warning", "code": "no_estimate", "message": (
            f"I can't read the model's size from its config.json ({type(e).__name__}: {e}), so there is no "
            "parameter, VRAM or time estimate.")})
    if not gpu_known:
        _assume_unknown_gpu(report, spec)
    report["warnings"] += [{"level": "info", "code": "no_chat_template", "message": n} for n in data.notices]
    if trial is not None:      # what a trial sampled, how, and its schedule
        report["trial"] = trial
        report["warnings"].append(trial_warning(trial, spec, ctx.lang))
    report["model"] = {"requested": spec.base_model, "resolved": model.ref, "source": model.source,
                       "path": str(model.path)}
    report["dataset_path"] = str(data_path)
    report["gpu_known"] = gpu_known
    checked = CheckedJob(spec, data_path, model, data, report)
    if report["rows"]["total"] <= MEMO_MAX_ROWS:
        with _memo_lock:
            _memo.clear()
            _memo[key] = checked
    return _with_user_gpu(checked, ctx)


def _with_user_gpu(checked: CheckedJob, ctx: ToolContext) -> CheckedJob:
    """The check plus advice for the GPU the user told us about (``ctx.extras["user_gpu"]``: a GPU description or a
    callable returning one); the memoised check is left as it was."""
    user_gpu = ctx.extras.get("user_gpu")
    if callable(user_gpu):
        try:
            user_gpu = user_gpu()
        except Exception as exc:    # the user memory is advice: a broken store must not stop a launch
            log.warning("could not read the user's GPU from memory: %s", exc)
            user_gpu = None
    if not user_gpu:
        return checked
    try:
        config = _read_config(checked.model.path, checked.model.ref)
    except ToolError:
        config = None
    advice = user_gpu_advice(checked.spec, config, checked.report, user_gpu, ctx.lang)
    report = {**checked.report, "user_gpu": user_gpu,
              "warnings": [*checked.report["warnings"], *([advice] if advice else [])]}
    return replace(checked, report=report)


def _assume_unknown_gpu(report: dict, spec: FinetuneSpec) -> None:
    """No GPU description: drop the CPU-only verdicts and estimate the time on the reference GPU."""
    kept = []
    for w in report["warnings"]:
        if w["code"] == "slow_on_cpu":
            continue
        if w["code"] == "not_enough_gpus":
            w = {**w, "level": "warning", "message": f"The job asks for gpus={spec.gpus}; the worker's GPUs are "
                                                     "unknown here, so the worker checks it when it starts the job."}
        if w["code"] == "qlora_needs_gpu":
            w = {**w, "level": "warning", "message": "QLoRA needs a CUDA GPU on the worker (bitsandbytes 4-bit "
                                                     "kernels); it fails on a CPU-only worker."}
        kept.append(w)
    report["warnings"] = kept
    if report.get("params") and report.get("time"):
        tps = tokens_per_second(report["params"]["total"], spec.method, REFERENCE_GPU, checkpointing=False)
        tps *= parallel_speedup(report["training"].get("gpus", 1))
        report["time"] = {"tokens_per_s": round(tps), "seconds": round(report["training"]["total_tokens"] / tps),
                          "gpu_kind": "H200", "assumed_gpu": True,
                          "basis": "the worker's GPU is unknown; DESIGN §9 H200 LoRA baseline"}
    report["ok"] = not any(w["level"] == "error" for w in report["warnings"])


def raise_on_errors(report: dict) -> None:
    """An error-level warning (``no_fit``, ``qlora_needs_gpu``) stops the launch: nothing is queued."""
    for w in report["warnings"]:
        if w["level"] == "error":
            raise ToolError(w["code"], w["message"])


# ---- queueing ------------------------------------------------------------------------------------------

def queue_job(spec: FinetuneSpec, ctx: ToolContext) -> dict:
    """Check the job, prepare ``RUN`` (spec.json + data/) and queue it; ``ToolError`` and nothing queued otherwise.

    The run directory is filled in a staging folder and renamed into place before the job record exists,
    so a worker never sees a half-written run.
    """
    checked = check_job(spec, ctx)
    raise_on_errors(checked.report)
    owner_dir = ctx.home / "jobs" / safe_segment(ctx.user_id)
    owner_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=owner_dir))
    run_dir = None
    try:
        _write_rows(checked.data.train, RunPaths(staging).train_data)
        _write_rows(checked.data.eval, RunPaths(staging).eval_data)
        run_spec = spec.model_dump() | {"base_model_path": str(checked.model.path),
                                        "base_model_source": checked.model.record(),
                                        "gradient_checkpointing": bool(checked.report["gradient_checkpointing"])}
        every = (checked.report.get("vram") or {}).get("checkpoint_every")
        if checked.report["gradient_checkpointing"] and every:   # only every n-th layer: what the memory needs
            run_spec["checkpoint_every"] = every
        if checked.report.get("recompute_mlp"):   # the MLPs compute their down projection's input again
            run_spec["speed"] = {"recompute_mlp": True}
        if checked.report.get("fsdp"):       # a full fine-tune too big for one GPU: shard it over the job's GPUs
            run_spec["fsdp"] = True
        run_spec |= checked.spec.model_dump() | spec_fields(checked.report.get("trial"))   # a trial's sample, schedule
        with open_jobs(ctx) as jobs, _queue_lock:
            job_id, run_dir = _place(jobs, staging, owner_dir, run_spec)
            job = jobs.create(ctx.user_id, run_spec | {"job_id": job_id}, checked.report, run_dir,
                              origin=ctx.extras.get("origin"))
    except BaseException:
        if run_dir is not None:     # placed, but no job record: leave nothing behind
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if job.id != job_id:            # another launch took the number meanwhile: the record wins
        _write_spec(run_dir, run_spec | {"job_id": job.id})
    return {"job_id": job.id, "status": job.status, "preflight": copy.deepcopy(checked.report), "run_dir": str(run_dir),
            "base_model_path": str(checked.model.path), "train_rows": len(checked.data.train),
            "eval_rows": len(checked.data.eval), "method": spec.method, "next": NEXT}


def _place(jobs: Any, staging: Path, owner_dir: Path, run_spec: dict) -> tuple[str, Path]:
    """Move the staged run to ``owner_dir/ft-N`` for the number the store will most likely hand out next."""
    newest = jobs.list(None, limit=1)
    number = (newest[0].number if newest else 0) + 1
    while (owner_dir / f"ft-{number}").exists():    # a deleted job's run dir stays; never reuse it
        number += 1
    job_id, run_dir = f"ft-{number}", owner_dir / f"ft-{number}"
    _write_spec(staging, run_spec | {"job_id": job_id})
    staging.rename(run_dir)
    return job_id, run_dir


def _write_spec(run_dir: Path, spec: dict) -> None:
    tmp = RunPaths(run_dir).spec.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(spec, ensure_ascii=False, indent=2), encoding="utf-8")
    tmp.replace(RunPaths(run_dir).spec)


def _write_rows(rows: list[dict], target: Path) -> None:
    """The contract's prepared JSONL (same layout as ``prepare_dataset`` writes)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
