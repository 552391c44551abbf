"""Every SQL statement the job store runs, in one place.

The statements stick to portable SQL (``TEXT``, ``BIGINT``, ``INTEGER``, ``SMALLINT``, ``DOUBLE PRECISION``;
JSON kept as ``TEXT``; ``UPDATE … RETURNING``; named ``:param`` placeholders) so a Postgres store can reuse
them: it only swaps the placeholder style (``%(param)s``), may store the JSON columns as ``JSONB``, and adds
``FOR UPDATE SKIP LOCKED`` to :data:`CLAIM_CANDIDATE`. Locking (SQLite's ``BEGIN IMMEDIATE``) is the
store's business, not this module's.

Times are Unix seconds (UTC) in ``DOUBLE PRECISION`` columns; a job's number ``N`` (its id is ``ft-N``)
comes from a counter row in ``job_meta``, so numbers are never reused, even after a delete.
"""

from __future__ import annotations

SCHEMA_VERSION = 1

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS job_meta (
        name TEXT PRIMARY KEY,
        value BIGINT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS jobs (
        number BIGINT PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        owner TEXT NOT NULL,
        status TEXT NOT NULL,
        spec TEXT NOT NULL,
        preflight TEXT NOT NULL,
        run_dir TEXT NOT NULL,
        progress TEXT,
        artifacts TEXT,
        summary TEXT,
        error TEXT,
        backend TEXT,
        backend_ref TEXT,
        worker TEXT,
        worker_pid INTEGER,
        pid INTEGER,
        host TEXT,
        cancel_requested SMALLINT NOT NULL DEFAULT 0,
        attempts INTEGER NOT NULL DEFAULT 0,
        created_at DOUBLE PRECISION NOT NULL,
        queued_at DOUBLE PRECISION NOT NULL,
        started_at DOUBLE PRECISION,
        heartbeat_at DOUBLE PRECISION,
        finished_at DOUBLE PRECISION
    )""",
    "CREATE INDEX IF NOT EXISTS jobs_by_owner ON jobs (owner, number)",
    "CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, queued_at, number)",
    """CREATE TABLE IF NOT EXISTS job_history (
        job_number BIGINT NOT NULL,
        position INTEGER NOT NULL,
        status TEXT NOT NULL,
        at DOUBLE PRECISION NOT NULL,
        note TEXT NOT NULL,
        PRIMARY KEY (job_number, position)
    )""",
)

#: Rows ``job_meta`` starts with (inserted only when missing).
SEED_META = (
    "INSERT INTO job_meta (name, value) SELECT :name, :value "
    "WHERE NOT EXISTS (SELECT 1 FROM job_meta WHERE name = :name)"
)
SELECT_META = "SELECT value FROM job_meta WHERE name = :name"
NEXT_NUMBER = "UPDATE job_meta SET value = value + 1 WHERE name = 'last_job_number' RETURNING value"

JOB_COLUMNS = (
    "number", "id", "owner", "status", "spec", "preflight", "run_dir", "progress", "artifacts", "summary",
    "error", "backend", "backend_ref", "worker", "worker_pid", "pid", "host", "cancel_requested", "attempts",
    "created_at", "queued_at", "started_at", "heartbeat_at", "finished_at",
)
_SELECT = f"SELECT {', '.join(JOB_COLUMNS)} FROM jobs"

INSERT_JOB = (
    "INSERT INTO jobs (number, id, owner, status, spec, preflight, run_dir, backend, created_at, queued_at) "
    "VALUES (:number, :id, :owner, :status, :spec, :preflight, :run_dir, :backend, :created_at, :queued_at)"
)
SELECT_JOB = f"{_SELECT} WHERE id = :id"
LATEST_JOB = f"{_SELECT} WHERE owner = :owner ORDER BY number DESC LIMIT 1"
ACTIVE_JOBS = f"{_SELECT} WHERE status IN ('running', 'cancelling') ORDER BY number"
# The oldest queued job a worker of ``backend`` may take: jobs not yet tied to a backend, or tied to
# this one (a resumed job goes back to the kind of worker that holds its checkpoints).
CLAIM_CANDIDATE = (
    f"{_SELECT} WHERE status = 'queued' AND (backend IS NULL OR backend = :backend) "
    "ORDER BY queued_at, number LIMIT 1"
)
DELETE_JOB = "DELETE FROM jobs WHERE number = :number"

SELECT_HISTORY = "SELECT status, at, note FROM job_history WHERE job_number = :number ORDER BY position"
APPEND_HISTORY = (
    "INSERT INTO job_history (job_number, position, status, at, note) "
    "SELECT :number, COALESCE(MAX(position), 0) + 1, :status, :at, :note FROM job_history WHERE job_number = :number"
)
DELETE_HISTORY = "DELETE FROM job_history WHERE job_number = :number"

_UPDATABLE = frozenset(JOB_COLUMNS) - {"number", "id", "owner", "created_at"}


def update_job(columns: list[str] | tuple[str, ...]) -> str:
    """``UPDATE jobs SET c = :c, … WHERE number = :number`` for the given columns.

    Example:
        >>> update_job(["status", "error"])
        'UPDATE jobs SET status = :status, error = :error WHERE number = :number'
    """
    unknown = [c for c in columns if c not in _UPDATABLE]
    if unknown or not columns:
        raise ValueError(f"cannot update job columns {unknown or columns!r}")
    return f"UPDATE jobs SET {', '.join(f'{c} = :{c}' for c in columns)} WHERE number = :number"


def list_jobs(*, by_owner: bool, statuses: int) -> str:
    """A newest-first job listing, optionally filtered by owner (``:owner``) and by ``statuses``
    status values (``:status0``, ``:status1``, …); the row count is bound to ``:limit``."""
    where = ["owner = :owner"] if by_owner else []
    if statuses:
        where.append(f"status IN ({', '.join(f':status{i}' for i in range(statuses))})")
    clause = f" WHERE {' AND '.join(where)}" if where else ""
    return f"{_SELECT}{clause} ORDER BY number DESC LIMIT :limit"
