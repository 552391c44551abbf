"""Language detection, input cleaning and splitting a compound message into steps (en + zh)."""

from __future__ import annotations

import re
import unicodedata

CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
# Quoted spans in every style people type: '…' "…" “…” ‘…’ 「…」 『…』 《…》.
QUOTE_PAIRS = {"'": "'", '"': '"', "“": "”", "‘": "’", "「": "」", "『": "』", "《": "》"}
_QUOTED = re.compile(
    r"(?<![\w])'([^'\n]+?)'(?![\w])"
    r'|"([^"\n]+?)"'
    r"|“([^”\n]+?)”|‘([^’\n]+?)’|「([^」\n]+?)」|『([^』\n]+?)』|《([^》\n]+?)》"
)

# Step separators, tried on the message with quoted spans masked out.
# Step separators, tried on the message with quoted spans masked out. No leading \s*: a run of
# spaces would make every position re-scan it (quadratic); the parts are stripped afterwards.
_SPLIT_EN = re.compile(
    r"(?:[,;.?!]\s*(?:and\s+)?then\b|\band then\b|(?:[,;.?!]\s*)?\band also\b|[,;.?!]\s*after that\b|"
    r"[,;.?!]\s*afterwards\b|[,;.?!]\s*also\b|\bthen also\b),?",
    re.IGNORECASE,
)
_SPLIT_ZH = re.compile(r"(?:(?:[，,；;。？?！!]\s*)?(?:然后|接着|随后|最后|并且)|"
                       r"[，,；;。？?！!]\s*(?:之后|再|另外|还有|同时|并))[，,]?")
_LEAD_ZH = re.compile(r"^(?:请|麻烦)?\s*(?:先|再(?!见|次)|顺便|还要)")
_LEAD_EN = re.compile(r"^first(?:ly)?\b[,:]?", re.IGNORECASE)


def quoted_spans(text: str) -> list[tuple[int, int, str]]:
    """(start, end, inner text) of each quoted span, in order."""
    out = []
    for m in _QUOTED.finditer(text):
        inner = next(g for g in m.groups() if g is not None)
        out.append((m.start(), m.end(), inner))
    return out


def mask_quotes(text: str) -> str:
    """The text with each quoted span replaced by same-length filler (keeps offsets)."""
    chars = list(text)
    for start, end, _ in quoted_spans(text):
        for i in range(start + 1, end - 1):
            chars[i] = "_"
    return "".join(chars)


def detect_language(text: str, previous: str | None = None) -> str:
    """``zh`` when Chinese is written outside quotes, else ``en``; a message with little language of
    its own ("data.jsonl", "ft-3", "用 train.parquet") keeps the thread's ``previous`` language.

    Example:
        >>> detect_language("什么是 QLoRA？"), detect_language("how similar are '国王' and '女王'?")
        ('zh', 'en')
        >>> detect_language("用 train.parquet", previous="zh"), detect_language("data.jsonl", previous="zh")
        ('zh', 'zh')
    """
    outside = mask_quotes(text)
    han = len(CJK.findall(outside))
    if han >= 2:
        return "zh"
    # English words, not counting file names, ids and paths.
    words = [w for w in re.findall(r"[A-Za-z][A-Za-z']+", re.sub(r"(?<!\S)\S*[./_\-\d]\S*", " ", outside))]
    if han == 1:
        return "zh" if previous == "zh" or len(words) < 2 else "en"
    if not words and previous in ("zh", "en"):
        return previous
    return "en"


def clean_text(text: str) -> str:
    """Drop control characters (keeping newlines and tabs) and normalise width (NFKC-lite)."""
    kept = []
    for ch in text:
        if ch in "\n\t":
            kept.append(ch)
        elif unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co"):
            continue
        else:
            kept.append(ch)
    return "".join(kept).strip()


def split_steps(text: str) -> list[str]:
    """Split a compound message into its steps, never inside quotes.

    Example:
        >>> split_steps("explain LoRA, then fine-tune Qwen2.5-0.5B on d.jsonl")
        ['explain LoRA', 'fine-tune Qwen2.5-0.5B on d.jsonl']
        >>> split_steps("先解释一下 SHAP，然后给 churn.csv 做报告")
        ['解释一下 SHAP', '给 churn.csv 做报告']
    """
    masked = mask_quotes(text)
    cuts: list[tuple[int, int]] = []
    for rx in (_SPLIT_EN, _SPLIT_ZH):
        cuts.extend((m.start(), m.end()) for m in rx.finditer(masked) if m.end() > m.start())
    cuts.sort()
    parts, pos = [], 0
    for start, end in cuts:
        if start < pos:
            continue
        parts.append(text[pos:start])
        pos = end
    parts.append(text[pos:])
    steps = []
    for p in parts:
        p = _LEAD_EN.sub("", _LEAD_ZH.sub("", p.strip())).strip(" \t\n,，;；。.")
        if p:
            steps.append(p)
    return steps or [text.strip()]
