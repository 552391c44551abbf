"""Load a user's model from a safe format only: XGBoost JSON/UBJ, LightGBM text, skops.

Pickle and joblib can run any code while they load, so they are refused by name *and* by content
(a renamed pickle is still a pickle). skops files are opened only after every type they would
create has been checked against an allow-list — never with blanket trust.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from tools.base import ToolError
from tools.shap.model import Fitted

PICKLE_SUFFIXES = (".pkl", ".pickle", ".joblib", ".sav", ".dill", ".pt", ".pth", ".npy")
_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x78\x01", b"\x78\x5e", b"\x78\x9c", b"\x78\xda",
               b"\x28\xb5\x2f\xfd")
_PROTO0_GLOBAL = re.compile(rb"^\(?c[A-Za-z_][\w.]*\n[A-Za-z_][\w.]*\n")
_SKLEARN_CLASS = re.compile(r"^sklearn\.[\w.]+\.[A-Z]\w*$")
_NUMPY_TYPES = {"numpy.ndarray", "numpy.dtype", "numpy.float64", "numpy.float32", "numpy.int64", "numpy.int32",
                "numpy.intc", "numpy.uint8", "numpy.bool_", "numpy.str_", "numpy.random.mtrand.RandomState",
                "numpy.random._mt19937.MT19937", "numpy.random._pickle.__randomstate_ctor", "collections.OrderedDict"}
TREE_MODELS = ("DecisionTree", "RandomForest", "ExtraTrees", "GradientBoosting")
REFUSE = ("{name} looks like a pickle/joblib file. Loading one can run arbitrary code, so I never open them. "
          "Save the model in a safe format instead: XGBoost `model.save_model('model.json')`, LightGBM "
          "`booster.save_model('model.txt')`, or scikit-learn with skops `skops.io.dump(model, 'model.skops')`.")


def looks_like_pickle(head: bytes) -> bool:
    """Pickle protocol 2-5 header, a protocol 0/1 GLOBAL opcode, or a compressed stream (joblib's)."""
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return True
    return bool(_PROTO0_GLOBAL.match(head)) or head.startswith(_COMPRESSED)


def load_model(path: Path, task_hint: str | None) -> Fitted:
    """The model in ``path`` (already resolved inside the allowed roots), or a ``ToolError``."""
    if path.is_dir() or not path.exists():
        raise ToolError("not_found", f"The model file {path.name} does not exist (or is a folder).")
    with path.open("rb") as fh:
        head = fh.read(4096)
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES or looks_like_pickle(head):
        raise ToolError("unsafe_model", REFUSE.format(name=path.name))
    if head.startswith(b"PK"):
        return _load_skops(path)
    if head.startswith(b"tree") or suffix == ".txt":
        return _load_lightgbm(path)
    if head.lstrip().startswith(b"{") or suffix in (".json", ".ubj"):
        return _load_xgboost(path)
    raise ToolError("unsupported_model", f"I can't tell what kind of model {path.name} is. I load XGBoost "
                                         "(.json/.ubj), LightGBM text (.txt) and scikit-learn saved with skops.")


def _load_xgboost(path: Path) -> Fitted:
    import xgboost as xgb

    booster = xgb.Booster(params={"nthread": 1})
    try:
        booster.load_model(str(path))
    except xgb.core.XGBoostError as e:
        why = str(e).splitlines()[0][:200]
        raise ToolError("bad_model", f"{path.name} is not a valid XGBoost model: {why}") from None
    config = json.loads(booster.save_config())
    objective = config["learner"]["objective"]["name"]
    if objective.startswith(("binary:", "multi:")):
        n = int(config["learner"]["learner_model_param"].get("num_class", "0") or 0)
        task, n_classes = "classification", max(n, 2)
    else:
        task, n_classes = "regression", 0
    features = list(booster.feature_names or [])
    return Fitted(kind="xgboost", model=booster, features=features, task=task, classes=list(range(n_classes)),
                  source=path.name, params={"objective": objective, "rounds": booster.num_boosted_rounds()})


def _load_lightgbm(path: Path) -> Fitted:
    try:
        import lightgbm
    except ImportError:
        raise ToolError("not_available", f"{path.name} looks like a LightGBM model, but the lightgbm package is not "
                                         "installed here (pip install lightgbm), or save the model as XGBoost JSON "
                                         "or with skops.") from None
    try:
        booster = lightgbm.Booster(model_file=str(path))
    except lightgbm.basic.LightGBMError as e:
        raise ToolError("bad_model", f"{path.name} is not a valid LightGBM model: {e}") from None
    objective = str(booster.params.get("objective", booster.dump_model().get("objective", "regression")))
    n = int(booster.dump_model().get("num_class", 1))
    task = "classification" if objective.startswith(("binary", "multiclass")) else "regression"
    return Fitted(kind="lightgbm", model=booster, features=list(booster.feature_name()), task=task,
                  classes=list(range(max(n, 2))) if task == "classification" else [], source=path.name,
                  params={"objective": objective})


def _load_skops(path: Path) -> Fitted:
    from skops import io as sio

    try:
        untrusted = sio.get_untrusted_types(file=path)
    except Exception as e:  # skops raises various errors for a damaged or foreign zip
        raise ToolError("bad_model", f"{path.name} is not a valid skops file: {e}") from None
    refused = [t for t in untrusted if not (_SKLEARN_CLASS.match(t) or t in _NUMPY_TYPES)]
    if refused:
        raise ToolError("unsafe_model", f"{path.name} would create types I don't trust: {', '.join(refused[:8])}. "
                                        "I only load scikit-learn estimators and numpy arrays from skops files.")
    try:
        model = sio.load(path, trusted=untrusted)
    except Exception as e:  # a version mismatch or a damaged file; the user must see why
        raise ToolError("bad_model", f"I could not load {path.name}: {e}") from None
    if not hasattr(model, "predict"):
        raise ToolError("bad_model", f"{path.name} holds a {type(model).__name__}, not a model that predicts.")
    task = "classification" if hasattr(model, "predict_proba") and hasattr(model, "classes_") else "regression"
    classes = list(getattr(model, "classes_", [])) if task == "classification" else []
    features = [str(f) for f in getattr(model, "feature_names_in_", [])]
    kind = "sklearn-tree" if type(model).__name__.startswith(TREE_MODELS) else "sklearn"
    return Fitted(kind=kind, model=model, features=features, task=task, classes=classes, source=path.name,
                  params={"estimator": type(model).__name__})
