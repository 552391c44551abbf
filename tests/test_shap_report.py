"""shap_report end to end, as users see it: tool-call records, the answer, the files it writes."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tools.base import ToolContext
from tools.registry import ToolRegistry


def churn_frame(n: int = 300, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    tenure = rng.integers(1, 72, n)
    charges = rng.normal(70, 20, n).round(2)
    contract = rng.choice(["month", "year", "two-year"], n)
    logit = -0.08 * tenure + 0.04 * (charges - 70) + np.where(contract == "month", 1.0, -0.5) + 1.5
    churn = np.where(rng.random(n) < 1 / (1 + np.exp(-logit)), "Yes", "No")
    return pd.DataFrame({"customer_id": [f"C{i:05d}" for i in range(n)], "tenure": tenure,
                         "monthly_charges": charges, "contract": contract, "noise": rng.normal(size=n),
                         "churn": churn})


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shap-data")
    churn_frame().to_csv(root / "churn.csv", index=False)
    return root


@pytest.fixture(scope="module")
def registry() -> ToolRegistry:
    return ToolRegistry.default(plugins=False)


@pytest.fixture(scope="module")
def module_ctx(data_dir, tmp_path_factory) -> ToolContext:
    return ToolContext(home=tmp_path_factory.mktemp("shap-home"), data_roots=(data_dir,))


@pytest.fixture(scope="module")
def churn(registry, module_ctx) -> dict:
    record = registry.call("shap_report", {"data": "churn.csv", "target": "churn", "row": 7}, module_ctx)
    assert record["ok"], record["error"]
    return record["result"]


@pytest.fixture
def ctx(tmp_path) -> ToolContext:
    return ToolContext(home=tmp_path / "home", data_roots=(tmp_path,))


def failed(record: dict, kind: str | None = None) -> str:
    assert record["ok"] is False, record
    if kind:
        assert record["error"]["type"] == kind, record["error"]
    return record["error"]["message"]


# --- the report ------------------------------------------------------------------------------------

def test_churn_report_ranks_drivers_and_scores_against_a_baseline(churn):
    ranked = [r["feature"] for r in churn["importance"]]
    assert ranked[0] == "tenure" and ranked[-1] == "noise"
    assert "customer_id" not in churn["features"]                    # ID-like, dropped with a notice
    assert any("customer_id" in n for n in churn["notices"])
    tenure = churn["importance"][0]
    assert tenure["direction"] == "down" and tenure["mean_abs_shap"] > 0
    assert churn["task"] == "classification" and churn["positive_class"] == "Yes"
    assert churn["metrics"]["roc_auc"] > churn["baseline"]["roc_auc"] == 0.5
    assert churn["additivity_max_error"] < 1e-4
    assert "lower tenure are more likely to have churn = Yes" in churn["summary"]
    json.dumps(churn)                                                # the result is plain JSON


def test_report_files_are_self_contained_and_attached(churn, module_ctx):
    html = Path(churn["report"])
    assert html.parent.parent.parent.parent == module_ctx.reports_dir
    page = html.read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == 4 and "src='beeswarm" not in page
    assert "## Feature ranking" in Path(churn["report_md"]).read_text(encoding="utf-8")
    kinds = {(a["kind"], Path(a["path"]).suffix) for a in churn["attachments"]}
    assert kinds == {("image", ".png"), ("file", ".html"), ("file", ".md")}
    assert set(churn["plots"]) == {"beeswarm", "bar", "waterfall", "dependence"}
    from matplotlib.image import imread

    assert imread(churn["plots"]["beeswarm"]).shape[1] == 900


def test_local_explanation_of_the_requested_row(churn):
    local = churn["local"]
    assert local["row"] == "7" and local["prediction"].startswith("P(Yes) = ")
    assert local["base"] + sum(c["shap"] for c in local["contributions"]) == pytest.approx(local["output"], abs=1e-4)


def test_render_in_english_and_chinese(registry, churn):
    render = registry.get("shap_report").render
    en, zh = render(churn, "en"), render(churn, "zh")
    assert "tenure" in en and "baseline" in en and churn["report"] in en
    assert "可能性越大" in zh and "基线" in zh and churn["report"] in zh


def test_chinese_columns_gbk_semicolons_and_decimal_commas(registry, ctx, tmp_path):
    rng = np.random.default_rng(1)
    n = 200
    area = rng.uniform(30, 150, n)
    district = rng.choice(["朝阳", "海淀", "通州"], n)
    price = area * 1.5 + pd.Series(district).map({"朝阳": 40, "海淀": 60, "通州": 0}).to_numpy() + rng.normal(0, 5, n)
    frame = pd.DataFrame({"面积": area.round(2), "区域": district, "噪声": rng.normal(size=n), "房价": price.round(2)})
    (tmp_path / "房价.csv").write_bytes(frame.to_csv(index=False, sep=";", decimal=",").encode("gbk"))
    ctx.lang = "zh"
    record = registry.call("shap_report", {"data": "房价.csv", "target": "房价"}, ctx)
    assert record["ok"], record["error"]
    result = record["result"]
    assert result["task"] == "regression" and result["settings"]["read"]["encoding"] == "gb18030"
    assert result["settings"]["read"]["decimal"] == ","
    assert [r["feature"] for r in result["importance"]][:2] == ["面积", "区域"]
    assert result["metrics"]["r2"] > 0.8 > result["baseline"]["r2"]
    assert "面积" in result["summary"] and "越高" in result["summary"]


def test_mixed_types_multiclass_and_utf8_bom(registry, ctx, tmp_path):
    rng = np.random.default_rng(2)
    n = 240
    x = rng.normal(size=n)
    label = np.where(x > 0.5, "high", np.where(x < -0.5, "low", "mid"))
    mixed = [("?" if i % 40 == 0 else f"{v:.3f}") for i, v in enumerate(x)]
    pd.DataFrame({"score": mixed, "other": rng.normal(size=n), "label": label}).to_csv(
        tmp_path / "m.csv", index=False, encoding="utf-8-sig")
    result = registry.call("shap_report", {"data": "m.csv", "target": "label"}, ctx)["result"]
    assert any("non-numeric" in n and "'?'" in n for n in result["notices"])
    assert result["importance"][0]["feature"] == "score" and result["importance"][0]["direction"] == "by class"
    assert set(result["importance_by_class"]) == {"high", "low", "mid"}
    assert result["metrics"]["accuracy"] > 0.8


# --- bad input: a clear ToolError, nothing written ----------------------------------------------

def test_missing_or_unknown_target_asks_which_column(registry, module_ctx):
    msg = failed(registry.call("shap_report", {"data": "churn.csv"}, module_ctx), "missing_target")
    assert "tenure" in msg and "churn" in msg and "?" in msg
    msg = failed(registry.call("shap_report", {"data": "churn.csv", "target": "revenue"}, module_ctx), "unknown_target")
    assert "revenue" in msg and "monthly_charges" in msg and "Which one is the target?" in msg


@pytest.mark.parametrize(("data", "kind"), [("nope.csv", "not_found"), ("/etc/passwd", "forbidden_path"),
                                            ("../../x.csv", "forbidden_path")])
def test_missing_and_forbidden_paths(registry, tmp_path, data, kind):
    ctx = ToolContext(home=tmp_path / "home", data_roots=(tmp_path / "data",))
    (tmp_path / "x.csv").write_text("a,y\n1,2\n")
    failed(registry.call("shap_report", {"data": data, "target": "y"}, ctx), kind)


@pytest.mark.parametrize(("content", "kind", "words"), [
    (b"", "bad_data", "empty"),
    (b"a,b,y\n", "bad_data", "no data rows"),
    (b"a,b,y\n1,2,3\n", "too_small", "at least"),
    (bytes(range(256)) * 40, "bad_data", "binary"),
    (b"a,y\n" + b"".join(b"%d,1\n" % i for i in range(30)), "bad_data", "same value"),
    (b"a,y\n" + b"".join(b"%d,\n" % i for i in range(30)), "bad_data", "no values"),
])
def test_bad_files_are_refused_clearly(registry, ctx, tmp_path, content, kind, words):
    (tmp_path / "bad.csv").write_bytes(content)
    msg = failed(registry.call("shap_report", {"data": "bad.csv", "target": "y"}, ctx), kind)
    assert words in msg
    assert not ctx.reports_dir.exists()


def test_ten_thousand_columns_is_too_large(registry, ctx, tmp_path):
    header = ",".join(f"c{i}" for i in range(10_000))
    (tmp_path / "wide.csv").write_text(header + "\n" + ",".join("1" for _ in range(10_000)) + "\n")
    msg = failed(registry.call("shap_report", {"data": "wide.csv", "target": "c0"}, ctx), "too_large")
    assert "10,000 columns" in msg and "2,000" in msg


class _CreatesFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("name", ["model.pkl", "model.joblib", "model.json", "model.skops"])
def test_pickle_models_are_refused_and_never_unpickled(registry, data_dir, tmp_path, name):
    ctx = ToolContext(home=tmp_path / "home", data_roots=(data_dir, tmp_path))
    sentinel = tmp_path / "pwned.txt"
    (tmp_path / name).write_bytes(pickle.dumps(_CreatesFile(str(sentinel))))
    msg = failed(registry.call("shap_report", {"data": "churn.csv", "target": "churn", "model": name}, ctx),
                 "unsafe_model")
    assert "pickle" in msg and "skops" in msg
    assert not sentinel.exists()
    failed(registry.call("shap_report", {"data": "churn.csv", "target": "churn", "model": "/etc/hostname"}, ctx),
           "forbidden_path")


# --- user models in safe formats -----------------------------------------------------------------

def test_an_xgboost_json_model_is_explained_exactly(registry, data_dir, tmp_path):
    import xgboost as xgb

    from tools.shap.explain import import_shap

    shap = import_shap()
    frame = churn_frame()
    X = frame[["tenure", "monthly_charges", "noise"]]
    booster = xgb.train({"objective": "binary:logistic", "nthread": 1, "max_depth": 3},
                        xgb.DMatrix(X, label=(frame.churn == "Yes").astype(int)), 30)
    booster.save_model(str(tmp_path / "m.json"))
    frame.assign(churn=(frame.churn == "Yes").astype(int)).to_csv(tmp_path / "c.csv", index=False)
    ctx = ToolContext(home=tmp_path / "home", data_roots=(tmp_path,))
    result = registry.call("shap_report", {"data": "c.csv", "target": "churn", "model": "m.json"}, ctx)["result"]
    assert result["model"]["source"] == "m.json" and result["features"] == list(X.columns)
    assert any("not a holdout" in n for n in result["notices"])
    direct = shap.TreeExplainer(booster).shap_values(X)
    ours = {r["feature"]: r["mean_abs_shap"] for r in result["importance"]}
    for j, feat in enumerate(X.columns):
        assert ours[feat] == pytest.approx(np.abs(direct[:, j]).mean(), abs=1e-6)


def test_skops_model_uses_a_sampled_background_and_untrusted_types_are_refused(registry, tmp_path):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import FunctionTransformer
    from skops import io as sio

    frame = churn_frame(150)
    X = frame[["tenure", "monthly_charges"]]
    sio.dump(LogisticRegression(max_iter=500).fit(X, frame.churn), tmp_path / "lr.skops")
    frame.to_csv(tmp_path / "c.csv", index=False)
    ctx = ToolContext(home=tmp_path / "home", data_roots=(tmp_path,))
    record = registry.call("shap_report", {"data": "c.csv", "target": "churn", "model": "lr.skops"}, ctx)
    assert record["ok"], record["error"]
    result = record["result"]
    assert result["settings"]["explainer"] == "ExactExplainer"
    assert 100 <= result["settings"]["background_rows"] <= 1000 and result["additivity_max_error"] < 1e-6
    assert result["importance"][0]["feature"] == "tenure"
    sio.dump(FunctionTransformer(func=eval), tmp_path / "f.skops")
    msg = failed(registry.call("shap_report", {"data": "c.csv", "target": "churn", "model": "f.skops"}, ctx),
                 "unsafe_model")
    assert "builtins.eval" in msg


# --- through the agent --------------------------------------------------------------------------

def test_the_bot_answers_a_shap_question_with_the_narrative_and_the_report(data_dir, stackwise_home):
    from agent import Agent
    from agent.settings import Settings

    agent = Agent.from_settings(Settings.from_env({"STACKWISE_HOME": str(stackwise_home),
                                                   "STACKWISE_DATA_ROOTS": str(data_dir)}))
    try:
        reply = agent.ask("which features drive churn in churn.csv?", thread_id="shap-e2e")
    finally:
        agent.close()
    [call] = reply.tool_calls
    assert call.tool == "shap_report" and call.ok, call
    assert call.args == {"data": "churn.csv", "target": "churn"}
    assert call.result["summary"].split(".")[0] in reply.answer
    assert "tenure" in reply.answer and call.result["report"] in reply.answer
    suffixes = {Path(a.path).suffix for a in reply.attachments}
    assert {".png", ".html"} <= suffixes
