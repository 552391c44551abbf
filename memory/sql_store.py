"""``SqlStore``: a LangGraph ``BaseStore`` on SQLite (``$STACKWISE_HOME/memory.sqlite``) or PostgreSQL, with
semantic search.

Why not ``SqliteStore`` / ``PostgresStore``: their vector search needs the ``sqlite-vec`` extension (this
Python's ``sqlite3`` cannot load extensions) or ``pgvector`` on the server. Here the vectors are float32 bytes
beside the items and a search scores the namespace's vectors with numpy — exact, and fast at the size of one
user's memory (thousands of items: well under a millisecond per query). Nothing is cached between calls, so
several processes (bots, API servers on several machines with Postgres) see each other's writes at once.

Supported: ``get``, ``put`` (with ``index=False`` / a list of fields / the configured default fields),
``delete``, ``search`` (namespace prefix, ``filter`` on top-level value keys with ``$eq $ne $gt $gte $lt $lte``
or plain equality, ``query`` for semantic ranking, ``limit`` / ``offset``) and ``list_namespaces``; no TTL.
Namespace labels may not contain ``.`` (LangGraph's rule); they are joined with it.

Example:
    >>> import numpy as np, tempfile; from pathlib import Path
    >>> def embed(texts): return np.array([[1.0, 0.0] if "gpu" in t else [0.0, 1.0] for t in texts])
    >>> store = SqlStore(Path(tempfile.mkdtemp()) / "m.sqlite", index={"dims": 2, "embed": embed, "fields": ["text"]})
    >>> store.put(("users", "ada"), "gpu", {"text": "my gpu is a 4090"})
    >>> store.put(("users", "ada"), "lang", {"text": "answer in Chinese"})
    >>> [(i.key, round(i.score, 2)) for i in store.search(("users",), query="which gpu?")]
    [('gpu', 1.0), ('lang', 0.0)]
    >>> store.close()
"""

from __future__ import annotations

import asyncio
import json
import logging
import operator
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from langgraph.store.base import (
    BaseStore,
    GetOp,
    IndexConfig,
    InvalidNamespaceError,
    Item,
    ListNamespacesOp,
    Op,
    PutOp,
    Result,
    SearchItem,
    SearchOp,
)
from langgraph.store.base.embed import get_text_at_path, tokenize_path

from memory import pg
from memory.checkpoints import LOCK_TIMEOUT_S, StoreError
from memory.store_db import ITEMS, VECTORS, PostgresStoreDB, SqliteStoreDB

log = logging.getLogger(__name__)
_OPS = {"$eq": operator.eq, "$ne": operator.ne, "$gt": operator.gt, "$gte": operator.ge, "$lt": operator.lt,
        "$lte": operator.le}


