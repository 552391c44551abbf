"""Run the stages in order: read → target → model (train or load) → SHAP → ranking → warnings → report.

:func:`analyze` returns an :class:`Analysis` (the model, the explained rows, the SHAP values and the
result dict) so evals and benchmarks can check the numbers; :func:`run` is what the tool calls.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tools.base import ToolContext, ToolError
from tools.paths import resolve_user_path
from tools.shap import data as D
from tools.shap.explain import Explanation, compute_shap, leak_suspects, rank_features
from tools.shap.model import HOLDOUT, Fitted, encode_classes, infer_task, score, train_xgboost

MAX_EXPLAIN = 2000
MAX_EXPLAIN_MODEL_AGNOSTIC = 300
FEW_ROWS = 50
IMBALANCE = 0.1


@dataclass
class Analysis:
    fitted: Fitted
    X: Any                       # the explained rows (features only)
    explanation: Explanation
    result: dict
    timings: dict = field(default_factory=dict)


def _encode_target(table: D.Table, task: str, fitted: Fitted | None, notices: list[str]):
    """(numeric target array, class labels); drops rows whose target can't be used."""
    import pandas as pd

    y = table.y
    if task == "regression":
        values = pd.to_numeric(y, errors="coerce")
        bad = values.isna()
        if bad.all():
            raise ToolError("bad_data", f"The target {table.target!r} has no numeric values to regress on.")
        if bad.any():
            notices.append(f"Dropped {int(bad.sum())} row(s) whose target is not a number.")
            _keep(table, ~bad)
        return values[~bad].to_numpy(dtype=np.float64), []
    if fitted is not None and fitted.classes:
        lookup = {}
        for i, c in enumerate(fitted.classes):
            lookup.update({c: i, str(c): i})
        codes = [lookup.get(v, lookup.get(str(v), lookup.get(str(int(v)) if _integral(v) else None))) for v in y]
        if any(c is None for c in codes):
            unknown = sorted({str(v) for v, c in zip(y, codes, strict=True) if c is None})[:5]
            raise ToolError("bad_data", f"The target has values the model doesn't know: {', '.join(unknown)} "
                                        f"(its classes are {', '.join(map(str, fitted.classes))}).")
        return np.array(codes, dtype=np.int32), list(fitted.classes)
    counts = y.value_counts()
    if len(counts) > D.MAX_CLASSES:
        raise ToolError("invalid_args", f"The target {table.target!r} has {len(counts)} different values — too many "
                                        f"classes (at most {D.MAX_CLASSES}). If it is a number, use task=regression.")
    rare = counts[counts < 2]
    if len(rare) and len(counts) - len(rare) >= 2:
        seen_once = ", ".join(map(str, rare.index))
        notices.append(f"Dropped {int(rare.sum())} row(s) of classes seen only once: {seen_once}.")
        _keep(table, ~y.isin(rare.index))
    return encode_classes(table.y)


def _integral(v) -> bool:
    return isinstance(v, float) and v.is_integer()


def _keep(table: D.Table, mask) -> None:
    table.frame, table.X, table.y = table.frame[mask], table.X[mask], table.y[mask]


def _align(table: D.Table, fitted: Fitted, notices: list[str]):
    """The data's columns in the order the loaded model reads them."""
    import pandas as pd

    if not fitted.features:
        n = fitted.model.num_features() if fitted.kind == "xgboost" else getattr(fitted.model, "n_features_in_", 0)
        if n != table.X.shape[1]:
            raise ToolError("bad_model", f"The model has no feature names and reads {n} columns; the data has "
                                         f"{table.X.shape[1]} feature columns. Save the model with feature names.")
        fitted.features = list(table.X.columns)
        notices.append("The model has no feature names; the data's columns were used in file order.")
    missing = [f for f in fitted.features if D.match_column(f, table.frame.columns) is None]
    if missing:
        raise ToolError("bad_data", f"The model needs column(s) the data lacks: {', '.join(missing[:10])}.")
    X = pd.DataFrame(index=table.frame.index)
    for f in fitted.features:
        col = D.match_column(f, table.frame.columns)
        X[f] = table.X[col] if col in table.X else D._convert(col, table.frame[col], notices)
        if fitted.kind.startswith("sklearn") and isinstance(X[f].dtype, pd.CategoricalDtype):
            raise ToolError("bad_data", f"Column {col!r} is text; this scikit-learn model needs numeric columns.")
    return X


