"""Thread checkpoints: a LangGraph checkpointer — SQLite under ``$STACKWISE_HOME`` by default, PostgreSQL
(``langgraph-checkpoint-postgres``) when ``STACKWISE_DATABASE_URL`` names a server — opened carefully.

A damaged, locked or unreachable database is reported with a clear :class:`StoreError`; nothing is moved,
truncated or recreated behind the user's back, so no history is lost silently.

SQLite runs in WAL mode with ``synchronous=NORMAL``: a committed checkpoint survives the process being killed
(``kill -9``) at any instant, and a write cut short is rolled back when the file is next opened. ``secure_delete``
overwrites deleted rows (pruned checkpoints, forgotten threads) with zeros, and the WAL is capped in size.

Thread keys: the checkpointer's ``thread_id`` is :func:`thread_key` of the user and the channel's thread id, so no
user can open another's thread by guessing its id, and a user's threads can be found (and deleted) by prefix.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

LOCK_TIMEOUT_S = 5.0
WAL_LIMIT_BYTES = 32 * 2**20     # the WAL is truncated back to this after a checkpoint


class StoreError(RuntimeError):
    """The thread store cannot be used; the message says what to do."""


def thread_key(user_id: str, thread_id: str) -> str:
    """The checkpointer's thread id for ``thread_id`` of ``user_id``; the length prefix keeps it unambiguous
    whatever characters the two ids contain.

    Example:
        >>> thread_key("alice", "cli:alice"), split_thread_key("5:alice|cli:alice")
        ('5:alice|cli:alice', ('alice', 'cli:alice'))
    """
    return f"{len(user_id)}:{user_id}|{thread_id}"


def user_prefix(user_id: str) -> str:
    """What every :func:`thread_key` of ``user_id`` starts with."""
    return f"{len(user_id)}:{user_id}|"


def split_thread_key(key: str) -> tuple[str, str] | None:
    """``(user_id, thread_id)`` of a :func:`thread_key`, or None for a key of another shape."""
    size, sep, rest = key.partition(":")
    if not sep or not size.isdigit() or len(rest) <= int(size) or rest[int(size)] != "|":
        return None
    return rest[: int(size)], rest[int(size) + 1:]


def describe_sqlite_error(path: Path, exc: sqlite3.Error) -> str:
    text = str(exc)
    if "locked" in text or "busy" in text:
        return (f"The thread database {path} is locked by another process (waited {LOCK_TIMEOUT_S:.0f} s). "
                "Close the other stackwise process or try again; nothing was changed.")
    if "not a database" in text or "malformed" in text or "corrupt" in text:
        return (f"The thread database {path} is damaged ({text}). Your file was left untouched: move it aside "
                "(or restore a backup) and stackwise will start a new one.")
    return f"The thread database {path} cannot be used: {text}"


def open_checkpointer(path: Path, database_url: str | None = None):
    """A ready checkpointer: ``PostgresSaver`` at ``database_url`` when it is set, else a ``SqliteSaver`` on
    ``path`` (created if missing) after an integrity check.

    LangGraph is imported here, not at module level: the job store and a GPU worker use this
    module's errors without needing LangGraph installed."""
    if database_url and database_url.strip():
        return _open_postgres(database_url.strip())
    from langgraph.checkpoint.sqlite import SqliteSaver

    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        conn = sqlite3.connect(str(path), check_same_thread=False, timeout=LOCK_TIMEOUT_S, isolation_level=None)
        row = conn.execute("PRAGMA quick_check").fetchone()
        if not row or row[0] != "ok":
            conn.close()
            raise StoreError(describe_sqlite_error(path, sqlite3.DatabaseError(f"corrupt: {row}")))
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA secure_delete=ON")
        conn.execute(f"PRAGMA journal_size_limit={WAL_LIMIT_BYTES}")
        saver = SqliteSaver(conn)
        saver.setup()
        return saver
    except sqlite3.Error as exc:
        raise StoreError(describe_sqlite_error(path, exc)) from None


def _open_postgres(url: str):
    """A ``PostgresSaver`` on a small connection pool (connections are checked before use, so a server restart
    costs one failed turn at most); the schema is set up under a session advisory lock, so several processes
    starting at once on an empty database do not trip over each other."""
    from memory import pg

    psycopg = pg.require()
    from langgraph.checkpoint.postgres import PostgresSaver
    from psycopg.rows import dict_row
    from psycopg_pool import ConnectionPool

    with pg.connect(url, what="thread database", prepare_threshold=0, row_factory=dict_row) as setup:
        try:
            setup.execute("SELECT pg_advisory_lock(%s)", [pg.advisory_key("stackwise.threads.schema")])
            PostgresSaver(setup).setup()
        except psycopg.Error as exc:
            raise StoreError(f"The thread database at {pg.describe(url)} cannot be set up: "
                             f"{pg.error_text(exc, url)}. Nothing was changed.") from None
    pool = ConnectionPool(url, min_size=1, max_size=4, open=True, check=ConnectionPool.check_connection,
                          kwargs={"autocommit": True, "prepare_threshold": 0, "row_factory": dict_row,
                                  "connect_timeout": pg.CONNECT_TIMEOUT_S}, name="stackwise-threads")
    return PostgresSaver(pool)


def close_checkpointer(saver: Any) -> None:
    """Close the checkpointer's connection (SQLite) or pool (Postgres)."""
    conn = getattr(saver, "conn", None)
    if conn is not None:
        conn.close()


def as_store_error(exc: BaseException, where: Path | str) -> StoreError | None:
    """A :class:`StoreError` for a database failure of the thread store (SQLite or Postgres), None otherwise."""
    if isinstance(exc, StoreError):
        return exc
    if isinstance(exc, sqlite3.Error):
        return StoreError(describe_sqlite_error(Path(where), exc))
    try:
        import psycopg
        import psycopg_pool
    except ImportError:
        return None
    if isinstance(exc, psycopg.Error | psycopg_pool.PoolTimeout):
        from memory import pg

        text = pg.error_text(exc, str(where))
        return StoreError(f"The thread database at {pg.describe(str(where))} cannot be used: {text}. Check "
                          "STACKWISE_DATABASE_URL and that the server is running; nothing was changed.")
    return None