class SqlStore(BaseStore):
    """Items and their embeddings in one SQL database; see the module docstring."""

    def __init__(self, location: str | Path, *, index: IndexConfig | None = None,
                 lock_timeout_s: float = LOCK_TIMEOUT_S):
        """``location``: an SQLite file, or a ``postgresql://`` URL. ``index``: ``{"dims", "embed", "fields"}``;
        ``embed`` is a callable ``texts -> matrix`` (or a LangChain ``Embeddings``) with a ``name`` when it has one."""
        self.db = (PostgresStoreDB(str(location), lock_timeout_s=lock_timeout_s) if pg.is_postgres_url(location)
                   else SqliteStoreDB(Path(location), lock_timeout_s=lock_timeout_s))
        self.index_config = index
        self.fields = [tokenize_path(f) for f in (index or {}).get("fields") or ["$"]]
        embed = (index or {}).get("embed")
        self.model = str(getattr(embed, "name", None) or getattr(getattr(embed, "__self__", None), "name", None)
                         or "custom")

    @property
    def location(self) -> str:
        return self.db.location

    def close(self) -> None:
        self.db.close()

    def size_bytes(self) -> int:
        return self.db.size_bytes()

    # --- BaseStore ---------------------------------------------------------------------------
    def batch(self, ops: Iterable[Op]) -> list[Result]:
        ops = list(ops)
        puts = [op for op in ops if isinstance(op, PutOp)]
        for op in puts:
            _check_namespace(op.namespace)
        vectors = self._embed_puts(puts)
        queries = [op.query for op in ops if isinstance(op, SearchOp) and op.query]
        query_vectors = dict(zip(queries, self._embed(queries), strict=True)) if queries and self.index_config else {}
        results: list[Result] = []
        erased = False
        with self.db.transaction() as execute:
            for op in ops:
                if isinstance(op, GetOp):
                    results.append(self._get(execute, op))
                elif isinstance(op, SearchOp):
                    results.append(self._search(execute, op, query_vectors.get(op.query)))
                elif isinstance(op, ListNamespacesOp):
                    results.append(self._list_namespaces(execute, op))
                elif isinstance(op, PutOp):
                    erased |= self._put(execute, op, vectors.get(id(op), []))
                    results.append(None)
                else:
                    raise TypeError(f"unknown store operation {type(op).__name__}")
        if erased and not self.db.erase_residue():
            log.warning("the memory database %s is being read by another process; the WAL copy of deleted items is "
                        "erased at the next delete", self.location)
        return results

    async def abatch(self, ops: Iterable[Op]) -> list[Result]:
        return await asyncio.to_thread(self.batch, list(ops))

    # --- operations --------------------------------------------------------------------------
    def _get(self, execute, op: GetOp) -> Item | None:
        rows = execute(f"SELECT value, created_at, updated_at FROM {ITEMS} WHERE prefix = :p AND key = :k",
                       {"p": _join(op.namespace), "k": str(op.key)})
        if not rows:
            return None
        value, created, updated = rows[0]
        return Item(value=json.loads(value), key=str(op.key), namespace=tuple(op.namespace),
                    created_at=_time(created), updated_at=_time(updated))

    def _put(self, execute, op: PutOp, vectors: list[tuple[str, int, np.ndarray]]) -> bool:
        """Write (or with ``value=None`` delete) one item; True when older content was removed."""
        where = {"p": _join(op.namespace), "k": str(op.key)}
        existed = bool(execute(f"SELECT 1 FROM {ITEMS} WHERE prefix = :p AND key = :k", where))
        execute(f"DELETE FROM {VECTORS} WHERE prefix = :p AND key = :k", where)
        if op.value is None:
            execute(f"DELETE FROM {ITEMS} WHERE prefix = :p AND key = :k", where)
            return existed
        now = time.time()
        execute(f"""INSERT INTO {ITEMS} (prefix, key, value, created_at, updated_at) VALUES (:p, :k, :v, :now, :now)
                    ON CONFLICT (prefix, key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at""",
                {**where, "v": json.dumps(op.value, ensure_ascii=False), "now": now})
        for path, idx, vector in vectors:
            execute(f"INSERT INTO {VECTORS} (prefix, key, path, idx, model, vector) VALUES (:p, :k, :path, :idx, "
                    ":model, :vector)", {**where, "path": path, "idx": idx, "model": self.model,
                                         "vector": vector.astype(np.float32).tobytes()})
        return existed

    def _search(self, execute, op: SearchOp, query: np.ndarray | None) -> list[SearchItem]:
        prefix = _join(op.namespace_prefix)
        rows = execute(f"SELECT prefix, key, value, created_at, updated_at FROM {ITEMS} WHERE {_UNDER}",
                       _under(prefix))
        items = [(p, k, json.loads(v), c, u) for p, k, v, c, u in rows]
        items = [it for it in items if _matches(it[2], op.filter)]
        scores: dict[tuple[str, str], float] = {}
        if query is not None and items:
            scores = self._scores(execute, prefix, query)
        items.sort(key=lambda it: (scores.get((it[0], it[1]), -np.inf), it[4]), reverse=True)
        page = items[op.offset: op.offset + op.limit]
        return [SearchItem(namespace=tuple(p.split(".")), key=k, value=v, created_at=_time(c), updated_at=_time(u),
                           score=scores.get((p, k)) if query is not None else None) for p, k, v, c, u in page]

    def _scores(self, execute, prefix: str, query: np.ndarray) -> dict[tuple[str, str], float]:
        """Best cosine of each item's vectors with ``query`` (vectors of another model or size are skipped)."""
        rows = execute(f"SELECT prefix, key, model, vector FROM {VECTORS} WHERE {_UNDER}", _under(prefix))
        best: dict[tuple[str, str], float] = {}
        keys, matrix, skipped = [], [], 0
        for p, k, model, blob in rows:
            vector = np.frombuffer(bytes(blob), dtype=np.float32)
            if model != self.model or vector.shape[0] != query.shape[0]:
                skipped += 1
                continue
            keys.append((p, k))
            matrix.append(vector)
        if skipped:
            log.warning("%d stored vectors were made by another embedder than %s and are not searched; "
                        "they are re-made when their items are written again", skipped, self.model)
        if matrix:
            sims = np.stack(matrix) @ query
            for key, sim in zip(keys, sims.tolist(), strict=True):
                best[key] = max(best.get(key, -1.0), float(sim))
        return best

    def _list_namespaces(self, execute, op: ListNamespacesOp) -> list[tuple[str, ...]]:
        rows = execute(f"SELECT DISTINCT prefix FROM {ITEMS}", None)
        found = set()
        for (prefix,) in rows:
            ns = tuple(prefix.split("."))
            if all(_condition(ns, c) for c in op.match_conditions or ()):
                found.add(ns[: op.max_depth] if op.max_depth else ns)
        return sorted(found)[op.offset: op.offset + op.limit]

    # --- embeddings --------------------------------------------------------------------------
    def _embed_puts(self, puts: list[PutOp]) -> dict[int, list[tuple[str, int, np.ndarray]]]:
        if not self.index_config:
            return {}
        wanted: list[tuple[int, str, int, str]] = []
        for op in puts:
            if op.value is None or op.index is False:
                continue
            paths = [tokenize_path(f) for f in op.index] if isinstance(op.index, list) else self.fields
            for path in paths:
                for idx, text in enumerate(get_text_at_path(op.value, path)):
                    if text and text.strip():
                        wanted.append((id(op), ".".join(path), idx, text))
        if not wanted:
            return {}
        matrix = self._embed([w[3] for w in wanted])
        out: dict[int, list[tuple[str, int, np.ndarray]]] = {}
        for (op_id, path, idx, _), vector in zip(wanted, matrix, strict=True):
            out.setdefault(op_id, []).append((path, idx, vector))
        return out

    def _embed(self, texts: list[str]) -> np.ndarray:
        """Unit float32 rows for ``texts``."""
        embed = self.index_config["embed"]
        raw = embed.embed_documents(texts) if hasattr(embed, "embed_documents") else embed(texts)
        matrix = np.asarray(raw, dtype=np.float32).reshape(len(texts), -1)
        dims = self.index_config.get("dims")
        if dims and matrix.shape[1] != dims:
            raise StoreError(f"The memory embedder returned {matrix.shape[1]} dimensions, the index expects {dims}.")
        norms = np.linalg.norm(matrix, axis=1, keepdims=True)
        return matrix / np.where(norms == 0, 1, norms)


