"""The job store's database connection, SQLite or PostgreSQL, behind the same three members: ``dialect``,
``transaction(write=…)`` (yields something with ``execute(statement, params)`` whose rows read by column
name) and ``close()``. Both set the schema up on first use and turn any database failure into a clear
:class:`~memory.checkpoints.StoreError`.

- :class:`SqliteJobsDB`: integrity check, WAL, busy timeout; a write transaction is ``BEGIN IMMEDIATE``.
- :class:`PostgresJobsDB`: psycopg 3 (imported only here, only when a ``postgresql://`` URL is used); a write
  transaction is ``READ COMMITTED`` whose job rows are locked as they are read (see :func:`memory.jobs_sql.locked`),
  a read one ``REPEATABLE READ READ ONLY``; the schema is created under a transaction-scoped advisory lock, so
  several processes starting at once on an empty database do not trip over each other.

The statements themselves are in :mod:`memory.jobs_sql`.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from memory import jobs_sql as sql
from memory import pg
from memory.checkpoints import LOCK_TIMEOUT_S, StoreError, describe_sqlite_error

SCHEMA_LOCK = pg.advisory_key("stackwise.jobs.schema")


class SqliteJobsDB:
    """One SQLite connection to ``path`` (created if missing), shared by threads under a lock."""

    dialect = sql.SQLITE

    def __init__(self, path: Path, *, lock_timeout_s: float = LOCK_TIMEOUT_S):
        self.path = path
        self.lock_timeout_s = lock_timeout_s
        self._lock = threading.RLock()
        self._conn = self._open(lock_timeout_s)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def transaction(self, *, write: bool = False) -> Iterator[sqlite3.Connection]:
        """One transaction: ``BEGIN IMMEDIATE`` for writes (takes the write lock up front, so a read-then-
        write like a claim cannot race another process), a plain ``BEGIN`` for a consistent read."""
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            except sqlite3.Error as exc:
                raise StoreError(self.describe(exc)) from None
            try:
                yield self._conn
            except BaseException as exc:
                self._conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise StoreError(self.describe(exc)) from None
                raise
            try:
                self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                self._conn.execute("ROLLBACK")
                raise StoreError(self.describe(exc)) from None

    def describe(self, exc: sqlite3.Error) -> str:
        """What went wrong with the file, and what to do about it."""
        text = describe_sqlite_error(self.path, exc).replace("thread database", "job database")
        return text.replace(f"(waited {LOCK_TIMEOUT_S:.0f} s)", f"(waited {self.lock_timeout_s:.0f} s)")

    def _open(self, lock_timeout_s: float) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = None
        try:
            conn = sqlite3.connect(str(self.path), timeout=lock_timeout_s, isolation_level=None,
                                   check_same_thread=False)
            conn.row_factory = sqlite3.Row
            row = conn.execute("PRAGMA quick_check").fetchone()
            if not row or row[0] != "ok":
                raise sqlite3.DatabaseError(f"corrupt: {row[0] if row else 'no answer'}")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("BEGIN IMMEDIATE")
            version = sql.set_up(conn.execute)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn is not None:
                conn.close()
            raise StoreError(self.describe(exc)) from None
        if version > sql.SCHEMA_VERSION:
            conn.close()
            raise StoreError(f"The job database {self.path} was written by a newer stackwise (schema {version}); "
                             "upgrade stackwise to use it. Nothing was changed.")
        return conn


class PostgresJobsDB:
    """The job database on a PostgreSQL server (one shared connection, see :class:`memory.pg.SharedConnection`)."""

    dialect = sql.POSTGRES

    def __init__(self, url: str, *, lock_timeout_s: float = LOCK_TIMEOUT_S):
        self.url, self.where = url, pg.describe(url)
        self._psycopg = pg.require()
        self._lock_timeout_s = lock_timeout_s
        self._pg = pg.SharedConnection(url, what="job database", lock_timeout_s=lock_timeout_s,
                                       describe_error=self.describe, row_factory=self._psycopg.rows.dict_row)
        try:
            self._set_up_schema()
        except BaseException:
            self._pg.close()
            raise

    def close(self) -> None:
        self._pg.close()

    @contextmanager
    def transaction(self, *, write: bool = False) -> Iterator[_PgSession]:
        """One transaction: ``READ COMMITTED`` for writes (the store locks the job rows it is about to change),
        a ``REPEATABLE READ READ ONLY`` snapshot for a consistent read. When the server dropped the connection
        (a restart, an idle timeout), it is opened again before anything is done."""
        with self._pg.transaction("BEGIN" if write else "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY") as conn:
            yield _PgSession(conn)

    def describe(self, exc: BaseException) -> str:
        """What went wrong with the server, and what to do about it (never the password)."""
        if isinstance(exc, self._psycopg.errors.LockNotAvailable):
            return (f"The job database at {self.where} is locked by another process (waited "
                    f"{self._lock_timeout_s:g} s). Try again; nothing was changed.")
        return pg.failure_text(exc, self.url, "job database")

    def _set_up_schema(self) -> None:
        with self.transaction(write=True) as db:
            db.execute("SELECT pg_advisory_xact_lock(:key)", {"key": SCHEMA_LOCK})
            version = sql.set_up(db.execute)
        if version > sql.SCHEMA_VERSION:
            raise StoreError(f"The job database at {self.where} was written by a newer stackwise (schema {version}); "
                             "upgrade stackwise to use it. Nothing was changed.")


class _PgSession:
    """The connection as the store sees it inside a transaction: ``execute`` takes ``:param`` statements.
    Postgres text cannot hold NUL characters (SQLite's can): one in a value (say, an error copied from a
    crashed run's log) is stored as U+FFFD instead of failing the write."""

    def __init__(self, conn: Any):
        self._conn = conn

    def execute(self, statement: str, params: dict[str, Any] | None = None) -> Any:
        if params:
            params = {k: v.replace("\x00", "\ufffd") if isinstance(v, str) else v for k, v in params.items()}
        return self._conn.execute(sql.placeholders(statement, sql.POSTGRES), params)
