"""The user-memory store's database connection, SQLite or PostgreSQL, behind the same members: ``dialect``,
``transaction()`` (yields ``execute(statement, params) -> rows`` with ``:param`` placeholders), ``erase_residue()``,
``size_bytes()`` and ``close()``. Both set the schema up on first use and turn a database failure into a clear
:class:`~memory.checkpoints.StoreError`.

- :class:`SqliteStoreDB`: integrity check, WAL (a process killed mid-write loses only the write that had not
  committed), ``secure_delete`` (deleted rows are overwritten with zeros in the file, not just unlinked), and
  after a delete ``erase_residue`` checkpoints and truncates the WAL, so a forgotten fact is gone from disk.
- :class:`PostgresStoreDB`: psycopg 3, a connection re-opened when the server dropped it, the schema created
  under a transaction-scoped advisory lock (several processes may start at once on an empty database).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from memory import pg
from memory.checkpoints import LOCK_TIMEOUT_S, StoreError, describe_sqlite_error
from memory.jobs_sql import POSTGRES, SQLITE, placeholders

SCHEMA_LOCK = pg.advisory_key("stackwise.memory.schema")
ITEMS, VECTORS = "memory_items", "memory_vectors"


def schema(dialect: str) -> list[str]:
    """Items (JSON values under a dotted namespace and a key) and their embedding vectors (float32 bytes)."""
    text = 'TEXT COLLATE "C"' if dialect == POSTGRES else "TEXT"   # byte order: namespace ranges use the index
    blob = "BYTEA" if dialect == POSTGRES else "BLOB"
    return [
        f"""CREATE TABLE IF NOT EXISTS {ITEMS} (
            prefix {text} NOT NULL, key {text} NOT NULL, value TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL, updated_at DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (prefix, key))""",
        f"""CREATE TABLE IF NOT EXISTS {VECTORS} (
            prefix {text} NOT NULL, key {text} NOT NULL, path TEXT NOT NULL, idx INTEGER NOT NULL,
            model TEXT NOT NULL, vector {blob} NOT NULL,
            PRIMARY KEY (prefix, key, path, idx))""",
    ]


class SqliteStoreDB:
    """One SQLite connection to ``path`` (created if missing), shared by threads under a lock."""

    dialect = SQLITE

    def __init__(self, path: Path, *, lock_timeout_s: float = LOCK_TIMEOUT_S):
        self.path = Path(path)
        self.location = str(self.path)
        self._lock = threading.RLock()
        self._conn = self._open(lock_timeout_s)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def transaction(self) -> Iterator[Callable[[str, dict | None], list]]:
        """One write transaction (``BEGIN IMMEDIATE``); yields ``execute(statement, params) -> rows``."""
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise StoreError(self.describe(exc)) from None
            try:
                yield lambda statement, params=None: self._conn.execute(statement, params or {}).fetchall()
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

    def erase_residue(self) -> bool:
        """Copy the WAL into the file and truncate it, so deleted rows (zeroed by ``secure_delete``) leave no older
        copy behind. False when another process's open read kept part of the WAL (it is erased next time)."""
        with self._lock:
            try:
                busy, _, _ = self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            except sqlite3.Error as exc:
                raise StoreError(self.describe(exc)) from None
        return not busy

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in (self.path, Path(f"{self.path}-wal")) if p.exists())

    def describe(self, exc: sqlite3.Error) -> str:
        return describe_sqlite_error(self.path, exc).replace("thread database", "memory database")

    def _open(self, lock_timeout_s: float) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = None
        try:
            conn = sqlite3.connect(str(self.path), timeout=lock_timeout_s, isolation_level=None,
                                   check_same_thread=False)
            row = conn.execute("PRAGMA quick_check").fetchone()
            if not row or row[0] != "ok":
                raise sqlite3.DatabaseError(f"corrupt: {row[0] if row else 'no answer'}")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA secure_delete=ON")
            conn.execute("BEGIN IMMEDIATE")
            for statement in schema(SQLITE):
                conn.execute(statement)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn is not None:
                conn.close()
            raise StoreError(self.describe(exc)) from None
        return conn


class PostgresStoreDB:
    """The memory database on a PostgreSQL server (one shared connection, see :class:`memory.pg.SharedConnection`)."""

    dialect = POSTGRES

    def __init__(self, url: str, *, lock_timeout_s: float = LOCK_TIMEOUT_S):
        self.url = url.strip()
        self.location = pg.redact(self.url)
        self._pg = pg.SharedConnection(self.url, what="memory database", lock_timeout_s=lock_timeout_s)
        self.where = self._pg.where
        try:
            with self.transaction() as execute:
                execute("SELECT pg_advisory_xact_lock(:key)", {"key": SCHEMA_LOCK})
                for statement in schema(POSTGRES):
                    execute(statement, None)
        except BaseException:
            self._pg.close()
            raise

    def close(self) -> None:
        self._pg.close()

    @contextmanager
    def transaction(self) -> Iterator[Callable[[str, dict | None], list]]:
        with self._pg.transaction() as conn:

            def execute(statement: str, params: dict | None = None) -> list:
                cur = conn.execute(placeholders(statement, POSTGRES), params or None)
                return cur.fetchall() if cur.description else []

            yield execute

    def erase_residue(self) -> bool:
        """Nothing to do here: a deleted row is invisible to every process at once; the server reclaims its space
        (autovacuum)."""
        return True

    def size_bytes(self) -> int:
        with self.transaction() as execute:
            rows = execute(f"SELECT pg_total_relation_size('{ITEMS}') + pg_total_relation_size('{VECTORS}')")
        return int(rows[0][0])

    def describe(self, exc: BaseException) -> str:
        return self._pg.describe_error(exc)
