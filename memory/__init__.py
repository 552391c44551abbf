"""Everything persistent: threads, user memory, the knowledge base, embedders, job records.

The embedder API is re-exported lazily, so ``import memory.<submodule>`` stays cheap.
"""

from __future__ import annotations

from typing import Any

_EMBEDDER_EXPORTS = ("Embedder", "EmbedderError", "load_embedder", "offline_models")

__all__ = [*_EMBEDDER_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EMBEDDER_EXPORTS:
        from memory import embedders

        return getattr(embedders, name)
    raise AttributeError(f"module 'memory' has no attribute {name!r}")
