"""SHAP values, the additivity check, the mean |SHAP| ranking with direction, and leakage signals.

Tree models (XGBoost, LightGBM, scikit-learn trees) use ``shap.TreeExplainer`` (exact, one
thread); any other model uses the exact (≤ 8 features) or permutation explainer against a sampled background of
100–1,000 rows. Values are in the model's raw output: log-odds for boosted classifiers.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from tools.shap.model import Fitted

BACKGROUND_ROWS = 100          # within the 100–1,000 the report promises
EXACT_MAX_FEATURES = 8
DIRECTION_CUTOFF = 0.3         # |rank correlation| below this: "mixed"
LEAK_SHARE = 0.6
LEAK_CORR = 0.98


@dataclass
class Explanation:
    values: np.ndarray          # (rows, features) or (rows, features, classes)
    base: np.ndarray            # () or (classes,)
    method: str
    output: str                 # what the values add up to
    additivity_max_error: float
    background_rows: int | None = None


def import_shap():
    """``import shap``, quietly: its import trips matplotlib deprecation warnings we can't fix."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        import shap
    return shap


def compute_shap(fitted: Fitted, X, background=None) -> Explanation:
    """Explain the rows of ``X`` (a DataFrame with at least ``fitted.features``)."""
    shap = import_shap()
    data = X[fitted.features]
    if fitted.kind == "xgboost":
        explainer = shap.TreeExplainer(fitted.model)
        dm = fitted.dmatrix(data)
        values = np.asarray(explainer.shap_values(dm, check_additivity=False))
        raw = fitted.model.predict(dm, output_margin=True)
        out = "log-odds" if fitted.task == "classification" else "value"
        return _checked(values, explainer.expected_value, raw, "TreeExplainer (exact, XGBoost)", out)
    if fitted.kind in ("lightgbm", "sklearn-tree"):
        explainer = shap.TreeExplainer(fitted.model)
        values = np.asarray(explainer.shap_values(data, check_additivity=False))
        raw = fitted.margin(data) if fitted.kind == "lightgbm" else explainer.model.predict(data.to_numpy())
        base, raw = explainer.expected_value, np.asarray(raw)
        if values.ndim == 3 and values.shape[2] == 2:        # a binary classifier: explain the positive class
            values, base = values[..., 1], np.asarray(base).reshape(-1)[1]
            raw = raw[:, 1] if raw.ndim == 2 else raw
        out = "log-odds" if fitted.kind == "lightgbm" and fitted.task == "classification" else "model output"
        return _checked(values, base, raw, f"TreeExplainer (exact, {type(fitted.model).__name__})", out)
    return _permutation(fitted, data, background)


def _permutation(fitted: Fitted, data, background) -> Explanation:
    import pandas as pd

    shap = import_shap()
    bg = (background if background is not None else data)[fitted.features]
    if len(bg) > BACKGROUND_ROWS:
        bg = bg.sample(BACKGROUND_ROWS, random_state=0)

    def f(a):
        return fitted.predict_output(pd.DataFrame(a, columns=fitted.features))

    masker = shap.maskers.Independent(bg.to_numpy(), max_samples=len(bg))
    n = len(fitted.features)
    if n <= EXACT_MAX_FEATURES:          # 2^n coalitions: exact and cheaper than sampling permutations
        explainer, name = shap.explainers.Exact(f, masker), "ExactExplainer"
        result = explainer(data.to_numpy(), silent=True)
    else:
        explainer, name = shap.PermutationExplainer(f, masker), "PermutationExplainer"
        result = explainer(data.to_numpy(), max_evals=4 * (2 * n + 1), silent=True)
    base = np.asarray(result.base_values)
    error = float(np.max(np.abs(result.values.sum(axis=1) + base - f(data.to_numpy()))))
    return Explanation(values=np.asarray(result.values), base=base.mean(axis=0), method=name,
                       output="probability" if fitted.task == "classification" else "value",
                       additivity_max_error=error, background_rows=len(bg))


