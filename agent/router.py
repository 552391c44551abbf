"""The local brain's semantic router: exemplar similarity plus keyword and slot features.

Each tool brings bilingual exemplar phrases; a message is embedded with a multilingual sentence
encoder and scored against every tool's exemplars (best match, blended with the mean of the top
three). Keyword hits and slots the text carries (a job id, a data file, quoted texts) nudge the
score, because a phrase like "cancel ft-3" is decided by its words more than its meaning.
Exemplar embeddings are cached on disk, keyed by the model and the phrases.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tools.base import Tool

CHAT = "chat"
CHAT_EXEMPLARS = {
    "en": ["hi", "hello there", "thanks!", "thank you so much", "what can you do?", "who are you",
           "help", "good morning", "bye", "ok great", "how are you", "what tools do you have",
           "nice, that helps", "cool"],
    "zh": ["你好", "谢谢", "你能做什么", "你是谁", "帮助", "早上好", "再见", "好的", "太棒了，谢谢",
           "你有哪些功能", "在吗"],
}


@dataclass
class RouteDecision:
    tool: str | None
    score: float
    scores: dict[str, float]

    def explain(self) -> str:
        top = sorted(self.scores.items(), key=lambda kv: -kv[1])[:3]
        return ", ".join(f"{name} {score:.2f}" for name, score in top)


class SemanticRouter:
    """Scores a step against every tool; ``route`` returns the best tool or ``None`` (chit-chat)."""

    def __init__(self, tools: list[Tool], embedder: Any, *, threshold: float = 0.42, cache_dir: Path | None = None):
        self.tools = {t.name: t for t in tools}
        self.embedder = embedder
        self.threshold = threshold
        self.cache_dir = cache_dir
        self._labels: list[str] = []
        self._matrix: np.ndarray | None = None

    def _exemplars(self) -> tuple[list[str], list[str]]:
        labels, phrases = [], []
        groups = {name: t.exemplars for name, t in self.tools.items()}
        groups[CHAT] = CHAT_EXEMPLARS
        for name, by_lang in groups.items():
            for lang in sorted(by_lang):
                for phrase in by_lang[lang]:
                    labels.append(name)
                    phrases.append(phrase)
        return labels, phrases

    def prepare(self) -> None:
        """Embed (or load from the cache) every exemplar once."""
        if self._matrix is not None:
            return
        labels, phrases = self._exemplars()
        key = hashlib.sha256(json.dumps([self.embedder.name, phrases], ensure_ascii=False).encode()).hexdigest()[:16]
        path = self.cache_dir / f"router-{key}.npy" if self.cache_dir else None
        matrix = None
        if path is not None and path.is_file():
            try:
                matrix = np.load(path, allow_pickle=False)
                if matrix.shape[0] != len(phrases):
                    matrix = None
            except (OSError, ValueError):
                matrix = None
        if matrix is None:
            matrix = np.asarray(self.embedder.embed(phrases), dtype=np.float32)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp.npy")
                np.save(tmp, matrix, allow_pickle=False)
                tmp.replace(path)
        self._labels, self._matrix = labels, matrix

    def semantic_scores(self, text: str) -> dict[str, float]:
        self.prepare()
        vec = np.asarray(self.embedder.embed([text]), dtype=np.float32)[0]
        sims = self._matrix @ vec
        scores: dict[str, float] = {}
        labels = np.asarray(self._labels)
        for name in [*self.tools, CHAT]:
            s = np.sort(sims[labels == name])[::-1]
            if s.size:
                scores[name] = float(0.7 * s[0] + 0.3 * s[: min(3, s.size)].mean())
        return scores

    def route(self, text: str, slots: dict[str, Any]) -> RouteDecision:
        scores = self.semantic_scores(text)
        low = text.lower()
        for name, tool in self.tools.items():
            hits = sum(1 for k in tool.keywords if _has_keyword(low, k))
            scores[name] += min(0.12, 0.06 * hits)
        _slot_features(scores, low, slots)
        best = max(scores, key=scores.get)
        if best == CHAT or scores[best] < self.threshold:
            return RouteDecision(None, scores[best], scores)
        return RouteDecision(best, scores[best], scores)


def _has_keyword(low: str, kw: str) -> bool:
    if re.search(r"[\u4e00-\u9fff]", kw):
        return kw in low
    return re.search(rf"(?<![\w-]){re.escape(kw)}(?![\w-])", low) is not None


_QUESTION = re.compile(r"^(?:what|what's|whats|explain|how does|how do|why|define|tell me about|describe)\b|"
                       r"什么是|是什么|解释|介绍|原理|区别|什么意思")
_TRAIN_VERB = re.compile(r"fine-?tun|finetun|\btrain|\bsft\b|微调|训练|launch|kick off|start a", re.IGNORECASE)
_CANCEL_VERB = re.compile(r"\b(?:cancel|stop|abort|kill|terminate|halt)\b|取消|停止|终止|停掉|停了|杀掉")


def _bump(scores: dict[str, float], name: str, amount: float) -> None:
    if name in scores:
        scores[name] += amount


def _slot_features(scores: dict[str, float], low: str, slots: dict[str, Any]) -> None:
    """Evidence from what the text carries; each rule encodes one reason a phrase leans one way."""
    question = bool(_QUESTION.search(low))
    has_job = "job_id" in slots
    if has_job:
        _bump(scores, "finetune_status", 0.08)
        _bump(scores, "cancel_finetune", 0.08)
        _bump(scores, "explain_concept", -0.1)
    if _CANCEL_VERB.search(low):
        _bump(scores, "cancel_finetune", 0.12)
    if len(slots.get("texts", [])) >= 2 and not question:
        _bump(scores, "embedding_distance", 0.08)
    if slots.get("data") and not slots.get("dataset", "").endswith((".jsonl", ".json")):
        _bump(scores, "shap_report", 0.05)
    if _TRAIN_VERB.search(low) and (slots.get("dataset") or slots.get("base_model")):
        _bump(scores, "launch_finetune", 0.1)
    if question and not (slots.get("files") or has_job):
        _bump(scores, "explain_concept", 0.06)
    if slots.get("files") or has_job:
        _bump(scores, "chat", -0.1)
