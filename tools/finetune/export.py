"""Serving a finished fine-tune: merge the adapter, export a folder vLLM serves as is (``RUN/export/vllm``) and a
GGUF file for Ollama / llama.cpp (``RUN/export/gguf/<job>.gguf`` + ``Modelfile``), and say how to serve them.

The job is the caller's own (an other user's reads as missing, as in ``finetune_status``) and must have
succeeded. A merge loads the whole base model, so it runs in a subprocess (:mod:`tools.finetune.export_merge`)
with a time limit; the GGUF converter is another. Everything is written in a hidden folder first and renamed
into place at the end, so a server never sees half an export; one export per run at a time (``RUN/export/.lock``);
an export that is up to date is reused unless ``force``. The free disk space is checked first.

``ctx.extras``: ``jobs`` / ``database_url`` (the job store, see :mod:`tools.finetune.status`), ``llama_cpp``
(the ``STACKWISE_LLAMA_CPP`` setting), ``export_timeout_s`` (per step; default two hours).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from memory.jobs import Job, pid_alive
from tools.base import ToolContext, ToolError
from tools.finetune.export_build import ensure_gguf, ensure_vllm, up_to_date
from tools.finetune.export_gguf import find_converter, missing_message
from tools.finetune.export_plan import ExportSource, export_bytes, gguf_bytes, plan_source, read_config, weights_bytes
from tools.finetune.export_serve import ExportPaths, serve_commands
from tools.finetune.status import find_job, open_jobs

FORMATS = ("vllm", "gguf", "all")
TIMEOUT_S = 2 * 3600
MARGIN = 256 * 2**20          # spare bytes a disk must keep beyond the estimate


# ---- the job ---------------------------------------------------------------------------------------------

def succeeded_job(job_id: str | None, ctx: ToolContext) -> Job:
    """``ctx.user_id``'s job ``job_id`` (or their latest succeeded one) — which must have succeeded."""
    with open_jobs(ctx) as jobs:
        if job_id:
            job = find_job(jobs, job_id, ctx.user_id)
        else:
            done = jobs.list(ctx.user_id, "succeeded", limit=1)
            if not done:
                raise ToolError("not_found", "You have no finished (succeeded) fine-tune job to export yet.")
            job = done[0]
    if job.status != "succeeded":
        hint = {"queued": "it has not started", "running": "it is still training",
                "cancelling": "it is being cancelled"}.get(job.status, f"`stackwise jobs resume {job.id}` continues it")
        raise ToolError("invalid_state", f"{job.id} is {job.status}; only a job that succeeded can be merged, exported "
                                         f"or served ({hint}).")
    return job


def _source(job: Job, merge_base: str | None, ctx: ToolContext) -> ExportSource:
    base = None
    if merge_base:
        from tools.finetune.launch import resolve_model

        base = resolve_model(merge_base, ctx).path
    return plan_source(job.id, Path(job.run_dir), base)


# ---- safety: one export at a time, enough disk -------------------------------------------------------------

