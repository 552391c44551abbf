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
import functools
import hashlib
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
from tools.finetune.distributed import (
    clear_failures,
    devices_for,
    launcher_env,
    processes_for,
    requested_gpus,
    train_argv,
    visible_gpus,
)
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


def train_command(python: str, job: Job, processes: int = 1) -> list[str]:
    """``python -m tools.finetune.train RUN`` plus ``--resume`` for a resumed job or a run dir with a checkpoint;
    through PyTorch's launcher (``torch.distributed.run``) for ``processes`` > 1 (data-parallel on as many GPUs)."""
    resume = job.attempts > 1 or latest_checkpoint(job.run_dir) is not None
    return train_argv(python, job.run_dir, processes=processes, resume=resume)


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


def project_pythonpath(env: Mapping[str, str] | None = None) -> str:
    """``PYTHONPATH`` for a local trainer process: the folder this code runs from first, so
    ``-m tools.finetune.train`` is found when stackwise runs from a checkout rather than an installed package
    (the trainer's working directory is its run directory), then whatever ``PYTHONPATH`` held already."""
    root = str(Path(__file__).resolve().parents[2])
    before = (env or {}).get("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    return os.pathsep.join([root, *(p for p in before.split(os.pathsep) if p and p != root)])


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
        self._visible: int | None = None     # GPUs the trainer sees; counted once (nvidia-smi), not per start

    def processes(self, job: Job) -> int:
        """Training processes for ``job``: its ``gpus``, or every GPU this machine shows the trainer (one process
        without GPUs); ``BackendError`` when it asks for more GPUs than there are."""
        try:
            if self._visible is None:
                self._visible = visible_gpus({**os.environ, **self.env})
            return processes_for(requested_gpus(job.run_dir), self._visible)
        except ValueError as exc:
            raise BackendError(str(exc)) from None

    def command(self, job: Job) -> list[str]:
        """The command line that trains ``job``."""
        return train_command(self.python, job, self.processes(job))

    def start(self, job: Job) -> RunHandle:
        run_dir = Path(job.run_dir)
        if not RunPaths(run_dir).spec.is_file():
            raise BackendError(f"the run directory {run_dir} has no spec.json")
        processes = self.processes(job)
        command = self.command(job)
        clear_failures(run_dir)
        env = {**os.environ, **launcher_env(processes), **self.env, "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": project_pythonpath(self.env)}
        if (devices := devices_for(processes, env)) is not None:
            env["CUDA_VISIBLE_DEVICES"] = devices
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
    """Submits the trainer as a Ray job (``ray.job_submission.JobSubmissionClient``) to a cluster whose nodes
    see the same run directories (a shared filesystem) and can import stackwise (installed there, or
    ``project_dir`` on their ``PYTHONPATH``).

    - **submit**: the entry point is ``cd RUN && exec PYTHON -m tools.finetune.train RUN [--resume]`` (the
      same command and working directory as the local backend; ``exec`` so that Ray's SIGTERM reaches the
      trainer itself), with ``entrypoint_num_gpus`` and a runtime env of environment variables only — nothing
      is uploaded. The submission id is :meth:`submission_id`, fixed per job *attempt*: starting an attempt
      that Ray already has attaches to that submission instead of starting a second run, and a resumed job
      (the next attempt) gets a new one, after any earlier attempt still alive has been stopped.
    - **status**: Ray's ``PENDING``/``RUNNING`` is "still running"; ``SUCCEEDED`` is 0, ``STOPPED`` 3
      (cancelled), ``FAILED`` the trainer's exit code (1 when it never ran). The worker decides the job's
      outcome from ``RUN/summary.json`` first, as for a local run.
    - **stop**: Ray sends SIGTERM (the trainer saves a checkpoint and exits), then SIGKILL once
      ``stop_grace_s`` have passed — a setting of the submission, so a shorter ``grace_s`` given to
      :meth:`stop` (even 0, "now") cannot shorten it. A stop Ray could not deliver yet (the job still
      pending, the head unreachable for a moment) is sent again by the next :meth:`poll`.
    - **logs**: Ray's log of the job (the trainer's stdout and stderr). When a run ends, that log is also
      appended to ``RUN/worker.log`` (as the local backend writes it), so the run directory keeps it and a
      run that failed without a summary fails with the end of it.

    Every request to the Ray dashboard gives up after ``timeout_s``; failures are :class:`BackendError`.
    """

    name = "ray"
    ENDED = frozenset({"SUCCEEDED", "STOPPED", "FAILED"})
    COPIED_LOG_LINES = 2000

    def __init__(self, address: str | None = None, *, num_gpus: float = 1, num_cpus: float | None = None,
                 python: str = "python", project_dir: str | Path | None = None, home: str | Path | None = None,
                 threads: int | None = None, env: Mapping[str, str] | None = None, stop_grace_s: float = 120,
                 timeout_s: float = 30, client: Any = None):
        """``address``: the Ray dashboard (``http://head:8265``); ``None`` lets Ray find it (``RAY_ADDRESS``).

        ``num_gpus`` is the ``entrypoint_num_gpus`` of every submission: the GPUs Ray reserves for the trainer
        (and shows it in ``CUDA_VISIBLE_DEVICES``). 1 suits a real cluster; it must be 0 on a cluster without
        GPUs (a CPU-only head, tiny models, tests), because Ray keeps a job that asks for a GPU nobody has
        pending until its start timeout. ``num_cpus`` is ``entrypoint_num_cpus`` (``None``: Ray's default, 0).
        ``python``: the interpreter on the cluster that has stackwise and the training libraries.
        ``project_dir``: a stackwise checkout put on the trainer's ``PYTHONPATH`` (where it is not installed).
        ``home``: ``STACKWISE_HOME`` for the trainer. ``threads``: its OMP/MKL/OpenBLAS threads.
        ``env``: more environment variables for it. ``stop_grace_s``: how long Ray waits after SIGTERM before
        SIGKILL. ``timeout_s``: how long one request to the dashboard may take.
        ``client``: a ready ``JobSubmissionClient`` (or a stand-in with its methods)."""
        if client is None and importlib.util.find_spec("ray") is None:
            raise BackendError(RAY_MISSING)
        self.address = address
        self.num_gpus = num_gpus
        self.num_cpus = num_cpus
        self.python = python
        self.stop_grace_s = stop_grace_s
        self.timeout_s = timeout_s
        self.env = {"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        if threads is not None:
            for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
                self.env[var] = str(int(threads))
        if home is not None:
            self.env["STACKWISE_HOME"] = str(Path(home).expanduser().resolve())
        if project_dir is not None:
            self.env["PYTHONPATH"] = str(Path(project_dir).expanduser().resolve())
        self.env.update({str(k): str(v) for k, v in (env or {}).items()})
        self._client = client
        self._errors: tuple[type[BaseException], ...] = (OSError, RuntimeError, ValueError)
        self._ended: set[str] = set()  # submissions whose end (and log) went into their worker.log

    @property
    def where(self) -> str:
        return f"the Ray cluster at {self.address or '$RAY_ADDRESS'}"

    @staticmethod
    def submission_id(job: Job, attempt: int | None = None) -> str:
        """``stackwise-<job id>-<attempt>-<run dir digest>``: one per attempt of the job. The digest of the run
        directory keeps apart the ``ft-1`` of two stackwise homes that submit to one cluster."""
        digest = hashlib.sha256(str(job.run_dir).encode()).hexdigest()[:10]
        return f"stackwise-{job.id}-{attempt or max(job.attempts, 1)}-{digest}"

    def gpus(self, job: Job) -> float:
        """``entrypoint_num_gpus`` for ``job``: the GPUs its spec asks for, else ``num_gpus``."""
        return requested_gpus(job.run_dir) or self.num_gpus

    def entrypoint(self, job: Job) -> str:
        """The shell command Ray runs for ``job``: one trainer process per whole GPU it reserves."""
        processes = max(int(self.gpus(job)), 1)
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in launcher_env(processes).items())
        command = shlex.join(train_command(self.python, job, processes))
        return f"cd {shlex.quote(str(job.run_dir))} && {env + ' ' if env else ''}exec {command}"

    def runtime_env(self) -> dict[str, Any]:
        return {"env_vars": {**self.env, "RAY_JOB_STOP_WAIT_TIME_S": str(max(1, round(self.stop_grace_s)))}}

    def client(self) -> Any:
        """The ``JobSubmissionClient``, connected on first use."""
        if self._client is None:
            try:
                cls = _timed_client_class()
                from ray.exceptions import RayError
            except ImportError as exc:
                raise BackendError(RAY_MISSING) from exc
            self._errors = (OSError, RuntimeError, ValueError, RayError)
            try:
                self._client = cls(self.address, self.timeout_s)
            except self._errors as exc:
                raise BackendError(f"cannot reach {self.where}: {exc} (STACKWISE_RAY_ADDRESS is the address of "
                                   "the Ray dashboard, such as http://head:8265)") from exc
        return self._client

    def start(self, job: Job) -> RunHandle:
        run_dir = Path(job.run_dir)
        if not RunPaths(run_dir).spec.is_file():
            raise BackendError(f"the run directory {run_dir} has no spec.json")
        self._stop_earlier_attempts(job)
        sid = self.submission_id(job)
        entrypoint = self.entrypoint(job)
        gpus = self.gpus(job)
        found = self._find(sid)
        if found is None:
            clear_failures(run_dir)
            try:
                self._call("submit", self.client().submit_job, entrypoint=entrypoint, submission_id=sid,
                           entrypoint_num_gpus=gpus, entrypoint_num_cpus=self.num_cpus,
                           runtime_env=self.runtime_env(),
                           metadata={"stackwise_job": job.id, "owner": job.owner, "run_dir": str(run_dir),
                                     "attempt": str(max(job.attempts, 1))})
                what = f"submitted to {self.where} as {sid} (entrypoint_num_gpus={gpus:g}): {entrypoint}"
            except BackendError as exc:
                found = self._find(sid) if "already exists" in str(exc) else None
                if found is None:  # else a submission that raced this one: the same run
                    raise
        if found is not None:
            if (found.metadata or {}).get("run_dir", str(run_dir)) != str(run_dir):
                raise BackendError(f"{self.where} already has a job {sid} for another run directory "
                                   f"({found.metadata['run_dir']})")
            what = f"attached to the Ray job {sid} that {self.where} already has ({_status_name(found.status)})"
        log.info("%s: %s", job.id, what)
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        _append(RunPaths(run_dir).worker_log, f"--- {stamp} {job.id} attempt {max(job.attempts, 1)}: {what}\n")
        return RunHandle(job.id, run_dir, ref=sid)

    def poll(self, handle: RunHandle) -> int | None:
        info = self._call("status", self.client().get_job_info, handle.ref)
        status = _status_name(info.status)
        if status not in self.ENDED:  # PENDING, RUNNING (or a state newer than this code)
            if handle.kill_at is not None and not handle.stop_sent:
                self._send_stop(handle)
            return None
        if status == "SUCCEEDED":
            code = EXIT_OK
        elif status == "STOPPED":
            code = EXIT_CANCELLED
        else:
            exit_code = getattr(info, "driver_exit_code", None)
            code = exit_code if isinstance(exit_code, int) else EXIT_FAILED
        self._record_end(handle, status, info)
        return code

    def stop(self, handle: RunHandle, grace_s: float) -> None:
        """Ask Ray to stop the run (see the class: Ray's own ``stop_grace_s`` decides when it is killed)."""
        deadline = time.monotonic() + max(0.0, grace_s)
        handle.kill_at = deadline if handle.kill_at is None else min(handle.kill_at, deadline)
        if not handle.stop_sent:
            self._send_stop(handle)

    def logs(self, job: Job, tail: int = 50) -> str:
        """The last ``tail`` lines of Ray's log of the job's current attempt."""
        sid = job.backend_ref or self.submission_id(job)
        text = self._call(f"the log of {sid}", self.client().get_job_logs, sid)
        return "\n".join(text.splitlines()[-tail:]) if tail > 0 else ""

    # --- internals ----------------------------------------------------------------------------------

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``, its errors (HTTP, connection, timeout) as a :class:`BackendError`."""
        try:
            return fn(*args, **kwargs)
        except self._errors as exc:
            raise BackendError(f"{self.where}: {what} failed: {exc}") from exc

    def _find(self, sid: str) -> Any:
        """Ray's ``JobDetails`` of submission ``sid``, or ``None`` when Ray has none."""
        try:
            return self._call(f"looking up {sid}", self.client().get_job_info, sid)
        except BackendError as exc:
            if "status code 404" in str(exc) or "does not exist" in str(exc):
                return None
            raise

    def _send_stop(self, handle: RunHandle) -> None:
        """``stop_job``; ``stop_sent`` once Ray has taken it (or the run has ended anyway)."""
        try:
            if self._call(f"stopping {handle.ref}", self.client().stop_job, handle.ref):
                handle.stop_sent = True
                log.info("%s: asked Ray to stop %s", handle.job_id, handle.ref)
                return
            status = _status_name(self._call("status", self.client().get_job_status, handle.ref))
        except BackendError as exc:
            log.warning("%s: %s; trying again", handle.job_id, exc)
            return
        # False: Ray has no supervisor for it, because it has ended, or has not been scheduled yet (try again).
        handle.stop_sent = status in self.ENDED

    def _record_end(self, handle: RunHandle, status: str, info: Any) -> None:
        """Append how the run ended and Ray's log of it to ``RUN/worker.log`` (once)."""
        if handle.ref in self._ended:
            return
        self._ended.add(handle.ref)
        try:
            lines = self._call(f"the log of {handle.ref}", self.client().get_job_logs, handle.ref).splitlines()
        except BackendError as exc:
            lines = [f"(no log: {exc})"]
        code = getattr(info, "driver_exit_code", None)
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        head = f"--- {stamp} the Ray job {handle.ref} ended {status}" + (f" (exit code {code})" if code is not None
                                                                         else "")
        message = (getattr(info, "message", None) or "").splitlines()[:1]
        if status == "FAILED" and code is None and message:  # it never ran: Ray says why
            head += f": {message[0]}"
        _append(RunPaths(handle.run_dir).worker_log,
                "\n".join([f"{head}; its log:", *lines[-self.COPIED_LOG_LINES:]]) + "\n")

    def _stop_earlier_attempts(self, job: Job) -> None:
        """A resumed job must not train next to an earlier attempt that a lost worker left running."""
        for attempt in range(1, max(job.attempts, 1)):
            sid = self.submission_id(job, attempt)
            found = self._find(sid)
            if found is None or _status_name(found.status) in self.ENDED:
                continue
            log.warning("%s: attempt %d (%s) is still running on Ray; stopping it first", job.id, attempt, sid)
            self._call(f"stopping {sid}", self.client().stop_job, sid)
            deadline = time.monotonic() + self.stop_grace_s + 30
            while _status_name(self._call("status", self.client().get_job_status, sid)) not in self.ENDED:
                if time.monotonic() > deadline:
                    raise BackendError(f"attempt {attempt} of {job.id} ({sid}) is still running on Ray and does "
                                       "not stop; not starting another run next to it")
                time.sleep(1)


def _status_name(status: Any) -> str:
    """``JobStatus.RUNNING`` (a str enum) or a plain string → ``"RUNNING"``."""
    return str(getattr(status, "value", status)).upper()


def _append(path: Path, text: str) -> None:
    """Append to a run's ``worker.log``; a run directory that cannot be written is logged, not raised."""
    try:
        with path.open("a", encoding="utf-8") as out:
            out.write(text)
    except OSError as exc:
        log.warning("cannot write %s: %s", path, exc)


@functools.cache
def _timed_client_class() -> type:
    """``JobSubmissionClient`` whose requests give up after ``timeout_s``: the SDK's own have no timeout, so a
    head that accepts connections but does not answer would hang the worker (and every ``jobs logs``)."""
    from ray.job_submission import JobSubmissionClient

    class TimedJobSubmissionClient(JobSubmissionClient):
        def __init__(self, address: str | None, timeout_s: float):
            self.stackwise_timeout_s = timeout_s  # before super().__init__, which already makes a request
            super().__init__(address)

        def _do_request(self, method: str, endpoint: str, **kwargs: Any) -> Any:
            kwargs.setdefault("timeout", self.stackwise_timeout_s)
            return super()._do_request(method, endpoint, **kwargs)

    return TimedJobSubmissionClient


def make_backend(name: str = "local", *, ray_address: str | None = None, threads: int | None = None,
                 stop_grace_s: float = 120, ray_num_gpus: float = 1, ray_python: str = "python",
                 ray_env: Mapping[str, str] | None = None) -> LocalBackend | RayBackend:
    """The backend called ``name`` (``STACKWISE_JOB_BACKEND``): ``local`` or ``ray`` (at ``ray_address``,
    each run asking Ray for ``ray_num_gpus`` GPUs and started with ``ray_python``; see :class:`RayBackend`)."""
    name = (name or "local").strip().lower()
    if name == "local":
        return LocalBackend(threads=threads)
    if name == "ray":
        return RayBackend(ray_address, num_gpus=ray_num_gpus, python=ray_python, threads=threads, env=ray_env,
                          stop_grace_s=stop_grace_s)
    raise BackendError(f"STACKWISE_JOB_BACKEND must be one of {', '.join(BACKENDS)}, not {name!r}")
