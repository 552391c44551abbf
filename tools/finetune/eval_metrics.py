"""Answer metrics for the held-out evaluation (no model needed): the ``<think>…</think>`` + answer format,
exact match and token-overlap F1 against a reference, and perplexity.

Answers and references are compared after :func:`normalize` (Unicode NFKC, case folded, punctuation and
symbols removed, whitespace collapsed) and split by :func:`answer_tokens` into words — every Chinese (or
Japanese kana) character is a token of its own, since those scripts do not put spaces between words.

Example:
    >>> answer_tokens("Vitamin C, 维生素！")
    ['vitamin', 'c', '维', '生', '素']
    >>> round(token_f1("the cat sat", "The cat sat on the mat."), 4)
    0.6667
    >>> split_think("<think>\\nscurvy\\n</think>\\n\\nVitamin C")
    (True, 'Vitamin C')
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter

SHORT_TOKENS = 32          # a reference of at most this many answer tokens counts as short
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"

# CJK ideographs (basic, extension A, compatibility, extensions B–F) and the Japanese kana: one token each.
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f"
_TOKEN = re.compile(f"[{_CJK}]|[^\\s{_CJK}]+")
_THINK_BLOCK = re.compile(r"\s*<think>(.*?)</think>(.*)", re.DOTALL)


def normalize(text: str) -> str:
    """NFKC (full-width forms become ASCII), case folded, punctuation and symbols dropped, spaces collapsed.

    Example:
        >>> normalize("  Ｈｅｌｌｏ,   WORLD!! ")
        'hello world'
    """
    folded = unicodedata.normalize("NFKC", text).casefold()
    kept = "".join(" " if unicodedata.category(ch)[0] in "PS" else ch for ch in folded)
    return " ".join(kept.split())


def answer_tokens(text: str) -> list[str]:
    """The tokens metrics count: words of the normalised text, Chinese split into single characters."""
    return _TOKEN.findall(normalize(text))


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when both have the same tokens in the same order after normalisation, else 0.0."""
    return 1.0 if answer_tokens(prediction) == answer_tokens(reference) else 0.0


def token_f1(prediction: str, reference: str) -> float:
    """The harmonic mean of token precision and recall (tokens counted with multiplicity, order ignored).

    Example:
        >>> token_f1("多饮、多食", "多饮多食和多尿")     # 4 shared characters: P = 4/4, R = 4/7
        0.7272727272727273
    """
    predicted, wanted = answer_tokens(prediction), answer_tokens(reference)
    if not predicted or not wanted:
        return 1.0 if predicted == wanted else 0.0
    shared = sum((Counter(predicted) & Counter(wanted)).values())
    if shared == 0:
        return 0.0
    precision, recall = shared / len(predicted), shared / len(wanted)
    return 2 * precision * recall / (precision + recall)


def is_short(reference: str) -> bool:
    """Whether exact match and F1 are meaningful for ``reference``: 1 to :data:`SHORT_TOKENS` tokens."""
    return 0 < len(answer_tokens(reference)) <= SHORT_TOKENS


def opens_think(prompt: str) -> bool:
    """Whether the prompt already opens the reasoning block (DeepSeek-R1 distills' chat templates do)."""
    return prompt.rstrip().endswith(THINK_OPEN)


def split_think(text: str, *, opened: bool = False) -> tuple[bool, str]:
    """``(follows the format, the answer)`` for a generated text.

    The format is a ``<think>…</think>`` block first, then a non-empty answer with no further think tags.
    ``opened``: the prompt ended with ``<think>``, so the text starts inside the block. The answer is what
    follows the (last) ``</think>``; a text that opens a block and never closes it has no answer (it was cut
    off while reasoning); a text without tags is all answer.
    """
    if opened and not text.lstrip().startswith(THINK_OPEN):
        text = THINK_OPEN + "\n" + text
    block = _THINK_BLOCK.fullmatch(text)
    if block is not None:
        answer = block.group(2).strip()
        if THINK_OPEN in answer or THINK_CLOSE in answer:     # a second block: not the format
            return False, answer.rsplit(THINK_CLOSE, 1)[-1].strip()
        return bool(answer), answer
    if THINK_CLOSE in text:
        return False, text.rsplit(THINK_CLOSE, 1)[1].strip()
    if THINK_OPEN in text:
        return False, ""
    return False, text.strip()


def perplexity(loss: float | None) -> float | None:
    """``exp(loss)``; ``None`` for no loss or one too large to be a finite number."""
    if loss is None or not math.isfinite(loss) or loss > 700:
        return None
    return math.exp(loss)


def mean(values: list[float]) -> float | None:
    """The average, or ``None`` for no values."""
    return sum(values) / len(values) if values else None
