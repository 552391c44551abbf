"""``explain_concept``: grounded, cited explanations from the knowledge base.

Declared now so the brain can route to it; the knowledge base and cards arrive with the
knowledge-base issue.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tools.base import not_available, tool
from tools.topics import TOPIC_TERMS


class ExplainArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query: str = Field(min_length=1, max_length=2000, description="The concept or question.")
    lang: Literal["auto", "zh", "en"] = Field("auto", description="Answer language.")


@tool(
    args=ExplainArgs,
    keywords=("what is", "explain", "how does", "meaning", "eli5", "什么是", "解释", "介绍", "原理", "区别", "科普",
              *TOPIC_TERMS),
    exemplars={
        "en": [
            "what is QLoRA?",
            "explain attention in transformers",
            "how does LoRA work",
            "what's the difference between PPO and DQN",
            "tell me about SHAP values",
            "what does vLLM do",
            "explain knowledge distillation simply",
            "what is RAG and when should I use it",
            "how do embeddings work",
            "what is XGBoost",
            "define YOLO",
        ],
        "zh": [
            "什么是 QLoRA？",
            "解释一下注意力机制",
            "LoRA 的原理是什么",
            "PPO 和 DQN 有什么区别",
            "介绍一下 SHAP",
            "vLLM 是干什么的",
            "知识蒸馏是什么意思",
            "什么是检索增强生成",
            "嵌入向量是怎么工作的",
        ],
    },
)
def explain_concept(args: ExplainArgs, ctx) -> dict:
    """Explain an AI-stack concept (LoRA, attention, SHAP, PPO, RAG, vLLM …) with citations
    from the knowledge base."""
    return not_available("explain_concept", "it arrives with the knowledge-base issue")(args, ctx)