# A namespace and everything under it: the prefix itself, or between "prefix." and "prefix/" ("/" follows "."),
# a byte-order range the primary key's index answers.
_UNDER = "(prefix = :p OR (prefix > :lo AND prefix < :hi))"


def _under(prefix: str) -> dict[str, str]:
    return {"p": prefix, "lo": prefix + ".", "hi": prefix + "/"} if prefix else {"p": "", "lo": "", "hi": "\U0010ffff"}


def _join(namespace: tuple[str, ...]) -> str:
    return ".".join(namespace)


def _check_namespace(namespace: tuple[str, ...]) -> None:
    if not namespace:
        raise InvalidNamespaceError("Namespace cannot be empty.")
    for label in namespace:
        if not isinstance(label, str) or not label or "." in label:
            raise InvalidNamespaceError(f"Namespace labels must be non-empty strings without '.': {namespace!r}")


def _time(epoch: float) -> datetime:
    return datetime.fromtimestamp(float(epoch), tz=UTC)


def _matches(value: dict, conditions: dict[str, Any] | None) -> bool:
    for key, want in (conditions or {}).items():
        have = value.get(key)
        if isinstance(want, dict) and want and all(k in _OPS for k in want):
            try:
                if not all(_OPS[k](have, v) for k, v in want.items()):
                    return False
            except TypeError:   # None > 3, "a" < 1: not a match
                return False
        elif have != want:
            return False
    return True


def _condition(ns: tuple[str, ...], cond: Any) -> bool:
    path = tuple(cond.path)
    part = ns[: len(path)] if cond.match_type == "prefix" else ns[-len(path):] if path else ()
    return len(part) == len(path) and all(p == "*" or p == n for p, n in zip(path, part, strict=True))
