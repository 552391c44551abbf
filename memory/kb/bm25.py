"""Okapi BM25 over a sparse term matrix: one column slice and a sum per query, ~1 ms at 10,000 chunks.

Example:
    >>> index = BM25([["lora", "adapter"], ["qlora", "4bit"], ["attention"]])
    >>> [row for row, _ in index.top(["qlora"], 3)]
    [1]
"""

from __future__ import annotations

from collections import Counter

import numpy as np
from scipy import sparse


class BM25:
    def __init__(self, docs: list[list[str]], k1: float = 1.2, b: float = 0.75):
        self.size = len(docs)
        self.vocab: dict[str, int] = {}
        rows, cols, tfs = [], [], []
        lengths = np.zeros(max(self.size, 1), dtype=np.float32)
        for row, tokens in enumerate(docs):
            lengths[row] = len(tokens)
            for term, count in Counter(tokens).items():
                rows.append(row)
                cols.append(self.vocab.setdefault(term, len(self.vocab)))
                tfs.append(count)
        rows_a, cols_a = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
        tf = np.asarray(tfs, dtype=np.float32)
        avg = float(lengths.mean()) if self.size else 1.0
        df = np.bincount(cols_a, minlength=len(self.vocab)).astype(np.float32)
        idf = np.log1p((self.size - df + 0.5) / (df + 0.5))
        norm = k1 * (1 - b + b * lengths[rows_a] / max(avg, 1e-9))
        weights = idf[cols_a] * tf * (k1 + 1) / (tf + norm)
        self.matrix = sparse.csc_matrix((weights, (rows_a, cols_a)), shape=(max(self.size, 1), max(len(self.vocab), 1)))

    def scores(self, query: list[str]) -> np.ndarray:
        counts = Counter(t for t in query if t in self.vocab)
        if not counts or not self.size:
            return np.zeros(self.size, dtype=np.float32)
        cols = [self.vocab[t] for t in counts]
        weights = np.asarray(list(counts.values()), dtype=np.float32)
        return np.asarray(self.matrix[:, cols] @ weights).ravel()[: self.size]

    def top(self, query: list[str], n: int) -> list[tuple[int, float]]:
        """The ``n`` best rows with a positive score, best first; scores scaled so the best is 1 (each
        namespace has its own index, and raw scores of a small one are not comparable to a large one's)."""
        scores = self.scores(query)
        positive = np.flatnonzero(scores > 0)
        if not len(positive):
            return []
        best = positive[np.argsort(-scores[positive], kind="stable")[:n]]
        top = float(scores[best[0]])
        return [(int(i), round(float(scores[i]) / top, 6)) for i in best]
