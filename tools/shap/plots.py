"""The report's figures, drawn with matplotlib's object API (no pyplot state, Agg output, 900 px wide).

Beeswarm (every explained row, coloured by feature value), bar (mean |SHAP|), waterfall (one row)
and dependence (the top feature's value against its SHAP value). Chinese column names draw with a
CJK font when one is installed; without one the glyph warnings are silenced (boxes, not errors).
"""

from __future__ import annotations

import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np

WIDTH_IN, DPI = 9.0, 100          # 900 px: readable at chat size
TOP = 12
_CJK_FONT_HINTS = ("CJK", "Han Sans", "WenQuanYi", "SimHei", "YaHei", "PingFang", "Heiti", "Droid Sans Fallback")
UP, DOWN = "#d0424f", "#2f6db5"


@lru_cache(maxsize=1)
def _font_family() -> tuple[str, ...]:
    from matplotlib import font_manager

    names = sorted({f.name for f in font_manager.fontManager.ttflist if any(k in f.name for k in _CJK_FONT_HINTS)})
    return (*names[:1], "DejaVu Sans")


def _figure(height: float):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(WIDTH_IN, height), dpi=DPI)
    return fig, fig.add_subplot()


def _save(fig, path: Path) -> Path:
    for text in fig.findobj(lambda o: hasattr(o, "set_fontfamily")):
        text.set_fontfamily(list(_font_family()))
    with warnings.catch_warnings():
        for message in (r"Glyph .* missing from (current )?font", r"findfont: "):
            warnings.filterwarnings("ignore", message=message, category=UserWarning)
        fig.tight_layout()
        fig.savefig(path)
    return path


def _short(name: str, limit: int = 28) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"


def _color_values(x) -> np.ndarray:
    """Feature values as 0..1 ranks (NaN stays NaN) so one colour bar fits every feature."""
    import pandas as pd

    if isinstance(x.dtype, pd.CategoricalDtype):
        codes = x.cat.codes.to_numpy().astype(float)
        codes[codes < 0] = np.nan
    else:
        codes = x.to_numpy(dtype=float)
    ranks = pd.Series(codes).rank(pct=True).to_numpy()
    return ranks


def beeswarm(values: np.ndarray, X, order: list[str], features: list[str], path: Path, title: str) -> Path:
    from matplotlib import colormaps

    shown = order[:TOP][::-1]
    fig, ax = _figure(1.2 + 0.42 * len(shown))
    rng = np.random.default_rng(0)
    cmap = colormaps["coolwarm"]
    for i, feat in enumerate(shown):
        s = values[:, features.index(feat)]
        c = _color_values(X[feat])
        jitter = rng.uniform(-0.32, 0.32, len(s)) * (np.argsort(np.argsort(np.abs(s))) / max(len(s), 1) * 0.5 + 0.5)
        nan = np.isnan(c)
        ax.scatter(s[nan], i + jitter[nan], s=6, color="#9a9a9a", alpha=0.6, linewidths=0)
        sc = ax.scatter(s[~nan], i + jitter[~nan], s=6, c=c[~nan], cmap=cmap, vmin=0, vmax=1, alpha=0.8,
                        linewidths=0)
    ax.axvline(0, color="#555", lw=0.8)
    ax.set_yticks(range(len(shown)), [_short(f) for f in shown])
    ax.set_xlabel("SHAP value (impact on the model output)")
    ax.set_title(title)
    if shown:
        bar = fig.colorbar(sc, ax=ax, ticks=[0, 1], pad=0.01, aspect=40)
        bar.ax.set_yticklabels(["low", "high"])
        bar.set_label("feature value")
    return _save(fig, path)


def bar(importance: list[dict], path: Path, title: str) -> Path:
    shown = importance[:TOP][::-1]
    fig, ax = _figure(1.2 + 0.38 * len(shown))
    colors = [UP if r["direction"] == "up" else DOWN if r["direction"] == "down" else "#7d7d7d" for r in shown]
    ax.barh(range(len(shown)), [r["mean_abs_shap"] for r in shown], color=colors)
    ax.set_yticks(range(len(shown)), [_short(r["feature"]) for r in shown])
    for i, r in enumerate(shown):
        ax.text(r["mean_abs_shap"], i, f" {r['mean_abs_shap']:.3g}", va="center", fontsize=8)
    ax.set_xlabel("mean |SHAP value|  (red: higher value → higher output; blue: lower; grey: mixed)")
    ax.set_title(title)
    return _save(fig, path)


def waterfall(contributions: list[dict], base: float, output: float, path: Path, title: str) -> Path:
    """``contributions``: [{feature, value, shap}] largest |shap| first, the rest summed as one bar."""
    items = contributions[::-1]
    fig, ax = _figure(1.4 + 0.4 * len(items))
    start = output - sum(c["shap"] for c in items)
    for i, c in enumerate(items):
        ax.barh(i, c["shap"], left=start, color=UP if c["shap"] >= 0 else DOWN)
        ax.text(start + max(c["shap"], 0), i, f" {c['shap']:+.3g}", va="center", fontsize=8)
        start += c["shap"]
    ax.set_yticks(range(len(items)), [_short(f"{c['feature']} = {c['value']}", 40) for c in items])
    ax.axvline(base, color="#777", lw=0.8, ls="--")
    ax.axvline(output, color="#222", lw=1.0)
    ax.set_xlabel(f"model output: base {base:.3g} → this row {output:.3g}")
    ax.set_title(title)
    return _save(fig, path)


def dependence(x, s: np.ndarray, feature: str, path: Path, title: str) -> Path:
    import pandas as pd

    fig, ax = _figure(5.0)
    if isinstance(x.dtype, pd.CategoricalDtype):
        levels = list(x.cat.categories)
        codes = x.cat.codes.to_numpy()
        jitter = np.random.default_rng(0).uniform(-0.25, 0.25, len(codes))
        keep = codes >= 0
        ax.scatter(codes[keep] + jitter[keep], s[keep], s=8, alpha=0.6, color="#3b6ea8", linewidths=0)
        ax.set_xticks(range(len(levels)), [_short(str(v), 14) for v in levels], rotation=30, ha="right")
    else:
        ax.scatter(x.to_numpy(dtype=float), s, s=8, alpha=0.6, color="#3b6ea8", linewidths=0)
    ax.axhline(0, color="#555", lw=0.8)
    ax.set_xlabel(_short(feature, 60))
    ax.set_ylabel(f"SHAP value of {_short(feature)}")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return _save(fig, path)