@contextmanager
def export_lock(paths: ExportPaths) -> Iterator[None]:
    """Hold ``RUN/export/.lock`` (a lock left by a dead process is taken over)."""
    paths.root.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(paths.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = int(paths.lock.read_text().strip() or 0)
            except (OSError, ValueError):
                holder = 0
            if holder and pid_alive(holder):
                raise ToolError("busy", f"{paths.job_id} is being exported right now (process {holder}); try again "
                                        "when it is done.") from None
            paths.lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(str(os.getpid()))
        break
    else:
        raise ToolError("busy", f"{paths.job_id} is being exported right now; try again when it is done.")
    try:
        yield
    finally:
        paths.lock.unlink(missing_ok=True)


def check_disk(folder: Path, needed: int) -> dict[str, float]:
    """``ToolError('disk_full')`` unless ``folder``'s disk has ``needed`` bytes (plus a margin) free."""
    free = shutil.disk_usage(folder).free
    gb = {"needed_gb": round(needed / 2**30, 2), "free_gb": round(free / 2**30, 2)}
    if needed and free < needed + MARGIN:
        raise ToolError("disk_full", f"The export needs about {gb['needed_gb']} GB in {folder}, but only "
                                     f"{gb['free_gb']} GB are free. Free some space (old checkpoints in the run's "
                                     "checkpoints/ folder can go) and try again.")
    return gb


def _needed_bytes(source: ExportSource, paths: ExportPaths, *, vllm: bool, gguf_type: str | None) -> int:
    same_disk = os.stat(source.weights).st_dev == os.stat(paths.root.parent).st_dev
    folder = export_bytes(source, same_disk) if vllm else 0
    if gguf_type is None:
        return folder
    model_bytes = weights_bytes(paths.vllm) if not vllm else (export_bytes(source, False) if source.kind == "merge"
                                                              else weights_bytes(source.weights))
    return folder + gguf_bytes(model_bytes, source.dtype, gguf_type)


# ---- the tool's work ---------------------------------------------------------------------------------------

def export_check(job_id: str | None, fmt: str, ctx: ToolContext, *, merge_base: str | None = None,
                 gguf_type: str = "f16", force: bool = False) -> dict[str, Any]:
    """Everything an export decides before it writes: the job, the source, the converter, the disk."""
    if fmt not in FORMATS:
        raise ToolError("invalid_args", f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    job = succeeded_job(job_id, ctx)
    source = _source(job, merge_base, ctx)
    paths = ExportPaths.of(Path(job.run_dir), job.id)
    converter = find_converter(ctx.extras.get("llama_cpp")) if fmt != "vllm" else None
    if fmt == "gguf" and converter is None:
        raise ToolError("converter_missing", missing_message(job.id, paths.vllm if paths.vllm_ready() else None,
                                                             ctx.lang))
    fresh = force or not (paths.vllm_ready() and up_to_date(paths.vllm / "serve.json", source.stamp()))
    disk = check_disk(paths.root.parent, _needed_bytes(source, paths, vllm=fresh,
                                                       gguf_type=gguf_type if converter is not None else None))
    return {"job": job, "source": source, "paths": paths, "converter": converter, "fresh": fresh, "disk": disk,
            "format": fmt}


def export_job(job_id: str | None, fmt: str, ctx: ToolContext, *, merge_base: str | None = None,
               gguf_type: str = "f16", force: bool = False) -> dict[str, Any]:
    """``export_finetune``'s result: the vLLM folder (always: GGUF is converted from it), the GGUF file when asked
    for and possible, the serving commands."""
    check = export_check(job_id, fmt, ctx, merge_base=merge_base, gguf_type=gguf_type, force=force)
    job, source, paths, converter = check["job"], check["source"], check["paths"], check["converter"]
    timeout_s = float(ctx.extras.get("export_timeout_s") or TIMEOUT_S)
    with export_lock(paths):
        vllm = ensure_vllm(source, paths, force=force, timeout_s=timeout_s)
        gguf: dict[str, Any] | None = None
        if fmt != "vllm" and converter is None:
            gguf = {"skipped": missing_message(job.id, paths.vllm, ctx.lang)}
        elif fmt != "vllm":
            gguf = ensure_gguf(source, paths, converter, gguf_type=gguf_type, force=force or not vllm["reused"],
                               timeout_s=timeout_s)
    return {"job_id": job.id, "format": fmt, "method": source.method, "vllm": vllm, "gguf": gguf,
            "disk": check["disk"], "serve": _serve(job, source)}


def _serve(job: Job, source: ExportSource | None) -> dict[str, Any]:
    run = Path(job.run_dir)
    paths = ExportPaths.of(run, job.id)
    model_type = (read_config(paths.vllm) or read_config(source.base if source else run)).get("model_type")
    return serve_commands(job.id, run, method=(job.spec or {}).get("method") or "lora",
                          base=source.base if source else None, adapter=source.adapter if source else None,
                          lora_rank=source.lora_rank if source else None, model_type=model_type)


def serve_info(job_id: str | None, ctx: ToolContext) -> dict[str, Any]:
    """``finetune_serve_info``'s result: the commands for this job, and which exports exist already."""
    job = succeeded_job(job_id, ctx)
    try:
        source = plan_source(job.id, Path(job.run_dir))
    except ToolError as exc:
        if exc.type in ("no_run", "no_adapter"):
            raise
        source = None            # the base moved: the exported folder (if any) still serves
    return {"job_id": job.id, "status": job.status, "method": (job.spec or {}).get("method") or "lora",
            "base_model": (job.spec or {}).get("base_model"), **_serve(job, source)}
