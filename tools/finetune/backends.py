"""Where a fine-tune run executes: a subprocess on this machine, or a job on a Ray cluster.

The worker (:mod:`tools.finetune.worker`) claims a job and hands it to a :class:`Backend`:

- ``start(job)`` launches ``python -m tools.finetune.train RUN [--resume]`` and returns a :class:`RunHandle`;
- ``poll(handle)`` is ``None`` while the run goes on, else its exit code (0 succeeded, 1 failed, 3 cancelled —
  the training entry's codes; a negative code is the signal that killed it);
- ``stop(handle, grace_s)`` asks the run to end (SIGTERM: the trainer saves a checkpoint, then exits 3) and
  returns at once; ``poll`` kills it if it is still alive ``grace_s`` seconds later;
- ``logs(job, tail)`` is the end of the run's log text.

Settings (``STACKWISE_JOB_BACKEND``, ``STACKWISE_RAY_ADDRESS``) arrive as constructor arguments through
:func:`make_backend`; nothing here reads the environment.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from memory.jobs_model import Job
from tools.finetune.rundir import RunPaths

log = logging.getLogger("stackwise.worker")

EXIT_OK, EXIT_FAILED, EXIT_CANCELLED = 0, 1, 3  # the training entry's exit codes
BACKENDS = ("local", "ray")
RAY_MISSING = "STACKWISE_JOB_BACKEND=ray needs the ray package (pip install 'ray[default]')"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_PR_SET_PDEATHSIG = 1


class BackendError(Exception):
    """A run could not be started or reached; the message says why, for the job's error."""


@dataclass
class RunHandle:
    """One started run. ``pid`` is the training process on this host (local backend), ``ref`` the backend's
    own id for it (a Ray submission id); both go into the job's heartbeat."""

    job_id: str
    run_dir: Path
    pid: int | None = None
    ref: str | None = None
    process: subprocess.Popen | None = field(default=None, repr=False)
    stop_sent: bool = False
    kill_at: float | None = None  # time.monotonic() after which poll() kills a run that was asked to stop


class Backend(Protocol):
    """Runs the training entry for a claimed job."""

    name: str

    def start(self, job: Job) -> RunHandle: ...

    def poll(self, handle: RunHandle) -> int | None: ...

    def stop(self, handle: RunHandle, grace_s: float) -> None: ...

    def logs(self, job: Job, tail: int = 50) -> str: ...


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The highest-numbered ``RUN/checkpoints/checkpoint-N`` directory, or ``None``."""
    folder = RunPaths(Path(run_dir)).checkpoints
    if not folder.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return max(found)[1] if found else None


def tail_lines(path: Path, n: int, *, max_bytes: int = 256_000) -> list[str]:
    """The last ``n`` lines of a text file (reading at most its last ``max_bytes``); ``[]`` when missing."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except FileNotFoundError:
        return []
    lines = data.decode("utf-8", errors="replace").splitlines()
    if size > max_bytes and lines:
        lines = lines[1:]  # the first line read is probably cut
    return lines[-n:] if n > 0 else []


def train_command(python: str, job: Job) -> list[str]:
    """``python -m tools.finetune.train RUN`` plus ``--resume`` for a resumed job or a run dir with a checkpoint."""
    command = [python, "-m", "tools.finetune.train", str(job.run_dir)]
    if job.attempts > 1 or latest_checkpoint(job.run_dir) is not None:
        command.append("--resume")
    return command


def run_logs(run_dir: str | Path, tail: int) -> str:
    """The end of ``train.log`` (everything the trainer logged) and ``worker.log`` (its stdout/stderr), each
    under a ``==> name <==`` header as ``tail`` prints several files; ``""`` when neither exists yet."""
    parts = []
    paths = RunPaths(Path(run_dir))
    for path in (paths.log, paths.worker_log):
        lines = tail_lines(path, tail)
        if lines:
            parts.append(f"==> {path.name} <==\n" + "\n".join(lines))
    return "\n\n".join(parts)