def _checked(values, base, raw, method: str, output: str) -> Explanation:
    base = np.asarray(base, dtype=np.float64)
    raw = np.asarray(raw, dtype=np.float64)
    total = values.sum(axis=1) + base
    error = float(np.max(np.abs(total - raw.reshape(total.shape)))) if total.size else 0.0
    return Explanation(values=values, base=base, method=method, output=output, additivity_max_error=error)


def _direction(x, s) -> tuple[str, dict]:
    """Does a higher value push the output up or down? Spearman correlation of value and SHAP value."""
    import pandas as pd

    if isinstance(x.dtype, pd.CategoricalDtype):
        means = pd.Series(s, index=x.index).groupby(x.astype(object).fillna("(missing)"), observed=True).mean()
        if means.empty:
            return "mixed", {}
        return "by category", {"highest": str(means.idxmax()), "lowest": str(means.idxmin())}
    ok = x.notna().to_numpy()
    if ok.sum() < 3 or np.std(x[ok]) == 0 or np.std(s[ok]) == 0:
        return "mixed", {}
    corr = float(pd.Series(x[ok].to_numpy()).corr(pd.Series(s[ok]), method="spearman"))
    word = "up" if corr >= DIRECTION_CUTOFF else "down" if corr <= -DIRECTION_CUTOFF else "mixed"
    return word, {"correlation": round(corr, 3)}


def rank_features(ex: Explanation, X, features: list[str], class_names: list[str]) -> tuple[list, dict]:
    """(overall ranking, per-class ranking for multiclass). mean |SHAP| per feature, largest first."""
    data = X[features]
    per_class: dict[str, list] = {}
    if ex.values.ndim == 3:
        for k, name in enumerate(class_names):
            per_class[name] = _ranking(ex.values[:, :, k], data, features)
        overall = np.abs(ex.values).mean(axis=(0, 2))
        rows = [{"feature": f, "mean_abs_shap": float(v), "direction": "by class"}
                for f, v in zip(features, overall, strict=True)]
        return sorted(rows, key=lambda r: -r["mean_abs_shap"]), per_class
    return _ranking(ex.values, data, features), per_class


def _ranking(values: np.ndarray, data, features: list[str]) -> list[dict]:
    mean_abs = np.abs(values).mean(axis=0)
    rows = []
    for j, feat in enumerate(features):
        direction, detail = _direction(data[feat], values[:, j])
        rows.append({"feature": feat, "mean_abs_shap": float(mean_abs[j]), "direction": direction, **detail})
    return sorted(rows, key=lambda r: -r["mean_abs_shap"])


def leak_suspects(importance: list[dict], metrics: dict, X, y_numeric: np.ndarray | None,
                  y_codes: np.ndarray | None) -> dict[str, str]:
    """Features that look like they contain the answer → {feature: why}."""
    import pandas as pd

    out: dict[str, str] = {}
    total = sum(r["mean_abs_shap"] for r in importance) or 1.0
    share = importance[0]["mean_abs_shap"] / total if importance else 0.0
    near_perfect = (metrics.get("accuracy", 0) >= 0.99 or (metrics.get("roc_auc") or 0) >= 0.995
                    or metrics.get("r2", 0) >= 0.99)
    if share > LEAK_SHARE and near_perfect:
        out[importance[0]["feature"]] = f"carries {share:.0%} of all SHAP importance and the holdout score is " \
                                        "near perfect"
    for feat in X.columns:
        x = X[feat]
        if isinstance(x.dtype, pd.CategoricalDtype):
            if y_codes is None or x.isna().mean() > 0.5 or x.nunique() >= 0.5 * len(x):
                continue
            table = pd.crosstab(x.astype(object), y_codes)
            purity = float(table.max(axis=1).sum() / max(table.to_numpy().sum(), 1))
            if purity >= 0.995:
                out.setdefault(str(feat), f"its categories determine the target almost exactly ({purity:.1%})")
        elif y_numeric is not None:
            ok = x.notna().to_numpy()
            if ok.sum() > 10 and np.std(x[ok]) > 0:
                corr = float(np.corrcoef(x[ok].to_numpy(dtype=float), y_numeric[ok])[0, 1])
                if abs(corr) >= LEAK_CORR:
                    out.setdefault(str(feat), f"its correlation with the target is {corr:+.3f}")
    return out
