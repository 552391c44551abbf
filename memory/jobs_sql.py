"""Every SQL statement the job store runs, in one place, for both SQLite and PostgreSQL.

The statements stick to portable SQL (``TEXT``, ``BIGINT``, ``INTEGER``, ``SMALLINT``, ``DOUBLE PRECISION``;
JSON kept as ``TEXT``, so both stores give back exactly the same records; ``UPDATE … RETURNING``; named
``:param`` placeholders). The two dialects differ only in what the functions at the end of this module do:

- :func:`placeholders`: Postgres (psycopg) spells ``:param`` as ``%(param)s``.
- :func:`locked`: a Postgres write transaction locks the job rows it reads and then changes (``FOR UPDATE``);
  a claim skips rows another worker is claiming right now (``FOR UPDATE SKIP LOCKED``), so two workers never
  take the same job and never wait for each other. SQLite needs neither: its write transactions start with
  ``BEGIN IMMEDIATE`` and so hold the whole database.

Times are Unix seconds (UTC) in ``DOUBLE PRECISION`` columns; a job's number ``N`` (its id is ``ft-N``)
comes from a counter row in ``job_meta``, so numbers are never reused, even after a delete.
"""

from __future__ import annotations

import functools
import re

SCHEMA_VERSION = 2

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
        finished_at DOUBLE PRECISION,
        origin TEXT,
        origin_channel TEXT,
        announced_at DOUBLE PRECISION
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

#: What brings a database of schema N-1 to N (new databases get the whole ``SCHEMA`` at once).
#: 2: where a job was launched from (``origin``: channel, thread, language) and when its end was announced there.
MIGRATIONS = {
    2: ("ALTER TABLE jobs ADD COLUMN origin TEXT",
        "ALTER TABLE jobs ADD COLUMN origin_channel TEXT",
        "ALTER TABLE jobs ADD COLUMN announced_at DOUBLE PRECISION"),
}
SET_META = "UPDATE job_meta SET value = :value WHERE name = :name"


def upgrade(execute, version: int) -> int:
    """Run the migrations after ``version`` with ``execute(statement, params)`` (inside the schema
    transaction); returns the version the database is at now."""
    for target in range(version + 1, SCHEMA_VERSION + 1):
        for statement in MIGRATIONS[target]:
            execute(statement, {})
        execute(SET_META, {"name": "schema_version", "value": target})
        version = target
    return version


def set_up(execute) -> int:
    """Create what is missing, seed ``job_meta`` and bring an older schema up to date, with ``execute(statement,
    params)`` inside the caller's schema transaction; returns the database's schema version (newer than
    :data:`SCHEMA_VERSION` means a newer stackwise wrote it)."""
    for statement in SCHEMA:
        execute(statement, {})
    execute(SEED_META, {"name": "schema_version", "value": SCHEMA_VERSION})
    execute(SEED_META, {"name": "last_job_number", "value": 0})
    version = execute(SELECT_META, {"name": "schema_version"}).fetchone()["value"]
    return upgrade(execute, version) if version < SCHEMA_VERSION else version


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
    "created_at", "queued_at", "started_at", "heartbeat_at", "finished_at", "origin", "origin_channel",
    "announced_at",
)
_SELECT = f"SELECT {', '.join(JOB_COLUMNS)} FROM jobs"

INSERT_JOB = (
    "INSERT INTO jobs (number, id, owner, status, spec, preflight, run_dir, backend, created_at, queued_at, origin, "
    "origin_channel) VALUES (:number, :id, :owner, :status, :spec, :preflight, :run_dir, :backend, :created_at, "
    ":queued_at, :origin, :origin_channel)"
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
# Ended jobs launched from ``:channel`` whose end nobody has announced yet (oldest first).
UNANNOUNCED = (
    f"{_SELECT} WHERE announced_at IS NULL AND origin_channel = :channel "
    "AND status IN ('succeeded', 'failed', 'cancelled', 'interrupted') ORDER BY number LIMIT :limit"
)
UNANNOUNCED_OF_OWNER = UNANNOUNCED.replace("origin_channel = :channel", "origin_channel = :channel AND owner = :owner")
# Taking the announcement: exactly one caller sees the row come back.
MARK_ANNOUNCED = "UPDATE jobs SET announced_at = :now WHERE id = :id AND announced_at IS NULL RETURNING number"

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


# --- the two dialects -------------------------------------------------------------------------------

SQLITE, POSTGRES = "sqlite", "postgres"
DIALECTS = (SQLITE, POSTGRES)
_ROW_LOCK = {SQLITE: "", POSTGRES: " FOR UPDATE"}
_CLAIM_LOCK = {SQLITE: "", POSTGRES: " FOR UPDATE SKIP LOCKED"}
_PARAM = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")


def locked(statement: str, dialect: str, *, skip_locked: bool = False) -> str:
    """``statement`` (a ``SELECT`` of job rows in a write transaction) locking the rows it returns until the
    transaction ends; with ``skip_locked``, rows another transaction holds are passed over instead of waited for.

    Example:
        >>> locked(CLAIM_CANDIDATE, "postgres", skip_locked=True).endswith("LIMIT 1 FOR UPDATE SKIP LOCKED")
        True
        >>> locked(SELECT_JOB, "sqlite") == SELECT_JOB
        True
    """
    return statement + (_CLAIM_LOCK if skip_locked else _ROW_LOCK)[dialect]


@functools.lru_cache(maxsize=256)
def placeholders(statement: str, dialect: str) -> str:
    """``statement`` with its ``:param`` placeholders in ``dialect``'s driver style.

    Example:
        >>> placeholders("SELECT value FROM job_meta WHERE name = :name", "postgres")
        'SELECT value FROM job_meta WHERE name = %(name)s'
    """
    if dialect == SQLITE:
        return statement
    return _PARAM.sub(r"%(\1)s", statement.replace("%", "%%"))
