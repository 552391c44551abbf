"""Train the default model (XGBoost, holdout split, early stopping) and score it against a baseline.

A :class:`Fitted` model is what the rest of the pipeline needs from any model, trained here or
loaded by :mod:`tools.shap.loaders`: which columns it reads, its task and classes, how to explain
it, and its raw output (the margin SHAP values add up to).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tools.base import ToolError

MAX_TRAIN_ROWS = 200_000
HOLDOUT = 0.2
MAX_ROUNDS = 300
EARLY_STOP = 30
XGB_PARAMS = {"eta": 0.1, "max_depth": 4, "min_child_weight": 1.0, "subsample": 0.9, "lambda": 1.0,
              "tree_method": "hist", "max_cat_to_onehot": 4, "nthread": 1, "seed": 0}


@dataclass
class Fitted:
    """A model ready to explain. ``kind``: xgboost, lightgbm, sklearn-tree or sklearn."""

    kind: str
    model: Any
    features: list[str]
    task: str
    classes: list[Any] = field(default_factory=list)     # original labels, index = class code
    source: str = "trained"
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def n_outputs(self) -> int:
        return len(self.classes) if self.task == "classification" and len(self.classes) > 2 else 1

    def dmatrix(self, X):
        import xgboost as xgb

        return xgb.DMatrix(X[self.features], enable_categorical=True, nthread=1)

    def margin(self, X) -> np.ndarray:
        """The raw output SHAP values explain: log-odds (per class) for XGBoost classifiers, else the prediction."""
        if self.kind == "xgboost":
            return self.model.predict(self.dmatrix(X), output_margin=True)
        if self.kind == "lightgbm":
            return self.model.predict(X[self.features], raw_score=True)
        return self.predict_output(X)

    def predict_output(self, X) -> np.ndarray:
        """Probabilities (classification) or values (regression) — what metrics are computed from."""
        if self.kind == "xgboost":
            return self.model.predict(self.dmatrix(X))
        if self.kind == "lightgbm":
            return self.model.predict(X[self.features])
        data = X[self.features]
        if self.task == "classification":
            proba = self.model.predict_proba(data)
            return proba[:, 1] if proba.shape[1] == 2 else proba
        return self.model.predict(data)


def encode_classes(y) -> tuple[np.ndarray, list[Any]]:
    """Class codes 0..k-1 in sorted label order (so "No" < "Yes" and 0 < 1: the positive class is last)."""
    values = y.to_numpy()
    try:
        classes = sorted(set(values.tolist()))
    except TypeError:
        classes = sorted(set(values.tolist()), key=str)
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index[v] for v in values.tolist()], dtype=np.int32), classes


def holdout_split(y_codes: np.ndarray | None, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Train/test row positions; stratified by class when there are classes."""
    rng = np.random.default_rng(seed)
    test: list[np.ndarray] = []
    groups = [np.arange(n)] if y_codes is None else [np.flatnonzero(y_codes == c) for c in np.unique(y_codes)]
    for idx in groups:
        idx = rng.permutation(idx)
        k = int(round(len(idx) * HOLDOUT)) if len(idx) >= 2 else 0
        test.append(idx[:max(k, 1 if len(idx) >= 2 else 0)])
    test_idx = np.sort(np.concatenate(test))
    train_idx = np.setdiff1d(np.arange(n), test_idx)
    return train_idx, test_idx


