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

from agent.language import mask_quotes, quoted_spans
from tools.base import Tool

CHAT = "chat"
ROUTE_CHARS = 1000
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
        # Scores are similarity plus evidence bonuses; shown capped at 1 so they read as confidences.
        return ", ".join(f"{name} {min(score, 1.0):.2f}" for name, score in top)


class SemanticRouter:
    """Scores a step against every tool; ``route`` returns the best tool or ``None`` (chit-chat)."""

    def __init__(self, tools: list[Tool], embedder: Any, *, threshold: float = 0.42, cache_dir: Path | None = None):
        self.tools = {t.name: t for t in tools}
        self.embedder = embedder
        self.threshold = threshold
        self.cache_dir = cache_dir
        self._labels: list[str] = []
        self._matrix: np.ndarray | None = None
        # One compiled alternation per tool: hundreds of keywords cost one scan of the text.
        self._keywords = {name: keyword_pattern(t.all_keywords()) for name, t in self.tools.items()}

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
            matrix = np.asarray(self.embedder.embed([routing_form(p) for p in phrases]), dtype=np.float32)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp.npy")
                np.save(tmp, matrix, allow_pickle=False)
                tmp.replace(path)
        self._labels, self._matrix = labels, matrix

    def semantic_scores(self, text: str) -> dict[str, float]:
        self.prepare()
        # The request is in the first lines; embedding a 20,000-character paste would only cost time.
        vec = np.asarray(self.embedder.embed([routing_form(text)[:ROUTE_CHARS]]), dtype=np.float32)[0]
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
        low = mask_quotes(text).lower()
        hits_by_tool = {}
        for name in self.tools:
            rx = self._keywords[name]
            hits = len({m.group(0) for m in rx.finditer(low)}) if rx else 0
            scores[name] += min(0.16, 0.08 * hits)
            hits_by_tool[name] = hits
        if any(hits_by_tool.values()) and not _THANKS.search(low):
            scores[CHAT] -= 0.1   # it names something we work with: not small talk
        _slot_features(scores, low, slots, on_topic=any(hits_by_tool.values()))
        best = max(scores, key=scores.get)
        if best == CHAT or scores[best] < self.threshold:
            return RouteDecision(None, scores[best], scores)
        return RouteDecision(best, scores[best], scores)


def routing_form(text: str) -> str:
    """The text as the router sees it: quoted spans become a placeholder, so what is being compared
    ("'The stock market crashed'") does not drown out what is being asked ("compare … and …")."""
    spans = quoted_spans(text)
    if not spans:
        return text
    out, pos = [], 0
    for start, end, _ in spans:
        out.append(text[pos:start])
        out.append('"X"')
        pos = end
    out.append(text[pos:])
    return "".join(out)


def keyword_pattern(keywords: tuple[str, ...]) -> re.Pattern | None:
    """Whole-word alternation for Latin keywords (Chinese ones match anywhere), longest first."""
    if not keywords:
        return None
    parts = []
    for kw in sorted(set(keywords), key=len, reverse=True):
        if re.search(r"[\u4e00-\u9fff]", kw):
            parts.append(re.escape(kw))
        else:
            parts.append(rf"(?<![\w-]){re.escape(kw)}(?![\w-])")
    return re.compile("|".join(parts))


_THANKS = re.compile(r"^\W*(?:thanks|thank you|thx|ty|cheers|great|cool|nice|awesome|ok|okay|got it)\b|"
                     r"^\W*(?:谢谢|多谢|感谢|太好了|太棒了|好的|辛苦了|收到)")
_QUESTION = re.compile(r"^(?:what|what's|whats|explain|how does|how do|how is|why|define|tell me about|describe|"
                       r"can you explain|could you explain|difference between|when should)\b|"
                       r"什么是|是什么|解释|介绍|原理|区别|什么意思|干什么|有什么(?:用|特别)|怎么选|为什么|"
                       r"\beli5\b|\bgist\b|walk me through|what (?:does|do|is|are)\b|\bwtf is\b|the deal with|"
                       r"科普|咋|啥|怎么(?:工作|回事|理解|用)|如何理解|有什么(?:区别|不同)|不一样")