class LocalBackend:
    """Runs the trainer as a subprocess of this worker, in its own process group, output appended to
    ``RUN/worker.log``. On Linux the trainer gets SIGTERM when the worker dies (even by kill -9), so it
    saves a checkpoint instead of training on as an orphan."""

    name = "local"

    def __init__(self, *, python: str = sys.executable, env: Mapping[str, str] | None = None,
                 threads: int | None = None):
        """``env``: variables added to the inherited environment; ``threads``: OMP/MKL threads of the trainer
        (default: whatever the worker's environment says)."""
        self.python = python
        self.env = dict(env or {})
        if threads is not None:
            for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
                self.env[var] = str(int(threads))
        self._die_with_parent = _parent_death_signal()

    def command(self, job: Job) -> list[str]:
        """The command line that trains ``job``."""
        return train_command(self.python, job)

    def start(self, job: Job) -> RunHandle:
        run_dir = Path(job.run_dir)
        if not RunPaths(run_dir).spec.is_file():
            raise BackendError(f"the run directory {run_dir} has no spec.json")
        command = self.command(job)
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        try:
            with RunPaths(run_dir).worker_log.open("ab") as out:
                out.write(f"--- {stamp} {job.id} attempt {job.attempts}: {shlex.join(command)}\n".encode())
                out.flush()
                process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                           cwd=run_dir, env=env, start_new_session=True,
                                           preexec_fn=self._die_with_parent)
        except OSError as exc:
            raise BackendError(f"cannot start the trainer: {exc}") from exc
        log.info("%s: started trainer process %d (%s)", job.id, process.pid, shlex.join(command[1:]))
        return RunHandle(job.id, run_dir, pid=process.pid, process=process)

    def poll(self, handle: RunHandle) -> int | None:
        assert handle.process is not None, "a local run has a process"
        code = handle.process.poll()
        if code is None and handle.kill_at is not None and time.monotonic() >= handle.kill_at:
            log.warning("%s: trainer %d did not stop in time; killing it", handle.job_id, handle.pid)
            self._kill(handle)
        return code

    def stop(self, handle: RunHandle, grace_s: float) -> None:
        assert handle.process is not None, "a local run has a process"
        if handle.process.poll() is not None:
            return
        deadline = time.monotonic() + max(0.0, grace_s)
        if not handle.stop_sent:
            # Only the trainer itself: it stops its own helpers; a second SIGTERM would kill it before it saves.
            with contextlib.suppress(ProcessLookupError):
                handle.process.send_signal(signal.SIGTERM)
            handle.stop_sent = True
        handle.kill_at = deadline if handle.kill_at is None else min(handle.kill_at, deadline)
        if grace_s <= 0:
            self._kill(handle)

    def logs(self, job: Job, tail: int = 50) -> str:
        return run_logs(job.run_dir, tail)

    def _kill(self, handle: RunHandle) -> None:
        handle.kill_at = None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(handle.process.pid, signal.SIGKILL)  # the whole group: data loader workers too


def _parent_death_signal() -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to SIGTERM the child when this process dies; ``None`` elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None

    def set_pdeathsig() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)

    return set_pdeathsig


