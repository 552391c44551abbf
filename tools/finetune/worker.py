"""The fine-tune worker: claims queued jobs from the job store and runs them on a backend, one at a time.

For each job: claim it → ``backend.start`` → while it runs, heartbeat (with the trainer's pid or Ray id),
copy the last line of ``RUN/progress.jsonl`` into the job, and stop the run when the owner cancels → when it
ends, read ``RUN/summary.json`` and finish the job as succeeded, failed or cancelled. SIGTERM/SIGINT to the
worker stop the current run the same way (the trainer checkpoints) and finish it as ``interrupted``, which
``resume`` continues. A worker that dies without that (kill -9, a crash) is noticed by ``reap_stale``, run
by every worker when it starts.

Command line (``stackwise worker`` is the usual way)::

    python -m tools.finetune.worker --home ~/.stackwise [--drain] [--backend local|ray] [--ray-address URL]

The job store is SQLite under ``--home``, or PostgreSQL when ``STACKWISE_DATABASE_URL`` (or ``--database-url``)
names one, as for ``stackwise`` itself: the worker must use the store the jobs were queued in.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from memory.jobs import Job, JobError, JobStore, StoreError
from tools.finetune.backends import (
    Backend,
    BackendError,
    RunHandle,
    latest_checkpoint,
    make_backend,
    tail_lines,
)
from tools.finetune.distributed import peer_failure
from tools.finetune.rundir import RunPaths

log = logging.getLogger("stackwise.worker")
ENDINGS = ("succeeded", "failed", "cancelled")  # what summary.json may say
ERROR_LINES, ERROR_CHARS = 20, 2000
FINISH_TRIES = 3


def last_progress(run_dir: str | Path) -> dict[str, Any] | None:
    """The last complete line of ``RUN/progress.jsonl`` as a dict (``None`` when there is none yet)."""
    path = RunPaths(Path(run_dir)).progress
    for line in reversed(tail_lines(path, 5, max_bytes=16_000)):
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line still being written
        if isinstance(value, dict):
            return value
    return None


def _stat_key(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


class Worker:
    """Runs queued jobs of ``home``'s job store on ``backend``. ``run(drain=True)`` returns when the queue is
    empty; ``run()`` waits for new jobs until SIGTERM/SIGINT or :meth:`request_stop`."""

    def __init__(self, home: str | Path | None, *, backend: Backend, worker_id: str | None = None, poll_s: float = 1.0,
                 heartbeat_s: float = 5.0, stale_s: float = 60, stop_grace_s: float = 120,
                 on_finished: Callable[[Job], None] | None = None, store: JobStore | None = None,
                 database_url: str | None = None):
        """``home``: the data folder holding ``jobs.sqlite`` (``None``: ``$STACKWISE_HOME``); ``database_url``:
        the PostgreSQL job store instead (``Settings.database_url``), when set.
        ``stale_s``: a job whose worker has not sent a heartbeat for that long is marked interrupted.
        ``stop_grace_s``: how long a stopped run may take to save its checkpoint before it is killed.
        ``on_finished``: called with every job this worker finished (a failing hook is logged, not raised)."""
        self.store = store or JobStore.open(home, database_url)
        self._own_store = store is None
        self.backend = backend
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self.poll_s, self.heartbeat_s, self.stale_s, self.stop_grace_s = poll_s, heartbeat_s, stale_s, stop_grace_s
        self.on_finished = on_finished
        self._shutdown = threading.Event()
        self._force = False

    # --- the loop ----------------------------------------------------------------------------------

    def run(self, drain: bool = False) -> int:
        """Reap stale jobs, then run queued ones; returns how many this worker finished."""
        previous = self._install_signals()
        finished = 0
        log.info("worker %s on the %s backend: %s", self.worker_id, self.backend.name,
                 "running the queued jobs" if drain else "waiting for jobs (SIGTERM or Ctrl-C stops it)")
        try:
            self.reap()
            last_reap = time.monotonic()
            while not self._shutdown.is_set():
                try:
                    job = self.store.claim(self.worker_id, backend=self.backend.name)
                except StoreError as exc:  # locked for longer than the store waits: try again later
                    log.warning("cannot claim a job: %s", exc)
                    self._shutdown.wait(max(self.poll_s, 1.0))
                    continue
                if job is None:
                    if drain:
                        break
                    if time.monotonic() - last_reap > self.stale_s / 2:
                        self.reap()
                        last_reap = time.monotonic()
                    self._shutdown.wait(self.poll_s)
                    continue
                log.info("%s: claimed by %s (attempt %d, owner %s)", job.id, self.worker_id, job.attempts, job.owner)
                if self.run_job(job) is not None:
                    finished += 1
        finally:
            self._restore_signals(previous)
        return finished

    def reap(self) -> list[str]:
        """Mark jobs whose worker died (or went quiet for ``stale_s``) as interrupted."""
        reaped = self.store.reap_stale(timeout_s=self.stale_s)
        for job_id in reaped:
            log.warning("%s: its worker is gone; marked interrupted (resume continues from its checkpoint)", job_id)
        return reaped

    def request_stop(self, force: bool = False) -> None:
        """Stop the current run (it checkpoints; the job becomes interrupted) and leave the loop.
        ``force`` kills the run at once instead of waiting for its checkpoint."""
        self._force = self._force or force
        self._shutdown.set()

    def close(self) -> None:
        if self._own_store:
            self.store.close()

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- one job ------------------------------------------------------------------------------------

    def run_job(self, job: Job) -> Job | None:
        """Run a job this worker has claimed until it ends; the finished job, or ``None`` if it was lost."""
        summary_path = RunPaths(Path(job.run_dir)).summary
        before = _stat_key(summary_path)  # a resumed run dir still has the last attempt's summary
        try:
            handle = self.backend.start(job)
        except BackendError as exc:
            log.error("%s: %s", job.id, exc)
            return self._finish(job, "failed", error=str(exc))
        watch = _Watch()
        try:
            code = self._watch(job, handle, watch)
        except Exception as exc:  # a bug or a dead database: never leave a run behind that nobody watches
            if self.backend.poll(handle) is None:
                self.backend.stop(handle, 0)
            self._finish(job, "interrupted", error=f"worker {self.worker_id} failed: {type(exc).__name__}: {exc}")
            raise
        if watch.lost:
            return None
        summary = None
        if _stat_key(summary_path) != before:
            try:
                summary = json.loads(summary_path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as exc:
                log.warning("%s: cannot read %s: %s", job.id, summary_path, exc)
        status, error = self._outcome(job, code, summary if isinstance(summary, dict) else None, watch)
        artifacts = dict((summary or {}).get("artifacts") or {})
        checkpoint = latest_checkpoint(job.run_dir)
        if checkpoint is not None:
            artifacts["checkpoint"] = str(checkpoint)
        return self._finish(job, status, error=error, artifacts=artifacts, summary=summary)

    def _watch(self, job: Job, handle: RunHandle, watch: _Watch) -> int:
        """Heartbeat, copy progress and pass on cancel/shutdown until the run exits; its exit code."""
        next_beat = 0.0
        poll_errors_since: float | None = None
        while True:
            try:
                code = self.backend.poll(handle)
                poll_errors_since = None
            except (BackendError, OSError, RuntimeError) as exc:
                poll_errors_since = poll_errors_since or time.monotonic()
                log.warning("%s: cannot poll the run: %s", job.id, exc)
                if time.monotonic() - poll_errors_since > self.stale_s:
                    watch.lost_backend = str(exc)
                    return -1
                code = None
            if code is not None:
                self._copy_progress(job, watch)
                return code
            self._copy_progress(job, watch)
            if time.monotonic() >= next_beat:
                next_beat = time.monotonic() + self.heartbeat_s
                self._beat(job, handle, watch)
            if self._shutdown.is_set() and not watch.shutdown:
                watch.shutdown = True
                log.info("%s: worker stopping; asking the run to save a checkpoint and stop", job.id)
                self.backend.stop(handle, self.stop_grace_s)
            if self._force and not watch.forced:
                watch.forced = True
                log.warning("%s: stopping the run now, without waiting for its checkpoint", job.id)
                self.backend.stop(handle, 0)
            if self._shutdown.is_set():
                time.sleep(self.poll_s)  # the event no longer waits once set
            else:
                self._shutdown.wait(self.poll_s)

    def _beat(self, job: Job, handle: RunHandle, watch: _Watch) -> None:
        try:
            current = self.store.heartbeat(job.id, self.worker_id, handle.pid, backend_ref=handle.ref)
        except JobError as exc:  # reaped, resumed elsewhere or deleted: not ours to finish any more
            if not watch.lost:
                log.warning("%s: %s", job.id, exc)
                watch.lost = True
                self.backend.stop(handle, self.stop_grace_s)
            return
        except StoreError as exc:  # a locked database now and then is not a reason to stop training
            log.warning("%s: heartbeat not recorded: %s", job.id, exc)
            return
        if current.cancel_requested and not watch.cancel:
            watch.cancel = True
            log.info("%s: cancel requested; asking the run to save a checkpoint and stop", job.id)
            self.backend.stop(handle, self.stop_grace_s)

    def _copy_progress(self, job: Job, watch: _Watch) -> None:
        progress = last_progress(job.run_dir)
        if progress is None or progress == watch.progress or watch.lost:
            return
        try:
            self.store.set_progress(job.id, progress)
            watch.progress = progress
        except (StoreError, ValueError) as exc:
            log.warning("%s: progress not recorded: %s", job.id, exc)

    def _outcome(self, job: Job, code: int, summary: dict | None, watch: _Watch) -> tuple[str, str | None]:
        """(status, error) from the run's summary, or from how it ended when it wrote none."""
        if summary is not None and summary.get("status") in ENDINGS:
            status, error = summary["status"], summary.get("error")
        elif watch.lost_backend:
            return "interrupted", f"lost contact with the {self.backend.name} backend: {watch.lost_backend}"
        elif watch.cancel or watch.shutdown:
            status, error = "cancelled", None
        elif (peer := peer_failure(Path(job.run_dir))) is not None:
            return "failed", f"a training process failed without a summary: {peer}"
        else:
            log_path = RunPaths(Path(job.run_dir)).worker_log
            tail = "\n".join(tail_lines(log_path, ERROR_LINES))[-ERROR_CHARS:]
            how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
            return "failed", f"the training process {how} without writing summary.json; {log_path.name} ends:\n{tail}"
        if status == "cancelled" and watch.shutdown and not watch.cancel:
            return "interrupted", f"worker {self.worker_id} was stopped; resume continues from the last checkpoint"
        return status, error

    def _finish(self, job: Job, status: str, **fields: Any) -> Job | None:
        for attempt in range(FINISH_TRIES):
            try:
                done = self.store.finish(job.id, status, worker_id=self.worker_id, **fields)
                break
            except JobError as exc:
                log.warning("%s: not finished as %s: %s", job.id, status, exc)
                return None
            except StoreError as exc:  # the job stays running until it is reaped as interrupted
                log.error("%s: cannot record %s (try %d of %d): %s", job.id, status, attempt + 1, FINISH_TRIES, exc)
                if attempt + 1 == FINISH_TRIES:
                    return None
                time.sleep(1)
        log.info("%s: %s%s", job.id, status, f" ({done.error.splitlines()[0]})" if done.error else "")
        if self.on_finished is not None:
            try:
                self.on_finished(done)
            except Exception:  # a failing notification must not stop the worker
                log.exception("%s: the on_finished hook failed", job.id)
        return done

    # --- signals -------------------------------------------------------------------------------------

    def _install_signals(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, self._on_signal)
        return previous

    @staticmethod
    def _restore_signals(previous: dict[int, Any]) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: Any) -> None:
        # The first signal stops the run after its checkpoint; a second one kills it now.
        self.request_stop(force=self._shutdown.is_set())