def train_xgboost(X, target_values: np.ndarray, task: str, classes: list, notices: list[str]) -> tuple[Fitted, dict]:
    """Fit XGBoost with a 20% holdout; returns the model and the holdout split used."""
    import xgboost as xgb

    n = len(X)
    codes = target_values if task == "classification" else None
    train_idx, test_idx = holdout_split(codes, n)
    rng = np.random.default_rng(1)
    if len(train_idx) > MAX_TRAIN_ROWS:
        train_idx = np.sort(rng.choice(train_idx, MAX_TRAIN_ROWS, replace=False))
        notices.append(f"Trained on a random sample of {MAX_TRAIN_ROWS:,} rows (of {n:,}).")
    params = dict(XGB_PARAMS)
    if task == "classification" and len(classes) > 2:
        params.update(objective="multi:softprob", num_class=len(classes), eval_metric="mlogloss")
    elif task == "classification":
        params.update(objective="binary:logistic", eval_metric="logloss")
    else:
        params.update(objective="reg:squarederror", eval_metric="rmse")
    # Early stopping on a slice of the training rows, never on the holdout the metrics come from.
    fit_idx, stop_idx = train_idx, None
    if len(train_idx) >= 100:
        inner_train, inner_stop = holdout_split(codes[train_idx] if codes is not None else None, len(train_idx), 2)
        fit_idx, stop_idx = train_idx[inner_train], train_idx[inner_stop]
    dfit = xgb.DMatrix(X.iloc[fit_idx], label=target_values[fit_idx], enable_categorical=True, nthread=1)
    evals = []
    if stop_idx is not None:
        evals = [(xgb.DMatrix(X.iloc[stop_idx], label=target_values[stop_idx], enable_categorical=True,
                              nthread=1), "stop")]
    booster = xgb.train(params, dfit, num_boost_round=MAX_ROUNDS, evals=evals, verbose_eval=False,
                        early_stopping_rounds=EARLY_STOP if evals else None)
    rounds = booster.best_iteration + 1 if evals else MAX_ROUNDS
    booster = booster[:rounds]
    params.update(num_boost_round=rounds, early_stopping_rounds=EARLY_STOP if evals else None)
    fitted = Fitted(kind="xgboost", model=booster, features=[str(c) for c in X.columns], task=task,
                    classes=classes, params=params)
    return fitted, {"train": train_idx, "test": test_idx}


def score(task: str, y_true: np.ndarray, output: np.ndarray, train_y: np.ndarray,
          n_classes: int) -> tuple[dict, dict]:
    """(model metrics, trivial-baseline metrics) on the same rows."""
    from sklearn import metrics as m

    if task == "regression":
        mean = float(np.mean(train_y))
        base = np.full(len(y_true), mean)
        return ({"r2": float(m.r2_score(y_true, output)), "mae": float(m.mean_absolute_error(y_true, output))},
                {"r2": float(m.r2_score(y_true, base)), "mae": float(m.mean_absolute_error(y_true, base)),
                 "kind": "mean of the training target"})
    majority = int(np.bincount(train_y.astype(int), minlength=n_classes).argmax())
    base_pred = np.full(len(y_true), majority)
    if n_classes == 2:
        pred, avg = (output >= 0.5).astype(int), "binary"
    else:
        pred, avg = output.argmax(axis=1), "macro"
    labels = list(range(n_classes))
    model = {"accuracy": float(m.accuracy_score(y_true, pred)),
             "f1": float(m.f1_score(y_true, pred, average=avg, labels=labels if avg == "macro" else None,
                                    zero_division=0)),
             "roc_auc": _auc(y_true, output, n_classes)}
    baseline = {"accuracy": float(m.accuracy_score(y_true, base_pred)),
                "f1": float(m.f1_score(y_true, base_pred, average=avg, labels=labels if avg == "macro" else None,
                                       zero_division=0)),
                "roc_auc": 0.5 if model["roc_auc"] is not None else None, "kind": "always the majority class"}
    return model, baseline


def _auc(y_true: np.ndarray, output: np.ndarray, n_classes: int) -> float | None:
    from sklearn.metrics import roc_auc_score

    if len(np.unique(y_true)) < n_classes:
        return None          # AUC needs every class in the scored rows
    if n_classes == 2:
        return float(roc_auc_score(y_true, output))
    return float(roc_auc_score(y_true, output, multi_class="ovr", average="macro"))


def infer_task(y, task: str | None) -> str:
    """``classification`` or ``regression``: text, booleans and few integer values are classes."""
    import pandas as pd

    numeric = pd.api.types.is_numeric_dtype(y) and not pd.api.types.is_bool_dtype(y)
    if task == "regression":
        if not numeric:
            values = pd.to_numeric(y, errors="coerce")
            if values.isna().mean() > 0.1:
                raise ToolError("invalid_args", f"The target {y.name!r} is not numeric, so it can't be a regression "
                                                "target; use task=classification.")
        return task
    if task == "classification" or not numeric:
        return "classification"
    values = y.to_numpy(dtype="float64")
    integral = bool(np.all(np.mod(values, 1) == 0))
    return "classification" if y.nunique() <= 2 or (integral and y.nunique() <= 10) else "regression"
