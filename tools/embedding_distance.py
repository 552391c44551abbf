"""``embedding_distance``: cosine / Euclidean / dot / Manhattan between texts, explained."""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
import warnings
from itertools import combinations
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from memory.embedders import DEFAULT_MODEL, MINILM, USE_MULTILINGUAL, EmbedderError, load_embedder
from tools.base import ToolContext, ToolError, tool
from tools.paths import resolve_user_path

MAX_TEXTS = 64
MAX_CHARS = 2000
Metric = Literal["cosine", "euclidean", "dot", "manhattan"]
METRICS: tuple[str, ...] = ("cosine", "euclidean", "dot", "manhattan")
TABLE_LIMIT = 10  # more pairs than this: show only the closest few
ENGLISH_ONLY_NOTE = f"{MINILM} is English-only; for Chinese text use {USE_MULTILINGUAL}."
_NOTES_ZH = {ENGLISH_ONLY_NOTE: f"{MINILM} 只懂英文，中文文本请用 {USE_MULTILINGUAL}。"}
_CJK_FONT_HINTS = ("CJK", "Han Sans", "WenQuanYi", "SimHei", "YaHei", "PingFang", "Heiti", "Droid Sans")
# Han, kana, Hangul: MiniLM is English-only, so these switch the default to the multilingual model.
_CJK = re.compile("[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af\U00020000-\U0002fa1f]")


class DistanceArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    texts: list[str] = Field(description=f"2–{MAX_TEXTS} texts, each at most {MAX_CHARS} characters.")
    model: str | None = Field(
        None, max_length=500,
        description="Embedding model: all-MiniLM-L6-v2, use-multilingual, or any sentence-transformers id/path.",
    )
    metrics: list[Metric] | None = Field(None, description="Which metrics to report (default: all four).")

    @field_validator("texts")
    @classmethod
    def _texts(cls, v: list[str]) -> list[str]:
        if len(v) < 2:
            raise ValueError(f"give at least 2 texts to compare (got {len(v)})")
        if len(v) > MAX_TEXTS:
            raise ValueError(f"at most {MAX_TEXTS} texts per call (got {len(v)})")
        for i, t in enumerate(v):
            if not t.strip():
                raise ValueError(f"text {i + 1} is empty")
            if len(t) > MAX_CHARS:
                raise ValueError(f"text {i + 1} has {len(t)} characters; the limit is {MAX_CHARS}")
        return v


EXEMPLARS = {
    "en": [
        "how similar are 'king' and 'queen'?",
        "cosine similarity between \"cat\" and \"dog\"",
        "compute the embedding distance of these sentences",
        "which of these texts are closest: 'apple', 'banana', 'car'",
        "euclidean distance between 'hello world' and 'hi there'",
        "compare the embeddings of 'I love pizza' and 'pizza is great'",
        "how close are these two sentences semantically",
        "dot product of the vectors for 'Paris' and 'France'",
        "manhattan distance between two texts",
        "are 'happy' and 'joyful' similar?",
    ],
    "zh": [
        "「国王」和「女王」有多相似？",
        "计算“猫”和“狗”的余弦相似度",
        "这两句话的语义距离是多少",
        "比较这几段文本的向量距离",
        "欧氏距离：'你好' 和 '您好'",
        "哪两个句子最接近",
        "算一下这两个词的嵌入距离",
        "“苹果”和“香蕉”的相似度是多少",
    ],
}


def embedding_distance_run(args: DistanceArgs, ctx: ToolContext) -> dict:
    """Embed the texts, measure every pair, find the closest/farthest, plot 3+ texts."""
    texts = list(args.texts)
    metrics = [m for m in METRICS if m in args.metrics] if args.metrics else list(METRICS)
    notes: list[str] = []
    has_cjk = any(_CJK.search(t) for t in texts)
    if args.model is not None and args.model.strip():
        model, choice = _model_arg(args.model.strip(), ctx), "user"
    elif has_cjk:
        model, choice = USE_MULTILINGUAL, "auto-multilingual"
    else:
        model, choice = DEFAULT_MODEL, "default"
    try:
        embedder = ctx.embedder(model) if ctx.embedder is not None else load_embedder(model)
        vectors = embedder.embed(texts)
    except EmbedderError as e:
        raise ToolError("model_unavailable", str(e)) from e
    if has_cjk and embedder.name == MINILM:
        notes.append(ENGLISH_ONLY_NOTE)
    v = vectors.astype(np.float64)
    norms = np.linalg.norm(v, axis=1)
    pairs = []
    for i, j in combinations(range(len(texts)), 2):
        diff = v[i] - v[j]
        values = {  # all four always: closest/farthest and the d² check need cosine and Euclidean
            "a": i, "b": j,
            "cosine": float(v[i] @ v[j] / max(norms[i] * norms[j], 1e-12)),
            "euclidean": float(np.sqrt(diff @ diff)),
            "dot": float(v[i] @ v[j]),
            "manhattan": float(np.abs(diff).sum()),
        }
        pair = {"a": i, "b": j, "text_a": texts[i], "text_b": texts[j]}
        pair.update({m: values[m] for m in metrics})
        pairs.append((pair, values))
    best = max(pairs, key=lambda p: p[1]["cosine"])
    worst = min(pairs, key=lambda p: p[1]["cosine"])
    result: dict[str, Any] = {
        "model": embedder.name,
        "dim": int(vectors.shape[1]),
        "texts": texts,
        "metrics": metrics,
        "pairs": [p for p, _ in pairs],
        "closest": {k: best[1][k] for k in ("a", "b", "cosine", "euclidean")},
        "farthest": {k: worst[1][k] for k in ("a", "b", "cosine", "euclidean")},
        "normalized": True,
        "model_choice": choice,
        "plot": None,
        "attachments": [],
        "warnings": notes,
    }
    if len(texts) >= 3:
        try:
            path, caption = _pca_plot(vectors, texts, embedder.name, ctx)
        except OSError as e:  # a full disk must not cost the user the numbers
            notes.append(f"could not save the PCA plot: {e}")
        else:
            result["plot"] = str(path)
            result["attachments"] = [{"kind": "image", "path": str(path), "caption": caption}]
    return result


