"""Words for BM25 and names: English lower-cased and lightly stemmed, Chinese segmented with jieba.

Example:
    >>> tokenize("What are LoRA adapters?")
    ['lora', 'adapter']
    >>> "蒸馏" in tokenize("什么是知识蒸馏") or "知识蒸馏" in tokenize("什么是知识蒸馏")
    True
"""

from __future__ import annotations

import logging
import re
import threading
import unicodedata
from collections.abc import Iterable

_CJK_RUN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")
_LATIN = re.compile(r"[a-z0-9]+(?:[.+\-][a-z0-9]+)*\+*")
_SPLIT = re.compile(r"[.\-]")

STOP_EN = frozenset("""
a an and are as at be been but by can could did do does doing for from had has have how i if in into is it its
me my of on or our should so than that the their them then there these they this to was we were what whats
when where which while who why will with would you your about explain tell please define meaning mean means
work works working use used using vs versus between difference differences compare comparison simple simply
eli5 some any like just really much many also more most need want know thing things way ways something
""".split())  # noqa: SIM905 - a word list reads best as text
STOP_ZH = frozenset("""
的 了 是 吗 呢 吧 啊 和 与 及 或 在 对 把 被 给 让 用 从 到 为 以 于 就 都 也 还 又 很 更
最 这 那 这个 那个 这些 那些 什么 怎么 怎样 如何 为什么 哪些 哪个 一下 一个 一种 介绍 解释 说说 讲讲
请问 请 我 你 他 她 它 我们 你们 他们 有 没有 是什么 什么样 区别 不同 比较 对比 意思 含义 原理 作用
东西 可以 能 会 要 想 知道 问 下 呀 嘛 么 之 其 中 上 啥 咋
""".split())  # noqa: SIM905 - a word list reads best as text

_jieba_lock = threading.Lock()
_jieba = None
_user_words: set[str] = set()


def _segmenter():
    global _jieba
    if _jieba is None:
        with _jieba_lock:
            if _jieba is None:
                import jieba

                jieba.setLogLevel(logging.WARNING)
                _jieba = jieba
    return _jieba


def add_words(words: Iterable[str]) -> None:
    """Teach the Chinese segmenter multi-character terms (card titles and aliases) so they stay whole."""
    new = [w for w in words if _CJK_RUN.fullmatch(w) and len(w) >= 2 and w not in _user_words]
    if not new:
        return
    jieba = _segmenter()
    with _jieba_lock:
        for word in new:
            jieba.add_word(word, freq=50_000)
            _user_words.add(word)


def normalize(text: str) -> str:
    """NFKC (full-width → half-width) and lower case."""
    return unicodedata.normalize("NFKC", text).lower()


def stem(word: str) -> str:
    """A light English stemmer: plurals and a few suffixes, never below four letters."""
    if len(word) > 4 and word.isalpha():
        for suffix, repl in (("ies", "y"), ("sses", "ss"), ("ing", ""), ("ed", ""), ("s", "")):
            if word.endswith(suffix) and not word.endswith("ss" if suffix == "s" else "\0"):
                base = word[: -len(suffix)] + repl
                if len(base) >= 4:
                    return base
    return word


def tokenize(text: str) -> list[str]:
    """Index terms of ``text``: stemmed English words (also the parts of ``gpt-4o``), Chinese words."""
    text = normalize(text)
    tokens: list[str] = []
    position = 0
    for match in _CJK_RUN.finditer(text):
        _latin_tokens(text[position:match.start()], tokens)
        _chinese_tokens(match.group(), tokens)
        position = match.end()
    _latin_tokens(text[position:], tokens)
    return tokens


def _latin_tokens(text: str, out: list[str]) -> None:
    for match in _LATIN.finditer(text):
        word = match.group()
        if word in STOP_EN:
            continue
        out.append(stem(word))
        if _SPLIT.search(word):
            out.extend(stem(p) for p in _SPLIT.split(word) if p and p not in STOP_EN)


def _chinese_tokens(run: str, out: list[str]) -> None:
    if len(run) == 1:
        if run not in STOP_ZH:
            out.append(run)
        return
    jieba = _segmenter()
    for word in jieba.cut_for_search(run, HMM=True):
        if word.strip() and word not in STOP_ZH:
            out.append(word)
