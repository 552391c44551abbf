"""``shap_report``: a SHAP explainability report for a CSV/Parquet file (the declaration).

The work lives in :mod:`tools.shap`; shap, xgboost and pandas load only when the tool runs, so the
registry (and every ``stackwise ask``) stays fast.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tools.base import ToolContext, tool
from tools.shap.narrative import render


class ShapArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data: str = Field(min_length=1, max_length=500, description="CSV or Parquet file in the allowed roots.")
    target: str | None = Field(None, max_length=200, description="The column to explain.")
    model: str | None = Field(
        None, max_length=500, description="Optional model file (XGBoost JSON/UBJ, LightGBM text, skops)."
    )
    row: int | str | None = Field(None, description="A row index or row id for a local explanation.")
    task: Literal["classification", "regression"] | None = Field(None, description="Inferred when absent.")
    features: list[str] | None = Field(None, max_length=2000, description="Only these feature columns.")
    exclude: list[str] | None = Field(None, max_length=2000, description="Leave these columns out.")
    encoding: str | None = Field(None, max_length=40, description="Text encoding (detected when absent).")
    delimiter: str | None = Field(None, min_length=1, max_length=1, description="CSV delimiter (detected).")
    decimal: Literal[".", ","] | None = Field(None, description="Decimal mark (detected).")


@tool(
    args=ShapArgs,
    render=render,
    keywords=("shap", "feature importance", "features", "drive", "explain the model",
              "特征", "影响", "重要性", "可解释"),
    exemplars={
        "en": [
            "which features drive churn in churn.csv?",
            "make a SHAP report for sales.csv with target revenue",
            "explain the model on data.csv predicting price",
            "what are the most important features for target in train.csv",
            "why does the model predict default for row 12 of loans.csv",
            "run shap on my csv",
            "feature importance for house_prices.parquet, target SalePrice",
        ],
        "zh": [
            "sales.csv 里哪些特征对 revenue 影响最大？",
            "给 churn.csv 做一个 SHAP 报告，目标列是 churn",
            "分析 data.csv 中哪些特征最重要",
            "解释模型为什么对第 5 行做出这个预测",
            "用 SHAP 分析 loans.csv",
            "特征重要性分析，目标是 price",
        ],
    },
)
def shap_report(args: ShapArgs, ctx: ToolContext) -> dict:
    """Train (or load) a model on a CSV and report which features drive its predictions, with
    SHAP plots, metrics and a plain-language narrative."""
    from tools.shap.pipeline import run

    return run(args, ctx)
