"""Any other sentence-transformers model, through the ``sentence-transformers`` library itself.

Slow to import (~10 s on a small machine), so only for models the fast paths cannot run: a model
id the user has downloaded, or a local directory that is not plain BERT + mean pooling. With no
network a model that is not on disk cannot load; that becomes an :class:`EmbedderError` naming the
offline models that do work.
"""

from __future__ import annotations

import numpy as np

from memory.embedders.base import Embedder, EmbedderError


class SentenceTransformerEmbedder(Embedder):
    """``SentenceTransformer(model, device="cpu")``, loaded on first use."""

    def __init__(self, model: str, name: str | None = None, batch_size: int = 32, hint: str = ""):
        super().__init__()
        self.model = model
        self.name = name or model
        self.batch_size = batch_size
        self._hint = hint  # appended to load errors: which models work offline

    def _load(self) -> None:
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as e:
            raise EmbedderError(
                f"cannot load embedding model {self.name!r}: the sentence-transformers package is not "
                f"installed. {self._hint}".strip()
            ) from e
        try:
            self._st = SentenceTransformer(self.model, device="cpu")
        except Exception as e:  # noqa: BLE001 - HF raises OSError, ValueError, HTTP errors …; all mean "unusable"
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise EmbedderError(
                f"cannot load embedding model {self.name!r} (not downloaded, no network, or not a "
                f"sentence-transformers model: {first[:200]}). {self._hint}".strip()
            ) from e
        # Renamed in sentence-transformers 6 (the old name warns).
        get_dim = getattr(self._st, "get_embedding_dimension", None)
        dim = get_dim() if get_dim else self._st.get_sentence_embedding_dimension()
        if not dim:
            dim = int(self._st.encode(["dimension probe"], convert_to_numpy=True).shape[1])
        self._dim = int(dim)

    def _embed(self, texts: list[str]) -> np.ndarray:
        vectors = self._st.encode(
            texts, batch_size=self.batch_size, normalize_embeddings=True, convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.asarray(vectors, dtype=np.float32)