def _row_label(row, table: D.Table):
    """A row index (0-based data row of the file) or a value of an ID-like column → the frame label."""
    if row is None:
        return None
    text = str(row).strip()
    id_cols = [c for c in table.id_columns if c in table.frame] or [table.frame.columns[0]]
    if isinstance(row, str):
        for col in id_cols:
            hits = table.frame.index[table.frame[col].astype(str).str.strip() == text]
            if len(hits):
                return hits[0]
    if text.lstrip("-").isdigit() and int(text) in table.frame.index:
        return int(text)
    raise ToolError("invalid_args", f"There is no row {row!r} in {table.name}: give a 0-based row number "
                                    f"(0–{len(table.frame) - 1}) or a value of {', '.join(map(str, id_cols))}.")


def explain_stage(fitted: Fitted, X, class_names: list[str], background=None):
    """SHAP values and the ranking — the part the benchmark compares with raw ``shap``."""
    ex = compute_shap(fitted, X, background)
    importance, per_class = rank_features(ex, X, fitted.features, class_names)
    return ex, importance, per_class


def analyze(args, ctx: ToolContext, *, draw: bool = True) -> Analysis:
    from tools.shap.report import build_result

    t = {"start": time.perf_counter()}
    notices: list[str] = []
    warns: list[str] = []
    table = D.prepare_table(resolve_user_path(args.data, ctx), args, notices, warns, ctx.lang)
    fitted = None
    if args.model:
        from tools.shap.loaders import load_model

        fitted = load_model(resolve_user_path(args.model, ctx), args.task)
        if args.task and args.task != fitted.task:
            notices.append(f"The model is a {fitted.task} model; task={args.task} was ignored.")
    task = fitted.task if fitted else infer_task(table.y, args.task)
    y, classes = _encode_target(table, task, fitted, notices)
    class_names = [str(c) for c in classes]
    t["read"] = time.perf_counter()
    if fitted is None:
        fitted, split = train_xgboost(table.X, y, task, classes, notices)
        test = split["test"]
        scored_on = f"holdout ({len(test)} rows, {HOLDOUT:.0%} of the data, not used for training)"
    else:
        table.X = _align(table, fitted, notices)
        split, test = None, np.arange(len(table.X))
        scored_on = f"all {len(test)} rows (the model may have been trained on some of them)"
        notices.append("Metrics are on every row of the file, not a holdout: I don't know what the model saw.")
    train_y = y[split["train"]] if split else y
    metrics, baseline = score(task, y[test], fitted.predict_output(table.X.iloc[test]), train_y,
                              max(len(classes), 2))
    t["model"] = time.perf_counter()
    limit = MAX_EXPLAIN if fitted.kind in ("xgboost", "lightgbm", "sklearn-tree") else MAX_EXPLAIN_MODEL_AGNOSTIC
    label = _row_label(args.row, table)
    positions = np.arange(len(table.X))
    if len(positions) > limit:
        positions = np.sort(np.random.default_rng(0).choice(positions, limit, replace=False))
        notices.append(f"SHAP values were computed for a random sample of {limit:,} of {len(table.X):,} rows.")
    if label is not None:
        where = table.X.index.get_loc(label)
        if where not in positions:
            positions = np.sort(np.append(positions, where))
    X_explain = table.X.iloc[positions]
    ex, importance, per_class = explain_stage(fitted, X_explain, class_names, background=table.X)
    y_numeric = y.astype(float) if task == "regression" or len(classes) == 2 else None
    leaks = leak_suspects(importance, metrics, table.X, y_numeric, y if task == "classification" else None)
    t["explain"] = time.perf_counter()
    if len(table.X) < FEW_ROWS:
        warns.append(f"Only {len(table.X)} rows: the model and the ranking are shaky; 50+ rows (better 500+) help.")
    if task == "classification":
        shares = np.bincount(y, minlength=len(classes)) / len(y)
        if shares.min() < IMBALANCE:
            warns.append(f"Imbalanced classes: {class_names[int(shares.argmin())]!r} is only {shares.min():.1%} of "
                         "the rows; accuracy flatters the model, look at F1 and ROC-AUC.")
    for feat, why in leaks.items():
        warns.append(f"Possible leakage: {feat!r} {why}. If it is recorded after the outcome (or is the outcome "
                     "in disguise), drop it with exclude.")
    if ex.additivity_max_error > 1e-3:
        warns.append(f"SHAP additivity check is off by {ex.additivity_max_error:.2g}.")
    state = {"table": table, "task": task, "classes": class_names, "y": y, "metrics": metrics, "baseline": baseline,
             "scored_on": scored_on, "importance": importance, "per_class": per_class, "leaks": leaks,
             "notices": notices, "warnings": warns, "row_label": label, "row_position": None if label is None
             else int(np.flatnonzero(X_explain.index == label)[0])}
    result = build_result(state, fitted, X_explain, ex, ctx, draw=draw, timings=t)
    return Analysis(fitted=fitted, X=X_explain, explanation=ex, result=result, timings=result["timings"])


def run(args, ctx: ToolContext) -> dict:
    return analyze(args, ctx).result
