"""The SHAP reporter's speed: its explain stage vs raw ``shap.TreeExplainer(model).shap_values(X)``
on the same model and rows (plots excluded and included), and a 100,000 × 30 table end to end."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def _table(rows: int, cols: int, path: Path) -> None:
    import pandas as pd

    rng = np.random.default_rng(0)
    data = rng.normal(size=(rows, cols)).round(5)
    logit = data[:, 0] * 1.5 - data[:, 1] + data[:, 2] * data[:, 3] + 0.5 * data[:, 4]
    frame = pd.DataFrame(data, columns=[f"f{i:02d}" for i in range(cols)])
    frame["label"] = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(int)
    frame.to_csv(path, index=False)


def _median_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_shap(rows: int = 100_000, cols: int = 30, repeat: int = 3) -> dict[str, Any]:
    from tools.base import ToolContext
    from tools.shap.explain import import_shap
    from tools.shap.pipeline import analyze, explain_stage
    from tools.shap_report import ShapArgs

    shap = import_shap()

    with tempfile.TemporaryDirectory(prefix="sw-bench-shap-") as tmp:
        root = Path(tmp)
        path = root / "big.csv"
        _table(rows, cols, path)
        ctx = ToolContext(home=root / "home", data_roots=(root,))
        t0 = time.perf_counter()
        a = analyze(ShapArgs(data=str(path), target="label", row=0), ctx)
        end_to_end = time.perf_counter() - t0
        fitted, X = a.fitted, a.X
        raw = _median_time(lambda: shap.TreeExplainer(fitted.model).shap_values(X), repeat)
        ours = _median_time(lambda: explain_stage(fitted, X, []), repeat)
        plots = a.timings["plots_and_report"]
    return {"rows": rows, "cols": cols, "explained_rows": len(X), "raw_s": raw, "tool_explain_s": ours,
            "ratio_no_plots": ours / raw, "ratio_with_plots": (ours + plots) / raw, "plots_and_report_s": plots,
            "end_to_end_s": end_to_end, "stages": a.timings}
