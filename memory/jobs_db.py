"""The job store's SQLite connection, opened carefully: integrity check, WAL, busy timeout, schema set-up,
and transactions that turn any SQLite failure into a clear :class:`~memory.checkpoints.StoreError`.

A Postgres connection with the same two methods (``transaction``, ``close``) is what a Postgres job store
would swap in; the statements themselves are in :mod:`memory.jobs_sql`.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from memory import jobs_sql as sql
from memory.checkpoints import LOCK_TIMEOUT_S, StoreError, describe_sqlite_error


class SqliteJobsDB:
    """One SQLite connection to ``path`` (created if missing), shared by threads under a lock."""

    def __init__(self, path: Path, *, lock_timeout_s: float = LOCK_TIMEOUT_S):
        self.path = path
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
        return describe_sqlite_error(self.path, exc).replace("thread database", "job database")

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
            for statement in sql.SCHEMA:
                conn.execute(statement)
            conn.execute(sql.SEED_META, {"name": "schema_version", "value": sql.SCHEMA_VERSION})
            conn.execute(sql.SEED_META, {"name": "last_job_number", "value": 0})
            version = conn.execute(sql.SELECT_META, {"name": "schema_version"}).fetchone()[0]
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
