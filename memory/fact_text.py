"""How remembered facts read, in English and Chinese, and the sentences memory answers are made of.

Example:
    >>> describe("gpu", {"name": "RTX 4090", "memory_gb": 24.0, "memory_assumed": False}, "en")
    'your GPU is an RTX 4090 with 24 GB of VRAM'
    >>> describe("usual_dataset", {"file": "med.jsonl"}, "zh")
    '你常用的数据集是 med.jsonl'
"""

from __future__ import annotations

from typing import Any

LANG_NAMES = {"zh": {"en": "Chinese", "zh": "中文"}, "en": {"en": "English", "zh": "英文"}}
KIND_NAMES = {
    "gpu": ("GPU", "显卡"), "language": ("answer language", "回答语言"), "dataset_domain": ("kind of data", "数据领域"),
    "usual_dataset": ("usual data set", "常用数据集"), "usual_model": ("usual model", "常用模型"),
    "preferred_method": ("preferred fine-tuning method", "偏好的微调方法"), "name": ("name", "名字"),
    "note": ("note", "备注"),
}
METHODS = {"lora": "LoRA", "qlora": "QLoRA", "full": "full fine-tuning"}


def _gb(value: Any) -> str:
    return f"{value:g}" if isinstance(value, int | float) else "?"


def describe(kind: str, data: dict[str, Any], lang: str) -> str:
    """One fact as a clause about "you"."""
    zh = lang == "zh"
    if kind == "gpu":
        if data.get("none"):
            return "你没有 GPU（只用 CPU）" if zh else "you have no GPU (CPU only)"
        name, mem = data.get("name"), data.get("memory_gb")
        count = f"{data['count']} × " if data.get("count") else ""
        guess = ""
        if data.get("memory_assumed"):
            guess = "（按常见型号估计）" if zh else " (the usual size of that model)"
        if name and mem:
            return (f"你的显卡是 {count}{name}，显存 {_gb(mem)} GB{guess}" if zh else
                    f"your GPU is {'' if count else _article(name)}{count}{name} with {_gb(mem)} GB of VRAM{guess}")
        if name:
            return f"你的显卡是 {count}{name}" if zh else f"your GPU is {'' if count else _article(name)}{count}{name}"
        return f"你的显卡有 {_gb(mem)} GB 显存" if zh else f"your GPU has {_gb(mem)} GB of VRAM"
    if kind == "language":
        name = LANG_NAMES.get(data.get("lang"), {}).get(lang, data.get("lang"))
        return f"你希望我用{name}回答" if zh else f"you want answers in {name}"
    if kind == "dataset_domain":
        return f"你的数据是{data.get('topic')}" if zh else f"your data sets are {data.get('topic')}"
    if kind == "usual_dataset":
        return f"你常用的数据集是 {data.get('file')}" if zh else f"your usual data set is {data.get('file')}"
    if kind == "usual_model":
        return f"你常用的模型是 {data.get('model')}" if zh else f"your usual model is {data.get('model')}"
    if kind == "preferred_method":
        method = METHODS.get(data.get("method"), data.get("method"))
        return f"你偏好用 {method} 微调" if zh else f"you prefer {method} for fine-tuning"
    if kind == "name":
        return f"你叫{data.get('name')}" if zh else f"your name is {data.get('name')}"
    return f"“{data.get('text')}”"


def _article(name: str) -> str:
    return "an " if name[:1].upper() in "AEFHILMNORSX" or name.upper().startswith(("RTX", "RX")) else "a "


def index_text(kind: str, data: dict[str, Any], said: str) -> str:
    """What the semantic index embeds: the fact in both languages, what it is about, and the user's own words."""
    en, zh = KIND_NAMES.get(kind, (kind, kind))
    extra = {"gpu": "graphics card VRAM GPU memory 显卡 显存 GPU", "usual_dataset": "data set file 数据集 文件",
             "usual_model": "base model 基础模型", "dataset_domain": "data domain topic 数据 领域 类型",
             "language": "language 语言", "preferred_method": "fine-tuning method 微调 方法", "name": "name 名字"}
    return " | ".join(p for p in (f"{en} / {zh}", describe(kind, data, "en"), describe(kind, data, "zh"),
                                  extra.get(kind, ""), said) if p)


