"""Bounded thread history: keep the last N checkpoints of each thread, drop threads idle longer than a set age,
list and delete a user's threads, and report the store's size.

LangGraph writes a checkpoint per turn (``durability="exit"``) and keeps them all; each holds the whole thread
state, so without pruning a thread's rows grow with the square of its length (``evals/bench_memory.py`` measures
it). :class:`Retention` works on the checkpointer's own tables (SQLite ``checkpoints`` / ``writes``; Postgres
``checkpoints`` / ``checkpoint_writes`` / ``checkpoint_blobs``). Checkpoint ids are UUIDv6, ordered by time, so
"older than the N-th newest" is a string comparison, and a checkpoint another process writes meanwhile is newer
and never touched; on Postgres a blob is deleted only when a pruned checkpoint referenced it and no kept one does.

Example:
    >>> retention = Retention(saver, keep=20, max_idle_days=90)      # doctest: +SKIP
    >>> retention.after_turn(thread_key("alice", "cli:alice"))        # doctest: +SKIP
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from langgraph.checkpoint.base.id import UUID as UUID6

from memory.checkpoints import split_thread_key, user_prefix

log = logging.getLogger(__name__)
UUID_EPOCH_100NS = 0x01B21DD213814000
DAY_S = 86_400.0


def checkpoint_time(checkpoint_id: str) -> float | None:
    """Unix time of a UUIDv6 checkpoint id (None for another shape)."""
    try:
        uid = UUID6(checkpoint_id)
    except ValueError:
        return None
    return (uid.time - UUID_EPOCH_100NS) / 1e7 if uid.version == 6 else None


class Retention:
    """Pruning, idle-thread sweeps, listings and stats for a ``SqliteSaver`` or ``PostgresSaver``."""

    def __init__(self, saver: Any, *, keep: int, max_idle_days: float, sweep_every_s: float = 3600.0,
                 clock: Callable[[], float] = time.time):
        if keep < 1:
            raise ValueError("keep must be at least 1: the newest checkpoint is the thread")
        self.saver = saver
        self.keep = keep
        self.max_idle_s = max_idle_days * DAY_S
        self.sweep_every_s = sweep_every_s
        self.clock = clock
        self.postgres = type(saver).__name__ != "SqliteSaver"
        self._last_sweep = 0.0
        self._sweep_lock = threading.Lock()

    # --- after each turn ---------------------------------------------------------------------
    def after_turn(self, key: str) -> None:
        """Prune ``key``'s history and, at most every ``sweep_every_s``, drop idle threads."""
        self.prune(key)
        now = self.clock()
        if self.max_idle_s > 0 and now - self._last_sweep >= self.sweep_every_s and self._sweep_lock.acquire(False):
            try:
                self._last_sweep = now
                dropped = self.sweep()
                if dropped:
                    log.info("dropped %d thread(s) idle for more than %.0f days", dropped, self.max_idle_s / DAY_S)
            finally:
                self._sweep_lock.release()

    def prune(self, key: str) -> int:
        """Delete all but the newest ``keep`` checkpoints of thread ``key`` (and their writes); the number deleted."""
        deleted = 0
        with self._session() as db:
            for ns in [r[0] for r in db(f"SELECT DISTINCT checkpoint_ns FROM checkpoints WHERE thread_id = {P}",
                                        (key,))]:
                rows = db(f"SELECT checkpoint_id FROM checkpoints WHERE thread_id = {P} AND checkpoint_ns = {P} "
                          f"ORDER BY checkpoint_id{C} DESC LIMIT 1 OFFSET {P}", (key, ns, self.keep - 1))
                if rows:
                    deleted += self._drop_before(db, key, ns, rows[0][0])
        return deleted

    def _drop_before(self, db, key: str, ns: str, cutoff: str) -> int:
        where = f"thread_id = {P} AND checkpoint_ns = {P} AND checkpoint_id{C} < {P}"
        if not self.postgres:
            db(f"DELETE FROM writes WHERE {where}", (key, ns, cutoff))
            return len(db(f"DELETE FROM checkpoints WHERE {where} RETURNING 1", (key, ns, cutoff)))
        gone = db(f"DELETE FROM checkpoints WHERE {where} RETURNING checkpoint -> 'channel_versions'",
                  (key, ns, cutoff))
        db(f"DELETE FROM checkpoint_writes WHERE {where}", (key, ns, cutoff))
        if gone:
            candidates = {(ch, str(v)) for (versions,) in gone for ch, v in (versions or {}).items()}
            kept = {(r[0], r[1]) for r in db(
                "SELECT DISTINCT v.key, v.value FROM checkpoints c, jsonb_each_text(c.checkpoint -> 'channel_versions')"
                f" AS v WHERE c.thread_id = {P} AND c.checkpoint_ns = {P}", (key, ns))}
            by_channel: dict[str, list[str]] = {}
            for ch, v in candidates - kept:
                by_channel.setdefault(ch, []).append(v)
            for ch, versions in by_channel.items():
                db(f"DELETE FROM checkpoint_blobs WHERE thread_id = {P} AND checkpoint_ns = {P} AND channel = {P} "
                   f"AND version = ANY({P})", (key, ns, ch, versions))
        return len(gone)

    def sweep(self) -> int:
        """Delete every thread whose newest checkpoint is older than ``max_idle_days``; the number deleted."""
        if self.max_idle_s <= 0:
            return 0
        cutoff = self.clock() - self.max_idle_s
        idle = [t["key"] for t in self.threads() if t["last_active"] is not None and t["last_active"] < cutoff]
        return self.delete_threads(idle)

    # --- listing and deleting ----------------------------------------------------------------
    def threads(self, user_id: str | None = None) -> list[dict]:
        """Threads (of ``user_id``, or all): ``key``, ``user_id``, ``thread_id``, ``checkpoints``, ``last_active``."""
        sql = f"SELECT thread_id, count(*), max(checkpoint_id{C}) FROM checkpoints"
        params: tuple = ()
        if user_id is not None:
            prefix = user_prefix(user_id)
            sql += f" WHERE thread_id{C} >= {P} AND thread_id{C} < {P}"
            params = (prefix, prefix[:-1] + chr(ord("|") + 1))
        with self._session() as db:
            rows = db(sql + " GROUP BY thread_id", params)
        out = []
        for key, count, newest in rows:
            user, thread = split_thread_key(key) or (None, key)
            if user_id is not None and user != user_id:
                continue
            out.append({"key": key, "user_id": user, "thread_id": thread, "checkpoints": int(count),
                        "last_active": checkpoint_time(newest)})
        return sorted(out, key=lambda t: -(t["last_active"] or 0))

    def delete_threads(self, keys: list[str]) -> int:
        """Delete these threads entirely (checkpoints, writes, blobs); on SQLite the rows are zeroed in the file and
        the WAL truncated, so the conversation is gone from disk."""
        if not keys:
            return 0
        tables = (("checkpoint_writes", "checkpoint_blobs", "checkpoints") if self.postgres
                  else ("writes", "checkpoints"))
        with self._session() as db:
            for key in keys:
                for table in tables:
                    db(f"DELETE FROM {table} WHERE thread_id = {P}", (key,))
        if not self.postgres:
            self.truncate_wal()
        return len(keys)

    def truncate_wal(self) -> bool:
        """SQLite: copy the WAL into the file and truncate it (False when another reader held part of it)."""
        if self.postgres:
            return True
        with self.saver.lock:
            busy = self.saver.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        return not busy

    def stats(self) -> dict:
        """Threads, checkpoints, pending writes and bytes used (SQLite: file + WAL + free pages; Postgres: tables)."""
        with self._session() as db:
            threads, checkpoints = db("SELECT count(DISTINCT thread_id), count(*) FROM checkpoints", ())[0]
            writes = db(f"SELECT count(*) FROM {'checkpoint_writes' if self.postgres else 'writes'}", ())[0][0]
            if self.postgres:
                size = db("SELECT pg_total_relation_size('checkpoints') + pg_total_relation_size('checkpoint_writes') "
                          "+ pg_total_relation_size('checkpoint_blobs')", ())[0][0]
                extra = {}
            else:
                page = db("PRAGMA page_size", ())[0][0]
                pages, free = db("PRAGMA page_count", ())[0][0], db("PRAGMA freelist_count", ())[0][0]
                size = page * pages
                extra = {"free_bytes": page * free, "live_bytes": page * (pages - free)}
        stats = {"backend": "postgres" if self.postgres else "sqlite", "threads": int(threads),
                 "checkpoints": int(checkpoints), "writes": int(writes), "bytes": int(size), **extra,
                 "keep_checkpoints": self.keep, "max_idle_days": self.max_idle_s / DAY_S}
        if not self.postgres:
            path = self.saver.conn.execute("PRAGMA database_list").fetchone()[2]
            stats["path"] = path
            try:
                import os

                stats["wal_bytes"] = os.path.getsize(path + "-wal") if os.path.exists(path + "-wal") else 0
            except OSError:
                stats["wal_bytes"] = None
        return stats

    def vacuum(self) -> None:
        """Give free pages back to the file system (SQLite ``VACUUM``; Postgres ``VACUUM`` of the three tables)."""
        if self.postgres:
            with self.saver.conn.connection() as conn:
                for table in ("checkpoints", "checkpoint_writes", "checkpoint_blobs"):
                    conn.execute(f"VACUUM {table}")
            return
        with self.saver.lock:
            self.saver.conn.execute("VACUUM")
        self.truncate_wal()

    # --- one transaction ---------------------------------------------------------------------
    @contextmanager
    def _session(self) -> Iterator[Callable[[str, tuple], list]]:
        """One transaction on the checkpointer's connection; yields ``db(sql, params) -> rows`` (``?`` placeholders
        are written as ``{P}`` above and filled in for the dialect)."""
        if self.postgres:
            from psycopg.rows import tuple_row

            with self.saver.conn.connection() as conn, conn.transaction():
                cur = conn.cursor(row_factory=tuple_row)   # the pool's connections answer dicts

                def run_pg(sql: str, params: tuple) -> list:
                    cur.execute(sql.replace(P_MARK, "%s").replace(C_MARK, ' COLLATE "C"'), params, prepare=False)
                    return cur.fetchall() if cur.description else []

                yield run_pg
            return
        conn = self.saver.conn
        with self.saver.lock:
            self.saver.setup()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield lambda sql, params: conn.execute(sql.replace(P_MARK, "?").replace(C_MARK, ""), params).fetchall()
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")


# Placeholder and byte-order collation, filled in per dialect by ``_session`` (no collation on SQLite, whose TEXT
# compares bytes already).
P = P_MARK = "\x00P\x00"
C = C_MARK = "\x00C\x00"