def _model_arg(model: str, ctx: ToolContext) -> str:
    """A model given as a directory must lie inside the folders the user may read (like data files)."""
    if model.startswith(("/", "~", ".")) or Path(model).expanduser().is_dir():
        path = resolve_user_path(model, ctx)
        if not path.is_dir():
            raise ToolError("model_unavailable", f"{model!r} is a file, not a model directory.")
        return str(path)
    return model  # an offline model's name or a Hugging Face id


def pca_2d(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Project rows onto their first two principal components → (coords (n, 2), variance ratios (2,))."""
    x = vectors.astype(np.float64) - vectors.mean(axis=0)
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    k = min(2, vt.shape[0])
    coords = np.zeros((len(x), 2))
    coords[:, :k] = x @ vt[:k].T
    total = float((s**2).sum())
    ratios = np.zeros(2)
    if total > 0:
        ratios[:k] = s[:k] ** 2 / total
    return coords, ratios


def _pca_plot(vectors: np.ndarray, texts: list[str], model: str, ctx: ToolContext) -> tuple[Any, str]:
    from matplotlib import font_manager
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    coords, ratios = pca_2d(vectors)
    digest = hashlib.sha256(json.dumps([model, texts], ensure_ascii=False).encode()).hexdigest()[:16]
    path = ctx.reports_dir / "embeddings" / f"pca-{digest}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    installed = {f.name for f in font_manager.fontManager.ttflist}
    cjk_fonts = sorted(n for n in installed if any(k in n for k in _CJK_FONT_HINTS))
    fig = Figure(figsize=(7, 5), dpi=110)
    ax = fig.add_subplot()
    ax.scatter(coords[:, 0], coords[:, 1], s=36, color="#3b6ea8")
    for i, ((x, y), text) in enumerate(zip(coords, texts, strict=True)):
        # Without a CJK font the glyphs would be boxes: then the number alone (the answer lists them).
        label = f"{i + 1}" if _CJK.search(text) and not cjk_fonts else f"{i + 1}. {_short(text, 28)}"
        ax.annotate(label, (x, y), xytext=(5, 4), textcoords="offset points", fontsize=9,
                    fontfamily=[*cjk_fonts[:1], "DejaVu Sans"])
    ax.set_xlabel(f"PC1 ({ratios[0]:.0%} of variance)")
    ax.set_ylabel(f"PC2 ({ratios[1]:.0%} of variance)")
    ax.set_title(f"{len(texts)} texts, {_short(model, 40)} embeddings, PCA to 2-D")
    ax.grid(alpha=0.3)
    with warnings.catch_warnings():
        # Without a CJK font Chinese labels draw as boxes; that is cosmetic, not an error.
        for message in (r"Glyph .* missing from (current )?font", r"findfont: "):
            warnings.filterwarnings("ignore", message=message, category=UserWarning)
        fig.savefig(path)
    caption = (f"PCA of {len(texts)} embeddings ({model}); "
               f"the two axes keep {ratios.sum():.0%} of the variance.")
    return path, caption


def _short(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _right(text: str, width: int) -> str:
    """Right-align in terminal columns (CJK characters take two)."""
    return " " * max(0, width - sum(1 + (unicodedata.east_asian_width(c) in "WF") for c in text)) + text


_TEXT = {
    "en": {"cosine": "cosine", "euclidean": "euclid", "dot": "dot", "manhattan": "manhattan", "pair": "pair",
           "default": "the default English model", "user": "the model you asked for",
           "auto-multilingual": "picked because the texts are not English",
           "model": "Model: {model} ({dim} dimensions, {choice})", "quote": '"{}"',
           "more": "(the 5 closest of {n} pairs; the JSON result has them all)",
           "closest": "Closest: ", "farthest": "Farthest:", "only": "The pair:",
           "line": "{label} {a} and {b} (cosine {cos:.4f})", "plot": "2-D PCA plot: {}", "note": "Note: {}"},
    "zh": {"cosine": "余弦", "euclidean": "欧氏", "dot": "点积", "manhattan": "曼哈顿", "pair": "文本对",
           "default": "默认的英文模型", "user": "你指定的模型",
           "auto-multilingual": "检测到中文，自动换用多语言模型",
           "model": "模型：{model}（{dim} 维，{choice}）", "quote": "「{}」",
           "more": "（共 {n} 对，只列出最接近的 5 对；完整数据在 JSON 结果里）",
           "closest": "最接近", "farthest": "最远", "only": "这一对",
           "line": "{label}：{a}和{b}（余弦 {cos:.4f}）", "plot": "二维 PCA 散点图：{}", "note": "注意：{}"},
}

_EXPLAIN = {
    "en": ["How to read these numbers:",
           "- Cosine similarity compares direction only (the angle between the vectors), not length;",
           "  the closer to 1, the closer in meaning.",
           "- Euclidean distance is the straight line between the two points, so length counts too.",
           "- The vectors here have length 1, so d² = 2 − 2·cos (d = Euclidean distance).",
           "  Check on the closest pair: {check}.",
           "- For unit vectors the dot product is exactly the cosine.",
           "- Manhattan distance adds up the absolute differences of all {dim} coordinates,",
           "  so it is never smaller than the Euclidean distance."],
    "zh": ["这些数怎么看：",
           "· 余弦相似度只看方向（两个向量的夹角），不看长度；越接近 1，意思越接近。",
           "· 欧氏距离是两点之间的直线距离，所以向量的长度也会影响它。",
           "· 这里的向量长度都是 1，所以 d² = 2 − 2·cos（d 是欧氏距离）。",
           "  用最接近的一对验算：{check}。",
           "· 对单位向量来说，点积就等于余弦相似度。",
           "· 曼哈顿距离是 {dim} 个维度上坐标差的绝对值之和，所以不会小于欧氏距离。"],
}


def render_embedding_distance(result: dict, lang: str = "en") -> str:
    """The learner-facing answer: a compact pair table, the closest/farthest pair, how to read them."""
    lang = "zh" if lang == "zh" else "en"
    w = _TEXT[lang]
    texts, metrics, pairs = result["texts"], result["metrics"], result["pairs"]
    shown = pairs if len(pairs) <= TABLE_LIMIT else sorted(pairs, key=_nearness, reverse=True)[:5]
    c, f = result["closest"], result["farthest"]
    cos, d = c["cosine"], c["euclidean"]
    choice = w[result["model_choice"]]
    lines = [w["model"].format(model=result["model"], dim=result["dim"], choice=choice), ""]
    lines += [f"{i + 1}. {_short(t, 40)}" for i, t in enumerate(texts)]
    lines += ["", _right(w["pair"], 7) + "".join(_right(w[m], 11) for m in metrics)]
    lines += [_right(f"{p['a'] + 1}↔{p['b'] + 1}", 7) + "".join(f"{p[m]:>11.4f}" for m in metrics)
              for p in shown]
    if shown is not pairs:
        lines.append(w["more"].format(n=len(pairs)))
    quote = [w["quote"].format(_short(t, 30)) for t in texts]
    label = w["closest" if len(pairs) > 1 else "only"]
    lines += ["", w["line"].format(label=label, a=quote[c["a"]], b=quote[c["b"]], cos=cos)]
    if len(pairs) > 1:
        lines.append(w["line"].format(label=w["farthest"], a=quote[f["a"]], b=quote[f["b"]], cos=f["cosine"]))
    check = f"{d:.4f}² = {d * d:.4f}{'，' if lang == 'zh' else ', '}2 − 2×{cos:.4f} = {2 - 2 * cos:.4f}"
    lines += ["", *(line.format(check=check, dim=result["dim"]) for line in _EXPLAIN[lang])]
    if result.get("plot"):
        lines += ["", w["plot"].format(result["plot"])]
    notes = result.get("warnings", [])
    lines += [w["note"].format(_NOTES_ZH.get(n, n) if lang == "zh" else n) for n in notes]
    return "\n".join(lines)


def _nearness(pair: dict) -> float:
    """Higher = closer, by whichever metric was kept (on unit vectors they rank pairs alike, but L1)."""
    for metric, sign in (("cosine", 1), ("dot", 1), ("euclidean", -1), ("manhattan", -1)):
        if metric in pair:
            return sign * pair[metric]
    return 0.0


@tool(
    args=DistanceArgs,
    render=render_embedding_distance,
    keywords=("similar", "similarity", "distance", "cosine", "euclidean", "manhattan", "dot product",
              "closest", "相似", "距离", "余弦", "欧氏", "接近"),
    exemplars=EXEMPLARS,
)
def embedding_distance(args: DistanceArgs, ctx: ToolContext) -> dict:
    """Embed 2–64 texts and report cosine, Euclidean, dot and Manhattan for every pair, the closest
    and farthest pair, and (for 3+ texts) a 2-D PCA plot."""
    return embedding_distance_run(args, ctx)