class _Watch:
    """What happened while one run was watched."""

    def __init__(self) -> None:
        self.cancel = False        # the owner asked to cancel
        self.shutdown = False      # the worker was asked to stop
        self.forced = False        # ... and to kill the run without waiting
        self.lost = False          # the store says this worker no longer holds the job
        self.lost_backend: str | None = None
        self.progress: dict[str, Any] | None = None


def main(argv: list[str] | None = None) -> int:
    """``python -m tools.finetune.worker --home H [--drain]``."""
    parser = argparse.ArgumentParser(prog="python -m tools.finetune.worker", description=__doc__.splitlines()[0])
    parser.add_argument("--home", help="the stackwise data folder (default: $STACKWISE_HOME or ~/.stackwise)")
    parser.add_argument("--drain", action="store_true", help="exit when the queue is empty")
    parser.add_argument("--backend", default="local", choices=["local", "ray"])
    parser.add_argument("--ray-address", help="the Ray dashboard address, such as http://head:8265")
    parser.add_argument("--ray-num-gpus", type=float, default=1.0, help="GPUs each run asks Ray for (0: CPU only)")
    parser.add_argument("--worker-id")
    parser.add_argument("--poll-s", type=float, default=1.0)
    parser.add_argument("--heartbeat-s", type=float, default=5.0)
    parser.add_argument("--database-url", default=os.environ.get("STACKWISE_DATABASE_URL") or None,
                        help="the PostgreSQL job store (default: $STACKWISE_DATABASE_URL; unset: SQLite under --home)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="worker: %(message)s")
    try:
        backend = make_backend(args.backend, ray_address=args.ray_address, ray_num_gpus=args.ray_num_gpus)
    except BackendError as exc:
        print(f"worker: {exc}", file=sys.stderr)
        return 2
    try:
        worker = Worker(args.home, backend=backend, worker_id=args.worker_id, poll_s=args.poll_s,
                        heartbeat_s=args.heartbeat_s, database_url=args.database_url)
    except StoreError as exc:
        print(f"worker: {exc}", file=sys.stderr)
        return 2
    with worker:
        worker.run(drain=args.drain)
    return 0


if __name__ == "__main__":
    sys.exit(main())
