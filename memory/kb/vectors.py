"""Chroma as the vector store: an embedded ``PersistentClient`` or a Chroma server (``HttpClient``).

One collection per namespace and embedder; vectors are always given explicitly (no collection has
a Chroma embedding function, so nothing is ever downloaded), cosine space, telemetry off.
"""

from __future__ import annotations

import hashlib
import re
import threading
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from memory.kb.index import KnowledgeError


def collection_name(ns: str, tag: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", tag.lower()).strip("-")
    if len(slug) > 40 or not slug:
        slug = hashlib.sha256(tag.encode()).hexdigest()[:16]
    return f"sw-{ns}-{slug}"


class VectorStore:
    def __init__(self, path: Path, *, url: str | None = None):
        self.path = path
        self.url = url
        self._client = None
        self._collections: dict[str, object] = {}
        self._lock = threading.RLock()

    @property
    def client(self):
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = self._connect()
        return self._client

    def _connect(self):
        import chromadb
        from chromadb.config import Settings as ChromaSettings

        settings = ChromaSettings(anonymized_telemetry=False)
        if self.url:
            parsed = urlparse(self.url if "://" in self.url else f"http://{self.url}")
            if parsed.scheme not in ("http", "https") or not parsed.hostname:
                raise KnowledgeError(f"STACKWISE_CHROMA_URL={self.url!r} is not an http(s) URL of a Chroma server.")
            try:
                client = chromadb.HttpClient(host=parsed.hostname, port=parsed.port or (443 if parsed.scheme ==
                                             "https" else 8000), ssl=parsed.scheme == "https", settings=settings)
                client.heartbeat()
            except Exception as exc:  # the client raises several unrelated types for "no server"
                raise KnowledgeError(f"The Chroma server at {self.url} does not answer ({type(exc).__name__}). "
                                     "Start it (`chroma run --path DIR`) or unset STACKWISE_CHROMA_URL.") from None
            return client
        self.path.mkdir(parents=True, exist_ok=True)
        return chromadb.PersistentClient(path=str(self.path), settings=settings)

    def _collection(self, ns: str, tag: str, *, create: bool):
        name = collection_name(ns, tag)
        with self._lock:
            found = self._collections.get(name)
            if found is None:
                if create:
                    found = self.client.get_or_create_collection(
                        name, embedding_function=None, configuration={"hnsw": {"space": "cosine", "ef_search": 100}},
                        metadata={"embedder": tag[:200]})
                else:
                    try:
                        found = self.client.get_collection(name, embedding_function=None)
                    except Exception:  # NotFoundError or a server-specific type: there is nothing to search
                        return None
                self._collections[name] = found
        return found

    def count(self, ns: str, tag: str) -> int:
        collection = self._collection(ns, tag, create=False)
        return collection.count() if collection is not None else 0

    def reset(self, ns: str, tag: str) -> None:
        name = collection_name(ns, tag)
        with self._lock:
            self._collections.pop(name, None)
            try:
                self.client.delete_collection(name)
            except Exception:  # not there yet
                pass

    def add(self, ns: str, tag: str, ids: list[str], vectors: np.ndarray, metadatas: list[dict]) -> None:
        collection = self._collection(ns, tag, create=True)
        batch = max(1, min(5000, self.client.get_max_batch_size()))
        for start in range(0, len(ids), batch):
            end = start + batch
            collection.upsert(ids=ids[start:end], embeddings=np.asarray(vectors[start:end], dtype=np.float32),
                              metadatas=metadatas[start:end])

    def delete_where(self, ns: str, tag: str, where: dict) -> None:
        collection = self._collection(ns, tag, create=False)
        if collection is not None:
            collection.delete(where=where)

    def query(self, ns: str, tag: str, vector: np.ndarray, n: int) -> list[tuple[str, float]]:
        collection = self._collection(ns, tag, create=False)
        if collection is None:
            return []
        size = collection.count()
        if not size:
            return []
        found = collection.query(query_embeddings=np.asarray([vector], dtype=np.float32), n_results=min(n, size),
                                 include=["distances"])
        return list(zip(found["ids"][0], found["distances"][0], strict=True))

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
            self._collections.clear()
        if client is not None:
            try:
                # The HTTP client's connection pool is not closed by close() (chromadb 1.5): do it here.
                for owner in (client, getattr(client, "_admin_client", None)):
                    session = getattr(getattr(owner, "_server", None), "_session", None)
                    if session is not None:
                        session.close()
                client.close()
            except Exception:  # an already-closed or shared system: nothing left to release
                pass
