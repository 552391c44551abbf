"""The fine-tune job store: a table of jobs with owners, specs, status history, progress and artifacts, safe
to share between the bot, the CLI and several workers — in SQLite (``$STACKWISE_HOME/jobs.sqlite``) or, when
``STACKWISE_DATABASE_URL`` names one, in PostgreSQL, which workers on other machines can reach too
(:meth:`JobStore.open` picks).

Both behave the same. Every write is one transaction in which assigning ``ft-N`` and claiming the oldest
queued job are atomic across threads, processes and (on Postgres) machines: SQLite's write transactions are
``BEGIN IMMEDIATE``; on Postgres the job rows a write reads are locked (``FOR UPDATE``) and a claim passes over
a job another worker is claiming this instant (``FOR UPDATE SKIP LOCKED``). A damaged, locked or unreachable
database raises :class:`~memory.checkpoints.StoreError` with a message that says what to do (naming the file,
or the server's host and port, never its password); nothing is changed. The SQL and the dialects' differences
live in :mod:`memory.jobs_sql`, the connections in :mod:`memory.jobs_db`, the statuses, transitions and the
``Job`` value in :mod:`memory.jobs_model`.

Example:
    >>> import tempfile; from pathlib import Path
    >>> store = JobStore(Path(tempfile.mkdtemp()) / "jobs.sqlite")
    >>> job = store.create("alice", {"base_model": "Qwen/Qwen2.5-0.5B"}, {"rows": 10}, "/tmp/run")
    >>> job.id, job.status
    ('ft-1', 'queued')
    >>> store.claim("worker-1").status
    'running'
    >>> store.close()
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from memory import jobs_sql as sql
from memory import pg
from memory.checkpoints import StoreError
from memory.jobs_db import PostgresJobsDB, SqliteJobsDB
from memory.jobs_model import (
    ACTIVE,
    FINISHED,
    RESUMABLE,
    STATUSES,
    HistoryEntry,
    Job,
    JobError,
    JobNotFound,
    JobStateError,
    check_owner,
    check_transition,
    json_text,
    normalize_job_id,
    standing,
)

__all__ = [
    "STATUSES", "HistoryEntry", "Job", "JobError", "JobNotFound", "JobStateError", "JobStore", "StoreError",
    "pid_alive",
]

MAX_LIST = 1000

# Workers, bots and the CLI share one job database; a busy moment (a claim, a schema check) is waited out for this
# long before a "locked" error.
JOB_LOCK_TIMEOUT_S = 15.0


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (a process of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class JobStore:
    """Fine-tune job records in SQLite or PostgreSQL. Thread-safe; open one per process (or share one between
    threads)."""

    def __init__(self, path: str | Path, *, lock_timeout_s: float = JOB_LOCK_TIMEOUT_S,
                 clock: Callable[[], float] = time.time):
        """``path``: the SQLite file, or a ``postgresql://user:password@host:port/database`` URL."""
        self._clock = clock
        self._db: SqliteJobsDB | PostgresJobsDB
        if pg.is_postgres_url(path):
            self.path: Path | None = None
            self._db = PostgresJobsDB(str(path).strip(), lock_timeout_s=lock_timeout_s)
            self.location = pg.redact(self._db.url)
        else:
            self.path = Path(path)
            self._db = SqliteJobsDB(self.path, lock_timeout_s=lock_timeout_s)
            self.location = str(self.path)
        self._dialect = self._db.dialect

    @classmethod
    def for_home(cls, home: str | Path | None = None, **kwargs: Any) -> JobStore:
        """The store at ``home/jobs.sqlite``; ``home`` defaults to ``$STACKWISE_HOME`` (``~/.stackwise``)."""
        home = home if home is not None else os.environ.get("STACKWISE_HOME") or "~/.stackwise"
        return cls(Path(home).expanduser() / "jobs.sqlite", **kwargs)

    @classmethod
    def open(cls, home: str | Path | None = None, database_url: str | None = None, **kwargs: Any) -> JobStore:
        """The store the settings name: PostgreSQL at ``database_url`` (``Settings.database_url``,
        ``STACKWISE_DATABASE_URL``) when it is set, else SQLite under ``home`` (see :meth:`for_home`).
        A malformed URL or an unreachable server is a :class:`StoreError`."""
        url = (database_url or "").strip()
        if not url:
            return cls.for_home(home, **kwargs)
        if not pg.is_postgres_url(url):
            pg.conninfo(url)  # raises the StoreError that says what a database URL looks like
        return cls(url, **kwargs)

    @property
    def dialect(self) -> str:
        """``"sqlite"`` or ``"postgres"``."""
        return self._dialect

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> JobStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- creating and reading ------------------------------------------------------------------

    def create(self, owner: str, spec: dict, preflight: dict, run_dir: str | Path, *,
               backend: str | None = None, origin: dict | None = None) -> Job:
        """Queue a new job as ``ft-N`` (N one more than any job this database ever had).

        ``backend`` ties the job to one kind of worker; ``None`` lets the first worker of any backend take it.
        ``origin`` says where it was launched (``{"channel", "thread_id", "lang", …}``): its end is announced
        there (:meth:`unannounced`); ``None``: nowhere.
        """
        owner = check_owner(owner)
        channel = (origin or {}).get("channel")
        if origin is not None and (not isinstance(channel, str) or not channel):
            raise ValueError("a job's origin names its channel: {'channel': 'telegram', …}")
        values = {"owner": owner, "status": "queued", "spec": json_text(spec, "spec"),
                  "preflight": json_text(preflight, "preflight"), "run_dir": str(run_dir), "backend": backend,
                  "origin": None if origin is None else json_text(origin, "origin"), "origin_channel": channel}
        now = self._clock()
        with self._db.transaction(write=True) as db:
            number = db.execute(sql.NEXT_NUMBER).fetchone()["value"]
            job_id = f"ft-{number}"
            db.execute(sql.INSERT_JOB, {**values, "number": number, "id": job_id, "created_at": now,
                                        "queued_at": now})
            self._note(db, number, "queued", now, f"queued by {owner}")
            return self._load(db, job_id)

    def get(self, job_id: str, *, owner: str | None = None, admin: bool = False) -> Job:
        """The job, if ``owner`` owns it (or ``admin``); otherwise :class:`JobNotFound`, as for a missing job."""
        with self._db.transaction() as db:
            return self._visible(db, job_id, owner, admin)

    def latest(self, owner: str) -> Job | None:
        """``owner``'s most recently created job, or ``None`` when they have none."""
        with self._db.transaction() as db:
            row = db.execute(sql.LATEST_JOB, {"owner": check_owner(owner)}).fetchone()
            return None if row is None else self._build(db, row)

    def list(self, owner: str | None = None, status: str | Iterable[str] | None = None,
             limit: int = 50) -> list[Job]:
        """Jobs newest first: ``owner``'s, or everyone's when ``owner`` is ``None`` (an admin view);
        optionally only those in ``status`` (one status or several)."""
        statuses = [status] if isinstance(status, str) else sorted(set(status or ()))
        unknown = [s for s in statuses if s not in STATUSES]
        if unknown:
            raise ValueError(f"unknown job status {unknown[0]!r}; one of {', '.join(STATUSES)}")
        params: dict[str, Any] = {f"status{i}": s for i, s in enumerate(statuses)}
        params["limit"] = max(1, min(int(limit), MAX_LIST))
        if owner is not None:
            params["owner"] = check_owner(owner)
        query = sql.list_jobs(by_owner=owner is not None, statuses=len(statuses))
        with self._db.transaction() as db:
            return [self._build(db, row) for row in db.execute(query, params).fetchall()]

    def delete(self, job_id: str, *, owner: str | None = None, admin: bool = False) -> None:
        """Forget a job that no worker holds; its number is never given out again (the run dir stays)."""
        with self._db.transaction(write=True) as db:
            job = self._visible(db, job_id, owner, admin, lock=True)
            if job.is_active:
                raise JobStateError(f"{standing(job.id, job.status)}; cancel it before deleting it.")
            db.execute(sql.DELETE_HISTORY, {"number": job.number})
            db.execute(sql.DELETE_JOB, {"number": job.number})

    # --- the owner's actions ---------------------------------------------------------------------

    def request_cancel(self, job_id: str, owner: str | None = None, *, admin: bool = False) -> Job:
        """Cancel a job: a queued one is ``cancelled`` at once; a running one becomes ``cancelling`` with
        ``cancel_requested`` set, and its worker stops the run and finishes it as ``cancelled``.
        Asking again while it is being cancelled changes nothing."""
        now = self._clock()
        with self._db.transaction(write=True) as db:
            job = self._visible(db, job_id, owner, admin, lock=True)
            who = owner or "an admin"
            if job.status == "queued":
                self._move(db, job, "cancelled", now, f"cancelled by {who} before it started", finished_at=now)
            elif job.status == "running":
                self._move(db, job, "cancelling", now, f"cancel requested by {who}; waiting for the worker to stop",
                           cancel_requested=1)
            elif job.status != "cancelling":
                raise JobStateError(f"{standing(job.id, job.status)}; nothing to cancel.")
            return self._load(db, job.id)

    def resume(self, job_id: str, owner: str | None = None, *, admin: bool = False) -> Job:
        """Queue a failed, cancelled or interrupted job again. The run dir is kept, so training continues
        from its last checkpoint; the job returns to the same kind of backend."""
        now = self._clock()
        with self._db.transaction(write=True) as db:
            job = self._visible(db, job_id, owner, admin, lock=True)
            if job.status not in RESUMABLE:
                raise JobStateError(f"{standing(job.id, job.status)}; nothing to resume.")
            self._move(db, job, "queued", now, f"resumed by {owner or 'an admin'} (was {job.status})",
                       queued_at=now, finished_at=None, error=None, summary=None, cancel_requested=0,
                       worker=None, worker_pid=None, pid=None, host=None, heartbeat_at=None, announced_at=None)
            return self._load(db, job.id)

    # --- announcing ends --------------------------------------------------------------------------

    def unannounced(self, channel: str, owner: str | None = None, limit: int = 20) -> list[Job]:
        """Ended jobs (succeeded, failed, cancelled, interrupted) launched from ``channel`` (of ``owner``, or
        anyone's) whose end has not been announced yet, oldest first. Take each with :meth:`mark_announced`."""
        params: dict[str, Any] = {"channel": channel, "limit": max(1, min(int(limit), 500))}
        statement = sql.UNANNOUNCED
        if owner is not None:
            statement, params["owner"] = sql.UNANNOUNCED_OF_OWNER, check_owner(owner)
        with self._db.transaction() as db:
            return [self._build(db, row) for row in db.execute(statement, params).fetchall()]

    def mark_announced(self, job_id: str) -> bool:
        """Take the announcement of ``job_id``'s end: ``True`` for exactly one caller (so two bot processes
        never both announce it), ``False`` when someone already has."""
        with self._db.transaction(write=True) as db:
            row = db.execute(sql.MARK_ANNOUNCED, {"id": normalize_job_id(job_id), "now": self._clock()}).fetchone()
            return row is not None

    # --- the worker's side -----------------------------------------------------------------------

    def claim(self, worker_id: str, *, backend: str = "local") -> Job | None:
        """Take the oldest queued job for ``backend`` (or ``None``): it becomes ``running``, held by
        ``worker_id`` in this process on this host, with a fresh heartbeat. Exclusive across processes."""
        now = self._clock()
        with self._db.transaction(write=True) as db:
            row = db.execute(sql.locked(sql.CLAIM_CANDIDATE, self._dialect, skip_locked=True),
                             {"backend": backend}).fetchone()
            if row is None:
                return None
            job = self._build(db, row)
            host, attempt = socket.gethostname(), job.attempts + 1
            self._move(db, job, "running", now, f"claimed by worker {worker_id} on {host} (attempt {attempt})",
                       worker=worker_id, worker_pid=os.getpid(), pid=None, host=host, backend=backend,
                       started_at=now, heartbeat_at=now, finished_at=None, attempts=attempt)
            return self._load(db, job.id)

    def heartbeat(self, job_id: str, worker_id: str, pid: int | None = None, *,
                  backend_ref: str | None = None) -> Job:
        """Say ``worker_id`` still runs the job (optionally as training process ``pid``, or as backend job
        ``backend_ref`` such as a Ray submission id). Returns the job, so the worker sees
        ``cancel_requested``; raises :class:`JobStateError` when the worker no longer holds it."""
        now = self._clock()
        with self._db.transaction(write=True) as db:
            job = _held_by(self._load(db, job_id, lock=True), worker_id)
            changes: dict[str, Any] = {"heartbeat_at": now}
            if pid is not None:
                changes["pid"] = int(pid)
            if backend_ref is not None:
                changes["backend_ref"] = str(backend_ref)
            self._update(db, job.number, **changes)
            return self._load(db, job.id)

    def set_progress(self, job_id: str, progress: dict) -> None:
        """Record the job's latest progress line (step, total, loss, lr, tokens/s, ETA, …)."""
        text = json_text(progress, "progress")
        with self._db.transaction(write=True) as db:
            self._update(db, self._load(db, job_id, lock=True).number, progress=text)

    def finish(self, job_id: str, status: str, *, error: str | None = None, artifacts: dict | None = None,
               summary: dict | None = None, note: str | None = None, worker_id: str | None = None) -> Job:
        """End a running (or cancelling) job as succeeded, failed, cancelled or interrupted. With
        ``worker_id``, only while that worker still holds it (a reaped-and-resumed job is left alone)."""
        if status not in FINISHED:
            raise ValueError(f"a job finishes as one of {', '.join(sorted(FINISHED))}, not {status!r}")
        now = self._clock()
        changes: dict[str, Any] = {"finished_at": now, "error": error}
        if artifacts is not None:
            changes["artifacts"] = json_text(artifacts, "artifacts")
        if summary is not None:
            changes["summary"] = json_text(summary, "summary")
        with self._db.transaction(write=True) as db:
            job = self._load(db, job_id, lock=True)
            if worker_id is not None:
                _held_by(job, worker_id)
            if job.status == "queued":  # only a run can finish; a queued job is cancelled with request_cancel
                raise JobStateError(f"{standing(job.id, job.status)}; it has not started, so it cannot finish "
                                    f"as {status}.")
            default = f"{status}: {error}" if error else status
            self._move(db, job, status, now, note or default, **changes)
            return self._load(db, job.id)

    def reap_stale(self, now: float | None = None, timeout_s: float = 60) -> list[str]:
        """Mark ``interrupted`` every running/cancelling job whose worker has gone quiet for more than
        ``timeout_s`` or whose recorded worker/training process is dead on this host; returns their ids.
        Run it when a worker starts and now and then: this is how a kill -9'ed worker's job is noticed."""
        now = self._clock() if now is None else now
        host = socket.gethostname()
        reaped = []
        with self._db.transaction(write=True) as db:
            for row in db.execute(sql.locked(sql.ACTIVE_JOBS, self._dialect)).fetchall():
                job = self._build(db, row)
                reason = _stale_reason(job, now, timeout_s, host)
                if reason:
                    self._move(db, job, "interrupted", now, reason, finished_at=now, error=reason)
                    reaped.append(job.id)
        return reaped

    # --- internals -----------------------------------------------------------------------------

    # ``db`` is what a transaction yields: a sqlite3.Connection, or the Postgres session with the same ``execute``.

    def _build(self, db: Any, row: Any) -> Job:
        return Job.from_row(row, db.execute(sql.SELECT_HISTORY, {"number": row["number"]}).fetchall())

    def _load(self, db: Any, job_id: str, *, lock: bool = False) -> Job:
        """The job; with ``lock`` (in a write transaction that will change it), its row stays locked until commit."""
        job_id = normalize_job_id(job_id)
        statement = sql.locked(sql.SELECT_JOB, self._dialect) if lock else sql.SELECT_JOB
        row = db.execute(statement, {"id": job_id}).fetchone()
        if row is None:
            raise JobNotFound(job_id)
        return self._build(db, row)

    def _visible(self, db: Any, job_id: str, owner: str | None, admin: bool, *, lock: bool = False) -> Job:
        if owner is None and not admin:
            raise ValueError("say whose job this is: pass owner=… (or admin=True)")
        job = self._load(db, job_id, lock=lock)
        if not admin and job.owner != owner:
            raise JobNotFound(job.id)  # exactly what a missing job says: no hint that it exists
        return job

    def _move(self, db: Any, job: Job, status: str, now: float, note: str, **changes: Any) -> None:
        check_transition(job.id, job.status, status)
        self._update(db, job.number, status=status, **changes)
        self._note(db, job.number, status, now, note)

    def _update(self, db: Any, number: int, **changes: Any) -> None:
        db.execute(sql.update_job(list(changes)), {**changes, "number": number})

    def _note(self, db: Any, number: int, status: str, now: float, note: str) -> None:
        db.execute(sql.APPEND_HISTORY, {"number": number, "status": status, "at": now, "note": note})


def _held_by(job: Job, worker_id: str) -> Job:
    """``job`` if ``worker_id`` holds it; otherwise a :class:`JobStateError` telling that worker to stop."""
    if job.status not in ACTIVE or job.worker != worker_id:
        holder = f" on worker {job.worker}" if job.is_active else ""
        raise JobStateError(f"{standing(job.id, job.status)}{holder}; worker {worker_id} no longer holds it "
                            "and should stop the run.")
    return job


def _stale_reason(job: Job, now: float, timeout_s: float, host: str) -> str | None:
    """Why an active job has lost its worker, or ``None`` while it looks alive."""
    if job.host == host:
        if job.pid and not pid_alive(job.pid):
            return f"the training process {job.pid} of worker {job.worker} is gone"
        if job.worker_pid and not pid_alive(job.worker_pid):
            return f"worker {job.worker} (process {job.worker_pid}) is gone"
    age = now - (job.heartbeat_at or job.started_at or job.queued_at)
    if age > timeout_s:
        return f"worker {job.worker} sent no heartbeat for {age:.0f} s (limit {timeout_s:.0f} s)"
    return None