_QUESTIONISH = re.compile(r"[?？]\s*$|[?？]\s|吗|呢")
_ASKING = re.compile(r"^\W*(?:who|whom|whose|when|where|which|how|what|why|is|are|do|does|can|should|list)\b|"
                     r"谁|什么时候|何时|哪|几|多少|怎么|如何|为什么|是否|有没有", re.IGNORECASE)


def looks_like_question(text: str) -> bool:
    """A question (not thanks or a greeting): "when is the release freeze?", "值班找谁？"."""
    low = text.strip().lower()
    if not low or _THANKS.search(low):
        return False
    return bool(_QUESTION.search(low) or _QUESTIONISH.search(low) or _ASKING.search(low))
_MY_JOB = re.compile(r"\bmy\s+(?:\w+\s+){0,2}(?:job|run|training|fine-?tune|finetune)|(?:我的|我那个|我那|刚才的)\s*"
                     r"(?:\S{0,4})(?:任务|微调|训练)")
_TRAIN_VERB = re.compile(r"fine-?t\w*n|finetun|\btune\b|\btrain(?:ing)?\b|\bsft\b|\badapt\b|微调|训练|训一下|"
                         r"跑个|跑一下|launch|kick off|start a", re.IGNORECASE)
_JOB_WORD = re.compile(r"\bjobs?\b|\bruns?\b|training|fine-?tun|finetun|progress|status|\beta\b|\bloss\b|"
                       r"任务|训练|微调|进度|状态")
_CANCEL_VERB = re.compile(r"\b(?:cancel|stop|abort|kill|terminate|halt)\b|取消|停止|终止|停掉|停了|杀掉|中止|结束|停下")
# Serving a finished job: export it (merge, GGUF) or ask how to serve / chat with it.
_EXPORT_VERB = re.compile(r"\b(?:merge|merged|merging|export|exporting|convert)\b|\bgguf\b|合并|导出|转成|转换")
_SERVE_VERB = re.compile(r"\b(?:serve|serving|deploy|deploying|host|hosting|chat with|talk to)\b|vllm serve|ollama|"
                         r"llama-server|llama\.cpp|\bvllm\b|部署|上线|推理服务|对话|聊天|跑起来|运行起来")
_TRAINED_IT = re.compile(r"\b(?:i|we)\s+(?:just\s+|have\s+)?(?:trained|fine-?tuned|finetuned)\b|"
                         r"\bmy\s+(?:[\w-]+\s+){0,2}model\b|训练好|微调好|刚训练|刚微调|我的模型")
_SIMILARITY = re.compile(r"similar|similarity|distance|closest|nearest|close|far|apart|cosine|euclid|manhattan|"
                         r"dot product|compare|embed|相似|距离|接近|余弦|欧氏|比较|向量|像")
_FILE_WORD = re.compile(r"(?<!\S)\S{1,200}\.(?:csv|parquet|jsonl|json|tsv|xlsx)\b", re.IGNORECASE)


def _bump(scores: dict[str, float], name: str, amount: float) -> None:
    if name in scores:
        scores[name] += amount


def _serving_tool(bare: str, questionish: bool) -> str | None:
    """``export_finetune`` for "merge / export / GGUF", ``finetune_serve_info`` for "serve / deploy / chat with"
    (and for a question about exporting: "how do I …" wants the commands); None otherwise."""
    export, serve = bool(_EXPORT_VERB.search(bare)), bool(_SERVE_VERB.search(bare))
    if serve and (questionish or not export):
        return "finetune_serve_info"
    return "export_finetune" if export else None