# --- answer sentences ---------------------------------------------------------------------------------------

def noted(facts: list[dict], lang: str) -> str:
    items = "; ".join(describe(f["kind"], f["data"], lang) for f in facts)
    if lang == "zh":
        return f"记住了：{items}。随时用 /memory 查看，或说“忘记……”删除。"
    return f"Noted: {items}. See everything I keep with /memory; say \"forget …\" to delete it."


def recalled(facts: list[dict], lang: str) -> str:
    if lang == "zh":
        return "你告诉过我：" + "；".join(describe(f["kind"], f["data"], "zh") for f in facts) + "。"
    return "You told me: " + "; ".join(describe(f["kind"], f["data"], "en") for f in facts) + "."


EXAMPLES = {   # how to tell it, with placeholders (a real-looking example reads like a remembered fact)
    "gpu": ("my GPU is <model> with <N> GB", "我的显卡是 <型号> <N>G"),
    "language": ("answer in <language>", "以后用<语言>回答"),
    "dataset_domain": ("my data sets are <kind of data>", "我的数据集是<领域>数据"),
    "usual_dataset": ("my usual data set is <file>", "我常用的数据集是 <文件>"),
    "usual_model": ("my usual model is <model>", "我常用的模型是 <模型>"),
    "preferred_method": ("I prefer <LoRA / QLoRA / full fine-tuning>", "我一般用 <LoRA / QLoRA / 全参>"),
    "name": ("my name is <name>", "我叫<名字>"),
}


def not_known(kinds: list[str], lang: str) -> str:
    if kinds:
        names = "、".join(KIND_NAMES[k][1] for k in kinds) if lang == "zh" else \
            " or ".join(KIND_NAMES[k][0] for k in kinds)
        en, zh = EXAMPLES.get(kinds[0], EXAMPLES["gpu"])
        return (f"你还没告诉过我你的{names}。告诉我一次（例如“{zh}”），我会记住。" if lang == "zh" else
                f"You haven't told me your {names} yet. Tell me once (e.g. \"{en}\") and I'll remember it.")
    return ("我没有记住与此相关的内容。用 /memory 查看我记住的全部信息。" if lang == "zh" else
            "I don't have anything about that in memory. /memory shows everything I keep about you.")


def shown(facts: list[dict], lang: str) -> str:
    if not facts:
        return ("我还没有记住关于你的任何信息。" if lang == "zh" else "I don't keep any facts about you yet.")
    lines = [f"- [{f['key']}] {describe(f['kind'], f['data'], lang)}" for f in facts]
    head = "我记住的关于你的信息：" if lang == "zh" else "What I keep about you:"
    tail = ("说“忘记我的显卡”或用 /forget KEY 删除一条，/forget 删除全部。" if lang == "zh" else
            "Say \"forget my GPU\" or /forget KEY to delete one; /forget deletes them all.")
    return "\n".join([head, *lines, tail])


def forgotten(count: int, what: str | None, lang: str) -> str:
    if count == 0:
        return ("没有需要删除的内容——我没有记住这一项。" if lang == "zh" else
                "There was nothing to delete — I don't keep that.")
    if what is None:
        return (f"已删除我记住的全部 {count} 条关于你的信息（彻底删除，不只是隐藏）。" if lang == "zh" else
                f"Deleted all {count} facts I kept about you (deleted for good, not just hidden).")
    name = KIND_NAMES.get(what, (what, what))[1 if lang == "zh" else 0]
    return (f"已忘记你的{name}（彻底删除）。" if lang == "zh" else f"Forgot your {name} (deleted for good).")


LANGUAGE_AUTO = {"en": "OK — I'll answer in the language you write in.",
                 "zh": "好的，你用什么语言提问，我就用什么语言回答。"}
OTHER_USERS = {
    "en": "I can't tell you anything about other users: each person's conversations, memory, uploads, reports and "
          "jobs are private to them, and I only see yours.",
    "zh": "我不能透露其他用户的任何信息：每个人的对话、记忆、上传的文件、报告和任务都只属于他自己，我只能看到你的。",
}
