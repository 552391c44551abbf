"""``shap_report``: a SHAP explainability report for a CSV/Parquet file.

Declared now so the brain can route and fill its args; the reporter arrives with the
explainability issue.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tools.base import not_available, tool


class ShapArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data: str = Field(min_length=1, max_length=500, description="CSV or Parquet file in the allowed roots.")
    target: str | None = Field(None, max_length=200, description="The column to explain.")
    model: str | None = Field(
        None, max_length=500, description="Optional model file (XGBoost JSON/UBJ, LightGBM text, skops)."
    )
    row: int | str | None = Field(None, description="A row index or row id for a local explanation.")
    task: Literal["classification", "regression"] | None = Field(None, description="Inferred when absent.")
    features: list[str] | None = Field(None, description="Only these feature columns.")


@tool(
    args=ShapArgs,
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
def shap_report(args: ShapArgs, ctx) -> dict:
    """Train (or load) a model on a CSV and report which features drive its predictions, with
    SHAP plots, metrics and a plain-language narrative."""
    return not_available("shap_report", "it arrives with the explainability issue")(args, ctx)
