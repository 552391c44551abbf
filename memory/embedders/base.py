"""The embedder interface: ``name``, ``dim`` and ``embed(texts)`` → unit-length float32 rows.

Every embedder is lazy: constructing one only records where the model lives; the weights load on
the first :meth:`Embedder.embed` (or an explicit :meth:`Embedder.load`), once, under a lock, so
threads can share one instance.

Example:
    >>> class Ones(Embedder):
    ...     name, _dim = "ones", 3
    ...     def _load(self): pass
    ...     def _embed(self, texts): return np.ones((len(texts), 3))
    >>> Ones().embed(["a", "b"]).round(3).tolist()
    [[0.577, 0.577, 0.577], [0.577, 0.577, 0.577]]
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


class EmbedderError(ValueError):
    """A model that cannot be used here (unknown, not downloaded, or broken), said plainly."""


@dataclass(frozen=True)
class OfflineModel:
    """A model that works with no network, because a Python package ships its weights."""

    name: str
    dim: int
    languages: str
    package: str
    aliases: tuple[str, ...] = ()


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Return ``vectors`` as float32 with every row scaled to length 1 (zero rows stay zero).

    Example:
        >>> unit_rows(np.array([[3.0, 4.0], [0.0, 0.0]])).round(2).tolist()
        [[0.6, 0.8], [0.0, 0.0]]
    """
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, np.float32(1e-12))


class Embedder(ABC):
    """Base class: subclasses set ``name``, ``_dim`` (or find it in ``_load``) and implement
    ``_load()`` and ``_embed(texts) -> array (n, dim)``; the base class does laziness, locking,
    input checks, the empty case and L2 normalisation."""

    name: str = ""
    _dim: int | None = None

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loaded = False

    @property
    def dim(self) -> int:
        """Length of each embedding; loads the model only when the files do not say it."""
        if self._dim is None:
            self.load()
        assert self._dim is not None
        return self._dim

    @property
    def loaded(self) -> bool:
        return self._loaded

    def load(self) -> Embedder:
        """Load the model now (idempotent, thread-safe); returns ``self``."""
        if not self._loaded:
            with self._lock:
                if not self._loaded:
                    self._load()
                    self._loaded = True
        return self

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts`` → float32 array of shape ``(len(texts), dim)``, rows of length 1."""
        if isinstance(texts, str):
            raise TypeError("embed() takes a list of strings, not one string; wrap it: embed([text])")
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"text {i} is {type(text).__name__}, expected str")
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        self.load()
        vectors = unit_rows(self._embed(texts))
        if vectors.shape != (len(texts), self.dim):
            expected = (len(texts), self.dim)
            raise RuntimeError(f"{self.name} returned shape {vectors.shape}, expected {expected}")
        return vectors

    @abstractmethod
    def _load(self) -> None:
        """Read the weights; set ``self._dim`` if it was not known before."""

    @abstractmethod
    def _embed(self, texts: list[str]) -> np.ndarray:
        """Embed a non-empty list of strings (normalisation is done by the caller)."""

    def __repr__(self) -> str:
        state = "loaded" if self._loaded else "not loaded"
        return f"{type(self).__name__}(name={self.name!r}, {state})"