def _slot_features(scores: dict[str, float], low: str, slots: dict[str, Any], *, on_topic: bool = True) -> None:
    """Evidence from what the text carries; each rule encodes one reason a phrase leans one way.

    ``low`` is the lower-cased step with quoted spans masked, so words inside quotes
    ("cancel my subscription") never count as commands.
    """
    bare = _FILE_WORD.sub(" ", low)
    question = bool(_QUESTION.search(bare.strip()))
    questionish = question or bool(_QUESTIONISH.search(bare))
    has_job = "job_id" in slots
    texts = len(slots.get("texts", []))
    files = slots.get("files") or []
    train = bool(_TRAIN_VERB.search(bare))
    serving = _serving_tool(bare, questionish)
    if not has_job and not (_MY_JOB.search(bare) or _TRAINED_IT.search(bare)):
        _bump(scores, "export_finetune", -0.12)          # export or serve what? no job is meant
        _bump(scores, "finetune_serve_info", -0.12)
    if has_job:
        _bump(scores, CHAT, -0.2)
        _bump(scores, "explain_concept", -0.15)
        if _CANCEL_VERB.search(bare):
            _bump(scores, "cancel_finetune", 0.15)
        elif serving:
            _bump(scores, serving, 0.15)
        else:                      # a job named without export/serve words: its status
            _bump(scores, "finetune_status", 0.15)
            _bump(scores, "cancel_finetune", -0.1)
            _bump(scores, "export_finetune", -0.1)
            _bump(scores, "finetune_serve_info", -0.1)
    elif _CANCEL_VERB.search(bare) and not question:
        _bump(scores, "cancel_finetune", 0.08)
    else:
        _bump(scores, "cancel_finetune", -0.1)
    if not has_job and question and not re.search(r"\bmy\b|我的|latest|最新", bare):
        _bump(scores, "finetune_status", -0.1)
    if not has_job and not _JOB_WORD.search(bare):
        _bump(scores, "finetune_status", -0.15)   # status of what? no job is mentioned
    if texts >= 2 and _SIMILARITY.search(bare):
        _bump(scores, "embedding_distance", 0.2)
        _bump(scores, CHAT, -0.15)
        _bump(scores, "explain_concept", -0.1)
    elif texts < 2:
        # Without two texts the calculator cannot run; "what is cosine similarity?" is a concept question.
        _bump(scores, "embedding_distance", -0.3 if question else -0.12)
    if slots.get("data") and not train:
        _bump(scores, "shap_report", 0.1)
    if not files and not re.search(r"csv|parquet|data ?set|数据|表格|文件", bare):
        _bump(scores, "shap_report", -0.12)
    if slots.get("sample_rows") and not question:
        # "try it on 500 rows first": a sample size only means something for a fine-tune (a trial run).
        _bump(scores, "launch_finetune", 0.25 if train or slots.get("dataset") or slots.get("base_model") else 0.2)
        _bump(scores, CHAT, -0.1)
        train = True
    train_request = train and bool(slots.get("dataset") or slots.get("base_model")) and not question
    if train_request:
        _bump(scores, "launch_finetune", 0.2)
        _bump(scores, "shap_report", -0.1)
    elif not train:
        _bump(scores, "launch_finetune", -0.1)
    if questionish and not (files or has_job or texts >= 2):
        # A question about something we know is a concept question; "what's the weather?" is not.
        _bump(scores, "explain_concept", (0.18 if question else 0.06) if on_topic else 0.03)
        _bump(scores, CHAT, -0.1)
    if _MY_JOB.search(bare) and not train_request:
        _bump(scores, serving or "finetune_status", 0.15)
        _bump(scores, "explain_concept", -0.12)
    if _THANKS.search(bare) and not (files or has_job or texts >= 2):
        _bump(scores, CHAT, 0.15)
    if files:
        _bump(scores, CHAT, -0.15)
        _bump(scores, "explain_concept", -0.1)   # a concept question rarely names a data file
