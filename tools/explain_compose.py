"""Answer text for ``explain_concept``: one card, two cards side by side, document excerpts, or
"unknown" with the nearest concepts, in English or Chinese.

Knowledge-base text is content, never instructions: document excerpts are shown as quoted lines.
"""

from __future__ import annotations

from typing import Any

LABELS = {
    "en": {"definition": "What it is", "intuition": "Intuition", "how": "How it works", "when": "When to use",
           "pitfalls": "Pitfalls", "related": "Related", "sources": "Sources", "layer": "Stack layer",
           "compare": "{a} vs {b}, point by point", "from_docs": "From your documents",
           "other_lang": "(the document is in Chinese; quoted as written)",
           "unknown": "I don't have \"{q}\" in my knowledge base, so I won't make up an explanation.",
           "nearest": "Nearest concepts I do know: {names}. Ask about one of them, or add your own notes with "
                      "`stackwise kb ingest`.",
           "nothing": "Ask about a concept (for example LoRA, attention or SHAP), or add your own notes with "
                      "`stackwise kb ingest`.",
           "see_card": "See also the concept card: {title}."},
    "zh": {"definition": "定义", "intuition": "直观理解", "how": "工作原理", "when": "何时使用", "pitfalls": "常见误区",
           "related": "相关概念", "sources": "来源", "layer": "所属层级", "compare": "{a} 与 {b} 逐项对比",
           "from_docs": "来自你的文档", "other_lang": "（原文为英文，按原文引用）",
           "unknown": "知识库里没有“{q}”，我不会凭空编造解释。",
           "nearest": "我知道的最接近的概念：{names}。可以问其中之一，或用 `stackwise kb ingest` 加入你自己的笔记。",
           "nothing": "可以问一个概念（例如 LoRA、注意力机制、SHAP），或用 `stackwise kb ingest` 加入你自己的笔记。",
           "see_card": "另见概念卡片：{title}。"},
}
LAYERS_ZH = {"application": "应用层", "interface & tooling": "接口与工具层", "models": "模型层",
             "frameworks & algorithms": "框架与算法层", "hardware": "硬件层"}


def card_sections(card: Any, lang: str) -> dict:
    side = card.side(lang)
    return {"definition": side.definition, "intuition": side.intuition, "how": list(side.how), "when": side.when,
            "pitfalls": list(side.pitfalls)}


def layer(card: Any, lang: str) -> str:
    return LAYERS_ZH.get(card.category, card.category) if lang == "zh" else card.category


def compose_card(card: Any, lang: str, related: list[dict], citations: list[dict]) -> str:
    t, side = LABELS[lang], card.side(lang)
    colon = "：" if lang == "zh" else ": "
    lines = [f"**{side.title}** · {t['layer']}{colon}{layer(card, lang)}", "",
             f"{t['definition']}{colon}{side.definition}", "", f"{t['intuition']}{colon}{side.intuition}", "",
             f"{t['how']}{colon}"]
    lines += [f"{i}. {step}" for i, step in enumerate(side.how, start=1)]
    lines += ["", f"{t['when']}{colon}{side.when}", "", f"{t['pitfalls']}{colon}"]
    lines += [f"- {p}" for p in side.pitfalls]
    if related:
        lines += ["", f"{t['related']}{colon}" + ("、" if lang == "zh" else ", ").join(r["title"] for r in related)]
    lines += ["", _sources(citations, lang)]
    return "\n".join(lines)


def compose_compare(cards: list[Any], lang: str, citations: list[dict]) -> str:
    t = LABELS[lang]
    colon = "：" if lang == "zh" else ": "
    titles = [c.side(lang).title for c in cards]
    lines = [f"**{t['compare'].format(a=titles[0], b=' / '.join(titles[1:]))}**"]
    for field in ("definition", "intuition", "how", "when", "pitfalls"):
        lines += ["", f"{t[field]}{colon}"]
        for card, title in zip(cards, titles, strict=True):
            value = getattr(card.side(lang), field)
            text = ("；" if lang == "zh" else "; ").join(value) if isinstance(value, list) else value
            lines.append(f"- {title}{colon}{text}")
    layers = {c.category for c in cards}
    if len(layers) > 1:
        lines += ["", f"{t['layer']}{colon}" + ("；" if lang == "zh" else "; ").join(
            f"{title} — {layer(c, lang)}" for c, title in zip(cards, titles, strict=True))]
    lines += ["", _sources(citations, lang)]
    return "\n".join(lines)


def compose_document(excerpts: list[dict], lang: str, citations: list[dict], see_card: str | None) -> str:
    """Extractive answer: the best sentences, each quoted and numbered by its source."""
    t = LABELS[lang]
    colon = "：" if lang == "zh" else ": "
    lines = [f"{t['from_docs']}{colon}"]
    if any(e["lang"] != lang for e in excerpts):
        lines[0] += " " + t["other_lang"]
    for excerpt in excerpts:
        for sentence in excerpt["sentences"]:
            lines.append(f"> {sentence} [{excerpt['n']}]")
    if see_card:
        lines += ["", t["see_card"].format(title=see_card)]
    lines += ["", _sources(citations, lang)]
    return "\n".join(lines)


def compose_unknown(query: str, lang: str, nearest: list[dict]) -> str:
    t = LABELS[lang]
    shown = query if len(query) <= 60 else query[:57] + "…"
    text = t["unknown"].format(q=shown)
    if nearest:
        names = ("、" if lang == "zh" else ", ").join(n["title"] for n in nearest)
        return text + " " + t["nearest"].format(names=names)
    return text + " " + t["nothing"]


def _sources(citations: list[dict], lang: str) -> str:
    colon = "：" if lang == "zh" else ": "
    parts = [f"[{i}] {c['title']}" + (f" — {c['source']}" if c.get("source") else "")
             for i, c in enumerate(citations, start=1)]
    return LABELS[lang]["sources"] + colon + "\n" + "\n".join(parts)
