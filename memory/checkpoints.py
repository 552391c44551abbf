"""Thread checkpoints: a LangGraph SQLite checkpointer under ``$STACKWISE_HOME``, opened carefully.

A damaged or locked database is reported with a clear :class:`StoreError`; nothing is moved,
truncated or recreated behind the user's back, so no history is lost silently.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

LOCK_TIMEOUT_S = 5.0


class StoreError(RuntimeError):
    """The thread store cannot be used; the message says what to do."""


def describe_sqlite_error(path: Path, exc: sqlite3.Error) -> str:
    text = str(exc)
    if "locked" in text or "busy" in text:
        return (f"The thread database {path} is locked by another process (waited {LOCK_TIMEOUT_S:.0f} s). "
                "Close the other stackwise process or try again; nothing was changed.")
    if "not a database" in text or "malformed" in text or "corrupt" in text:
        return (f"The thread database {path} is damaged ({text}). Your file was left untouched: move it aside "
                "(or restore a backup) and stackwise will start a new one.")
    return f"The thread database {path} cannot be used: {text}"


def open_checkpointer(path: Path):
    """A ready SqliteSaver on ``path`` (created if missing), after an integrity check.

    LangGraph is imported here, not at module level: the job store and a GPU worker use this
    module's errors without needing LangGraph installed."""
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
        saver = SqliteSaver(conn)
        saver.setup()
        return saver
    except sqlite3.Error as exc:
        raise StoreError(describe_sqlite_error(path, exc)) from None
