"""``embedding_distance``: cosine / Euclidean / dot / Manhattan between texts, explained."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tools.base import ToolContext, ToolError, tool

MAX_TEXTS = 64
MAX_CHARS = 2000
Metric = Literal["cosine", "euclidean", "dot", "manhattan"]


class DistanceArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    texts: list[str] = Field(description=f"2–{MAX_TEXTS} texts, each at most {MAX_CHARS} characters.")
    model: str | None = Field(
        None, max_length=500,
        description="Embedding model: all-MiniLM-L6-v2, use-multilingual, or any sentence-transformers id/path.",
    )
    metrics: list[Metric] | None = Field(None, description="Which metrics to report (default: all four).")

    @field_validator("texts")
    @classmethod
    def _texts(cls, v: list[str]) -> list[str]:
        if len(v) < 2:
            raise ValueError(f"give at least 2 texts to compare (got {len(v)})")
        if len(v) > MAX_TEXTS:
            raise ValueError(f"at most {MAX_TEXTS} texts per call (got {len(v)})")
        for i, t in enumerate(v):
            if not t.strip():
                raise ValueError(f"text {i + 1} is empty")
            if len(t) > MAX_CHARS:
                raise ValueError(f"text {i + 1} has {len(t)} characters; the limit is {MAX_CHARS}")
        return v


EXEMPLARS = {
    "en": [
        "how similar are 'king' and 'queen'?",
        "cosine similarity between \"cat\" and \"dog\"",
        "compute the embedding distance of these sentences",
        "which of these texts are closest: 'apple', 'banana', 'car'",
        "euclidean distance between 'hello world' and 'hi there'",
        "compare the embeddings of 'I love pizza' and 'pizza is great'",
        "how close are these two sentences semantically",
        "dot product of the vectors for 'Paris' and 'France'",
        "manhattan distance between two texts",
        "are 'happy' and 'joyful' similar?",
    ],
    "zh": [
        "「国王」和「女王」有多相似？",
        "计算“猫”和“狗”的余弦相似度",
        "这两句话的语义距离是多少",
        "比较这几段文本的向量距离",
        "欧氏距离：'你好' 和 '您好'",
        "哪两个句子最接近",
        "算一下这两个词的嵌入距离",
        "“苹果”和“香蕉”的相似度是多少",
    ],
}


def embedding_distance_run(args: DistanceArgs, ctx: ToolContext) -> dict:
    raise ToolError("not_available", "embedding_distance is being built")


@tool(
    args=DistanceArgs,
    keywords=("similar", "similarity", "distance", "cosine", "euclidean", "manhattan", "dot product",
              "closest", "相似", "距离", "余弦", "欧氏", "接近"),
    exemplars=EXEMPLARS,
)
def embedding_distance(args: DistanceArgs, ctx: ToolContext) -> dict:
    """Embed 2–64 texts and report cosine, Euclidean, dot and Manhattan for every pair, the closest
    and farthest pair, and (for 3+ texts) a 2-D PCA plot."""
    return embedding_distance_run(args, ctx)