class RayBackend:
    """Submits the trainer as a Ray job (``ray.job_submission.JobSubmissionClient``) to a cluster whose
    workers see the same run directories (a shared filesystem) and have stackwise installed.

    The submission id is ``stackwise-<job id>-<attempt>``: submitting an attempt twice attaches to the first
    submission, and a resumed job gets a new one (after any earlier attempt still alive is stopped)."""

    name = "ray"

    def __init__(self, address: str | None = None, *, num_gpus: float = 1, python: str = "python",
                 env: Mapping[str, str] | None = None, stop_grace_s: float = 120, client: Any = None):
        """``address``: the Ray dashboard (``http://head:8265``); ``None`` lets Ray find it (``RAY_ADDRESS``).
        ``stop_grace_s`` is how long Ray waits after SIGTERM before SIGKILL (set when the job is submitted).
        ``client``: a ready ``JobSubmissionClient`` (or a stand-in with its methods)."""
        if client is None and importlib.util.find_spec("ray") is None:
            raise BackendError(RAY_MISSING)
        self.address = address
        self.num_gpus = num_gpus
        self.python = python
        self.env = {"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
        self.stop_grace_s = stop_grace_s
        self._client = client

    @staticmethod
    def submission_id(job: Job) -> str:
        return f"stackwise-{job.id}-{max(job.attempts, 1)}"

    def client(self) -> Any:
        """The ``JobSubmissionClient``, connected on first use."""
        if self._client is None:
            try:
                from ray.job_submission import JobSubmissionClient
            except ImportError as exc:
                raise BackendError(RAY_MISSING) from exc
            try:
                self._client = JobSubmissionClient(self.address)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise BackendError(f"cannot reach the Ray cluster at {self.address or 'RAY_ADDRESS'}: {exc}") from exc
        return self._client

    def start(self, job: Job) -> RunHandle:
        client = self.client()
        self._stop_earlier_attempts(job)
        sid = self.submission_id(job)
        env = {**self.env, "RAY_JOB_STOP_WAIT_TIME_S": str(int(self.stop_grace_s))}
        try:
            client.submit_job(entrypoint=shlex.join(train_command(self.python, job)), submission_id=sid,
                              entrypoint_num_gpus=self.num_gpus, runtime_env={"env_vars": env},
                              metadata={"stackwise_job": job.id, "owner": job.owner})
            log.info("%s: submitted to Ray as %s", job.id, sid)
        except (RuntimeError, ValueError) as exc:
            if "already exists" not in str(exc):
                raise BackendError(f"Ray refused the job: {exc}") from exc
            log.info("%s: Ray already has %s; attaching to it", job.id, sid)
        return RunHandle(job.id, Path(job.run_dir), ref=sid)

    def poll(self, handle: RunHandle) -> int | None:
        client = self.client()
        status = _status_name(client.get_job_status(handle.ref))
        if status in ("PENDING", "RUNNING"):
            if handle.kill_at is not None and time.monotonic() >= handle.kill_at:
                handle.kill_at = None
                client.stop_job(handle.ref)  # Ray sends SIGKILL itself after RAY_JOB_STOP_WAIT_TIME_S
            return None
        if status == "SUCCEEDED":
            return EXIT_OK
        if status == "STOPPED":
            return EXIT_CANCELLED
        code = getattr(client.get_job_info(handle.ref), "driver_exit_code", None)
        return code if isinstance(code, int) else EXIT_FAILED

    def stop(self, handle: RunHandle, grace_s: float) -> None:
        if not handle.stop_sent:
            self.client().stop_job(handle.ref)
            handle.stop_sent = True
        deadline = time.monotonic() + max(0.0, grace_s)
        handle.kill_at = deadline if handle.kill_at is None else min(handle.kill_at, deadline)

    def logs(self, job: Job, tail: int = 50) -> str:
        sid = job.backend_ref or self.submission_id(job)
        try:
            text = self.client().get_job_logs(sid)
        except RuntimeError as exc:
            raise BackendError(f"Ray has no logs for {sid}: {exc}") from exc
        return "\n".join(text.splitlines()[-tail:]) if tail > 0 else ""

    def _stop_earlier_attempts(self, job: Job, wait_s: float = 60) -> None:
        """A resumed job must not train next to an earlier attempt that a lost worker left running."""
        client = self.client()
        for attempt in range(1, job.attempts):
            sid = f"stackwise-{job.id}-{attempt}"
            try:
                if _status_name(client.get_job_status(sid)) not in ("PENDING", "RUNNING"):
                    continue
                client.stop_job(sid)
            except RuntimeError:
                continue  # never submitted
            deadline = time.monotonic() + wait_s
            while _status_name(client.get_job_status(sid)) in ("PENDING", "RUNNING") and time.monotonic() < deadline:
                time.sleep(1)


def _status_name(status: Any) -> str:
    """``JobStatus.RUNNING`` (a str enum) or a plain string → ``"RUNNING"``."""
    return str(getattr(status, "value", status)).upper()


def make_backend(name: str = "local", *, ray_address: str | None = None, threads: int | None = None,
                 stop_grace_s: float = 120) -> LocalBackend | RayBackend:
    """The backend called ``name`` (``STACKWISE_JOB_BACKEND``): ``local`` or ``ray`` (at ``ray_address``)."""
    name = (name or "local").strip().lower()
    if name == "local":
        return LocalBackend(threads=threads)
    if name == "ray":
        return RayBackend(ray_address, stop_grace_s=stop_grace_s)
    raise BackendError(f"STACKWISE_JOB_BACKEND must be one of {', '.join(BACKENDS)}, not {name!r}")
