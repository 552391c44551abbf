"""The knowledge base's own records: a small SQLite file beside Chroma.

It holds what Chroma does not answer quickly: which sources were ingested with which content hash
(so re-ingesting skips unchanged files), every chunk's text and index terms (for BM25 and for
showing results), and a version counter that tells other processes the base changed.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sources (
    ns TEXT NOT NULL, source TEXT NOT NULL, name TEXT NOT NULL, sha TEXT NOT NULL,
    chunks INTEGER NOT NULL, bytes INTEGER NOT NULL, ingested_at REAL NOT NULL,
    PRIMARY KEY (ns, source));
CREATE TABLE IF NOT EXISTS chunks (
    id TEXT PRIMARY KEY, ns TEXT NOT NULL, source TEXT NOT NULL, seq INTEGER NOT NULL,
    card TEXT, lang TEXT NOT NULL, title TEXT NOT NULL, section TEXT NOT NULL,
    text TEXT NOT NULL, tokens TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS chunks_ns ON chunks (ns, source);
"""


class KnowledgeError(RuntimeError):
    """The knowledge base cannot be used as asked; the message says what to do."""


class Records:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.lock = threading.RLock()
        try:
            self.conn = sqlite3.connect(str(path), check_same_thread=False, timeout=5.0, isolation_level=None)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.executescript(SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise KnowledgeError(f"The knowledge-base index {path} cannot be used ({exc}). Move it aside and "
                              "stackwise rebuilds it (your documents need `kb ingest` again).") from None

    def get_meta(self, key: str) -> str | None:
        with self.lock:
            row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        with self.lock:
            self.conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def version(self) -> int:
        return int(self.get_meta("version") or 0)

    def bump(self) -> None:
        with self.lock:
            self.conn.execute("INSERT INTO meta VALUES ('version', '1') ON CONFLICT(key) DO UPDATE "
                              "SET value = CAST(value AS INTEGER) + 1")

    def source(self, ns: str, source: str) -> dict | None:
        with self.lock:
            row = self.conn.execute("SELECT name, sha, chunks, bytes, ingested_at FROM sources WHERE ns = ? "
                                    "AND source = ?", (ns, source)).fetchone()
        return dict(zip(("name", "sha", "chunks", "bytes", "ingested_at"), row, strict=True)) if row else None

    def sources(self, ns: str) -> list[dict]:
        with self.lock:
            rows = self.conn.execute("SELECT source, name, sha, chunks, bytes, ingested_at FROM sources "
                                     "WHERE ns = ? ORDER BY source", (ns,)).fetchall()
        keys = ("source", "name", "sha", "chunks", "bytes", "ingested_at")
        return [dict(zip(keys, r, strict=True)) for r in rows]

    def chunk_ids(self, ns: str, source: str | None = None) -> list[str]:
        with self.lock:
            if source is None:
                rows = self.conn.execute("SELECT id FROM chunks WHERE ns = ?", (ns,)).fetchall()
            else:
                rows = self.conn.execute("SELECT id FROM chunks WHERE ns = ? AND source = ?", (ns, source)).fetchall()
        return [r[0] for r in rows]

    def replace_source(self, ns: str, source: str, name: str, sha: str, size: int, rows: list[tuple]) -> None:
        """Swap all chunks of one source in one transaction. ``rows``: (id, seq, card, lang, title, section,
        text, tokens)."""
        with self.lock:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                self.conn.execute("DELETE FROM chunks WHERE ns = ? AND source = ?", (ns, source))
                self.conn.executemany("INSERT INTO chunks VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                      [(r[0], ns, source, *r[1:]) for r in rows])
                self.conn.execute("INSERT OR REPLACE INTO sources VALUES (?, ?, ?, ?, ?, ?, ?)",
                                  (ns, source, name, sha, len(rows), size, time.time()))
                self.conn.execute("COMMIT")
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
        self.bump()

    def drop_source(self, ns: str, source: str) -> int:
        with self.lock:
            self.conn.execute("BEGIN IMMEDIATE")
            count = self.conn.execute("DELETE FROM chunks WHERE ns = ? AND source = ?", (ns, source)).rowcount
            self.conn.execute("DELETE FROM sources WHERE ns = ? AND source = ?", (ns, source))
            self.conn.execute("COMMIT")
        self.bump()
        return count

    def drop_namespace(self, ns: str) -> None:
        with self.lock:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.execute("DELETE FROM chunks WHERE ns = ?", (ns,))
            self.conn.execute("DELETE FROM sources WHERE ns = ?", (ns,))
            self.conn.execute("COMMIT")
        self.bump()

    def load(self, ns: str) -> list[tuple]:
        """(id, source, card, lang, title, section, text, tokens) of every chunk in ``ns``, in a stable order."""
        with self.lock:
            return self.conn.execute("SELECT id, source, card, lang, title, section, text, tokens FROM chunks "
                                     "WHERE ns = ? ORDER BY source, seq", (ns,)).fetchall()

    def close(self) -> None:
        with self.lock:
            self.conn.close()
