"""``stackwise eval shap``: does the SHAP reporter find drivers we planted on purpose?

Synthetic sets with known structure (additive effects, an interaction, a pure-noise feature, a
leaky copy of the target, a categorical driver; binary, regression and multiclass). Per set: do the
true drivers rank first, does the noise rank last, is the leak flagged (and nothing flagged where
there is no leak), and do the tool's SHAP values equal ``shap.TreeExplainer`` called directly.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

N_ROWS = 2000


def _sets(n: int = N_ROWS) -> list[dict[str, Any]]:
    import pandas as pd

    rng = np.random.default_rng(42)
    x = {f"x{i}": rng.normal(size=n) for i in range(1, 4)}
    x12 = {"x1": x["x1"], "x2": x["x2"]}  # only the columns a set uses: every other one is noise
    noise = rng.normal(size=n)

    def binary(logit):
        return (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)

    out = []
    y = binary(2.0 * x["x1"] - 1.5 * x["x2"] + 0.3 * x["x3"])
    out.append({"name": "additive (binary)", "drivers": ["x1", "x2"], "leak": None,
                "frame": pd.DataFrame({**x, "noise": noise, "y": y})})
    y = binary(2.5 * x["x1"] * x["x2"] + 0.3 * x["x3"])
    out.append({"name": "interaction x1·x2", "drivers": ["x1", "x2"], "leak": None,
                "frame": pd.DataFrame({**x, "noise": noise, "y": y})})
    y = binary(1.0 * x["x1"] + 0.5 * x["x2"])
    out.append({"name": "leaky copy of target", "drivers": ["leak"], "leak": "leak",
                "frame": pd.DataFrame({**x12, "noise": noise, "leak": y + rng.normal(0, 0.01, n), "y": y})})
    city = rng.choice(["北京", "上海", "Shenzhen", "Hangzhou"], n)
    effect = pd.Series(city).map({"北京": 2.0, "上海": -2.0, "Shenzhen": 0.5, "Hangzhou": -0.5}).to_numpy()
    y = binary(effect + 0.8 * x["x1"])
    out.append({"name": "categorical driver", "drivers": ["city", "x1"], "leak": None,
                "frame": pd.DataFrame({"city": city, "x1": x["x1"], "noise": noise, "y": y})})
    y = 3 * x["x1"] + 2 * x["x2"] ** 2 + 0.5 * x["x3"] + rng.normal(0, 0.5, n)
    out.append({"name": "regression", "drivers": ["x1", "x2"], "leak": None,
                "frame": pd.DataFrame({**x, "noise": noise, "y": y})})
    scores = np.stack([2 * x["x1"], 2 * x["x2"], np.zeros(n)], axis=1) + rng.gumbel(size=(n, 3)) * 0.5
    y = np.array(["red", "green", "blue"])[scores.argmax(axis=1)]
    out.append({"name": "multiclass (3)", "drivers": ["x1", "x2"], "leak": None,
                "frame": pd.DataFrame({**x12, "noise": noise, "y": y})})
    return out


def run_shap_eval(n: int = N_ROWS) -> dict[str, Any]:
    from tools.base import ToolContext
    from tools.shap.explain import import_shap
    from tools.shap.pipeline import analyze
    from tools.shap_report import ShapArgs

    shap = import_shap()

    rows = []
    with tempfile.TemporaryDirectory(prefix="sw-shap-eval-") as tmp:
        root = Path(tmp)
        ctx = ToolContext(home=root / "home", data_roots=(root,))
        for case in _sets(n):
            path = root / f"set{len(rows)}.csv"
            case["frame"].to_csv(path, index=False)
            a = analyze(ShapArgs(data=str(path), target="y"), ctx, draw=False)
            ranked = [r["feature"] for r in a.result["importance"]]
            k = len(case["drivers"])
            direct = np.asarray(shap.TreeExplainer(a.fitted.model).shap_values(a.fitted.dmatrix(a.X)))
            flagged = sorted(a.result["leak_suspects"])
            rows.append({
                "set": case["name"], "task": a.result["task"], "top": ranked[:k],
                "drivers_first": set(ranked[:k]) == set(case["drivers"]),
                "noise_last": ranked[-1] == "noise",
                "leak_ok": flagged == ([case["leak"]] if case["leak"] else []), "flagged": flagged,
                "metric": a.result["metrics"].get("roc_auc") or a.result["metrics"].get("r2"),
                "additivity": a.result["additivity_max_error"],
                "max_diff_vs_shap": float(np.max(np.abs(direct - a.explanation.values))),
            })
    passed = all(r["drivers_first"] and r["noise_last"] and r["leak_ok"] and r["max_diff_vs_shap"] <= 1e-6
                 for r in rows)
    return {"rows": rows, "passed": passed, "n": n}


def format_shap_eval(report: dict) -> str:
    yes = {True: "yes", False: "NO"}
    head = f"{'set':<24}{'task':<16}{'drivers first':<15}{'noise last':<12}{'leak ok':<9}{'AUC/R²':<8}" \
           f"{'additivity':<12}{'|Δ| vs shap':<12}flagged"
    lines = [head]
    for r in report["rows"]:
        lines.append(f"{r['set']:<24}{r['task']:<16}{yes[r['drivers_first']]:<15}{yes[r['noise_last']]:<12}"
                     f"{yes[r['leak_ok']]:<9}{r['metric']:<8.3f}{r['additivity']:<12.1e}{r['max_diff_vs_shap']:<12.1e}"
                     f"{', '.join(r['flagged']) or '-'}")
    lines.append(f"all checks pass: {yes[report['passed']]} ({report['n']} rows per set)")
    return "\n".join(lines)
