"""Data-parallel training: how many processes a job gets, how they are launched, and who does what.

A job asks for ``gpus: N`` (spec), or gets every GPU the worker sees. With more than one, the worker starts
the trainer through PyTorch's own launcher (``python -m torch.distributed.run --standalone --nproc-per-node N
-m tools.finetune.train RUN``): N copies of the same entry point, one per GPU, each holding the whole model,
each fed a different slice of every global batch; DDP averages the gradients (the Trainer wraps the model).

Only rank 0 (the "main process") has side effects on the run directory: ``train.log``, ``progress.jsonl``,
the adapter, the comparison, ``summary.json``. Every rank writes its own ``train.rank<R>.log``; a rank that
fails also writes ``failed.rank<R>.json`` so that rank 0 — which the launcher stops with SIGTERM when a peer
dies — reports the peer's error rather than a cancellation. Cancellation (SIGTERM from the worker reaches the
launcher, which forwards it to every rank) is agreed on at each step end (:func:`any_rank`), so every rank
stops after the same step and saves the same checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

MAX_GPUS = 64
# How long the launcher lets the ranks save a checkpoint after a SIGTERM before it kills them (its default, 30 s,
# is short for a full fine-tune's optimizer state). The worker's own stop grace (120 s) still bounds a stop.
SHUTDOWN_TIMEOUT_S = 110


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job (``torchrun``'s variables; one process without them)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def ranks(env: Mapping[str, str] | None = None) -> Ranks:
    """Read ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` (set by the launcher)."""
    env = os.environ if env is None else env

    def number(name: str, default: int) -> int:
        try:
            return int(env.get(name, default))
        except ValueError:
            return default

    world = max(number("WORLD_SIZE", 1), 1)
    return Ranks(rank=number("RANK", 0), local_rank=number("LOCAL_RANK", 0), world_size=world)


def is_main_process() -> bool:
    """True in a single-process run and in rank 0 of a distributed one: the process that writes results."""
    return ranks().main


def any_rank(flag: bool) -> bool:
    """``flag`` OR-ed over every rank (one tiny all-reduce); ``flag`` itself when not distributed."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def finish() -> None:
    """Leave the process group (after training; what follows runs on rank 0 alone, without collectives)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# What a launched trainer must keep alive until it leaves (the Trainer, hence DDP's reducer and its process group).
_KEPT: list = []


def keep_until_exit(obj) -> None:
    """Hold ``obj`` until :func:`leave` ends the process, so that it is never garbage-collected before."""
    _KEPT.append(obj)


def leave(code: int):
    """End a launched trainer process now: flush the logs and streams, then exit without running destructors.

    Freeing DDP's reducer frees its gloo process group, whose destructor joins the group's worker thread while
    holding the GIL; if that thread is still dropping the tensors of its last collective it needs the GIL too,
    and the process hangs for ever after a finished run (seen about one run in twenty on 2 CPU processes; the
    launcher then waits on the hung rank). Everything the run writes is closed by then (summary, checkpoints,
    trackers), so skipping the interpreter's teardown loses nothing."""
    import logging
    import sys

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


# ---- how many GPUs, and the command line ------------------------------------------------------------

def visible_gpus(env: Mapping[str, str] | None = None) -> int:
    """How many GPUs the trainer will see: ``CUDA_VISIBLE_DEVICES`` when set, else ``nvidia-smi -L``; 0 on a
    machine without an NVIDIA driver. Does not import torch (the worker stays light)."""
    env = os.environ if env is None else env
    listed = env.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        ids = [d.strip() for d in listed.split(",") if d.strip()]
        # CUDA stops at the first invalid entry ("-1" is the usual way to hide every GPU)
        count = 0
        for d in ids:
            if d.startswith("-"):
                break
            count += 1
        return count
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def devices_for(processes: int, env: Mapping[str, str] | None = None) -> str | None:
    """``CUDA_VISIBLE_DEVICES`` that shows the trainer only the GPUs it uses: a job on fewer GPUs than the machine
    has must not see the others (a single process that sees several GPUs makes the Trainer use ``DataParallel``,
    which trl refuses). None when it uses them all (or there are none)."""
    env = os.environ if env is None else env
    visible = visible_gpus(env)
    if not 0 < processes < visible:
        return None
    listed = env.get("CUDA_VISIBLE_DEVICES")
    ids = [d.strip() for d in listed.split(",")] if listed is not None else [str(i) for i in range(visible)]
    return ",".join(ids[:processes])


def processes_for(requested: int | None, visible: int) -> int:
    """The number of training processes: the GPUs asked for (``ValueError`` when the worker has fewer), or every
    visible GPU, or one process on a machine without GPUs."""
    if requested is not None:
        if requested > max(visible, 0):
            have = f"only {visible}" if visible else "none"
            raise ValueError(f"the job asks for {requested} GPU{'s' if requested > 1 else ''}; this worker has {have}")
        return requested
    return max(visible, 1)


def requested_gpus(run_dir: str | Path) -> int | None:
    """The ``gpus`` field of ``RUN/spec.json`` (None when absent or unreadable: the trainer reports a bad spec)."""
    try:
        value = json.loads((Path(run_dir) / "spec.json").read_text(encoding="utf-8")).get("gpus")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_GPUS else None


def train_argv(python: str, run_dir: str | Path, *, processes: int, resume: bool) -> list[str]:
    """The trainer's command line: the entry point itself for one process, PyTorch's launcher for several."""
    tail = ["-m", "tools.finetune.train", str(run_dir), *(["--resume"] if resume else [])]
    if processes <= 1:
        return [python, *tail]
    return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", *tail]


def launcher_env(processes: int) -> dict[str, str]:
    """Variables the launcher needs for a clean stop (nothing for one process)."""
    if processes <= 1:
        return {}
    return {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(SHUTDOWN_TIMEOUT_S), "OMP_NUM_THREADS": os.environ.get(
        "OMP_NUM_THREADS", "1")}


# ---- a failing peer --------------------------------------------------------------------------------

def failure_path(run_dir: Path, rank: int) -> Path:
    return run_dir / f"failed.rank{rank}.json"


def record_failure(run_dir: Path, rank: int, message: str) -> None:
    """A non-main rank's error, for rank 0 and the worker to report."""
    try:
        failure_path(run_dir, rank).write_text(json.dumps({"rank": rank, "error": message}), encoding="utf-8")
    except OSError:
        pass


def peer_failure(run_dir: Path) -> str | None:
    """The first recorded error of another rank, as one line (``rank 1: …``), or None."""
    for path in sorted(run_dir.glob("failed.rank*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return f"rank {int(data['rank'])}: {str(data['error'])[:500]}"
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def clear_failures(run_dir: Path) -> None:
    for path in run_dir.glob("failed.rank*.json"):
        path.unlink(missing_ok=True)
