"""Bilingual text the local brain writes: help, questions for missing arguments, failures, previews."""

from __future__ import annotations

import re

CAPABILITIES = {
    "en": (
        "I'm stackwise, a helper for people who build with the AI stack. I can:\n"
        "• explain a concept — \"what is QLoRA?\", \"LoRA vs QLoRA\" — with sources, from 170+ concept cards\n"
        "• answer from your own notes — \"add notes.md to my knowledge base\", then ask about them\n"
        "• measure how close texts are — \"how similar are 'king' and 'queen'?\" (cosine, Euclidean, dot, Manhattan)\n"
        "• fine-tune a model — \"fine-tune Qwen2.5-0.5B on data.jsonl with LoRA rank 16\" (I check and ask first)\n"
        "• watch or cancel a job — \"status of ft-3\", \"cancel ft-3\"\n"
        "• explain a model with SHAP — \"which features drive churn in churn.csv?\"\n"
        "You can chain requests: \"explain LoRA, then fine-tune …\"."
    ),
    "zh": (
        "我是 stackwise，面向 AI 技术栈开发者的助手。我可以：\n"
        "• 解释概念——「什么是 QLoRA？」「LoRA 和 QLoRA 有什么区别」，附来源，基于 170 多张概念卡片\n"
        "• 根据你自己的笔记回答——「把 notes.md 加到我的知识库」，然后直接提问\n"
        "• 计算文本之间的距离——「“国王”和“女王”有多相似？」（余弦、欧氏、点积、曼哈顿）\n"
        "• 微调模型——「用 LoRA 秩 16 在 data.jsonl 上微调 Qwen2.5-0.5B」（先检查并征求你的确认）\n"
        "• 查看或取消任务——「ft-3 的进度」「取消 ft-3」\n"
        "• 用 SHAP 解释模型——「churn.csv 里哪些特征影响流失？」\n"
        "也可以一次说多件事：「先解释 LoRA，然后微调……」。"
    ),
}
GREETING = {"en": "Hi! ", "zh": "你好！"}
THANKS = {"en": "You're welcome — ask me anything else about the AI stack.",
          "zh": "不客气！还有关于 AI 技术栈的问题随时问我。"}
BYE = {"en": "Bye — your thread is saved, pick it up any time.", "zh": "再见！对话已保存，随时可以继续。"}
UNSURE = {
    "en": "I'm not sure which of my tools fits that. ",
    "zh": "我不太确定该用哪个工具处理这句话。",
}

_THANKS_RX = re.compile(r"^(?:thanks?|thank you|thx|ty|cheers|谢谢|多谢|感谢|太棒了|好的?，?谢谢)", re.IGNORECASE)
_HELLO_RX = re.compile(r"^(?:hi|hello|hey|yo|good (?:morning|evening|afternoon)|你好|您好|嗨|早上好|晚上好|在吗)",
                       re.IGNORECASE)
_BYE_RX = re.compile(r"^(?:bye|goodbye|see you|再见|拜拜)", re.IGNORECASE)


def chat_reply(text: str, lang: str) -> str:
    """A direct answer for chit-chat, help and thanks."""
    t = text.strip()
    if _THANKS_RX.search(t):
        return THANKS[lang]
    if _BYE_RX.search(t):
        return BYE[lang]
    if _HELLO_RX.search(t) and len(t) < 25:
        return GREETING[lang] + CAPABILITIES[lang]
    if re.search(r"help|what can you|who are you|capabilit|帮助|能做什么|你是谁|功能|怎么用", t, re.IGNORECASE):
        return CAPABILITIES[lang]
    return UNSURE[lang] + CAPABILITIES[lang]


# A precise question per missing field (the reflect step asks exactly one).
QUESTIONS = {
    "texts": {"en": "Which texts should I compare? Put each in quotes, e.g. 'king' and 'queen'.",
              "zh": "要比较哪些文本？请用引号括起来，例如「国王」和「女王」。"},
    "dataset": {"en": "Which data set should I train on? Name a JSONL, JSON, CSV or Parquet file.",
                "zh": "用哪个数据集训练？请给出 JSONL、JSON、CSV 或 Parquet 文件名。"},
    "base_model": {"en": "Which base model should I fine-tune (e.g. Qwen/Qwen2.5-0.5B or a local path)?",
                   "zh": "要微调哪个基础模型（例如 Qwen/Qwen2.5-0.5B 或本地路径）？"},
    "data": {"en": "Which CSV or Parquet file should I analyse?", "zh": "要分析哪个 CSV 或 Parquet 文件？"},
    "target": {"en": "Which column is the target the model should predict?", "zh": "模型要预测的目标列是哪一列？"},
    "job_id": {"en": "Which job? Job ids look like ft-12.", "zh": "哪个任务？任务编号形如 ft-12。"},
    "query": {"en": "Which concept should I explain?", "zh": "要解释哪个概念？"},
}
GENERIC_QUESTION = {"en": "Could you give me the missing detail: {field}?", "zh": "请补充缺少的参数：{field}。"}


def missing_field_question(field: str, lang: str) -> str:
    q = QUESTIONS.get(field)
    return q[lang] if q else GENERIC_QUESTION[lang].format(field=field)


FAILURE = {
    "not_available": {"en": "{tool} isn't available in this version yet: {message}",
                      "zh": "{tool} 在当前版本还不可用，会在后续版本中提供。"},
    "declined": {"en": "OK — I did not run {tool}.", "zh": "好的，没有执行 {tool}。"},
    "default": {"en": "{tool} failed: {message}", "zh": "{tool} 执行失败：{message}"},
}


def failure_text(tool: str, error: dict, lang: str) -> str:
    kind = error.get("type", "")
    if kind.startswith(("missing_", "unknown_", "ambiguous_")) and kind != "unknown_tool":
        # The tool is asking the user for something ("Which column is the target? …"): ask it plainly.
        return error.get("message", "")
    tpl = FAILURE.get(kind, FAILURE["default"])[lang]
    return tpl.format(tool=tool, message=error.get("message", ""))


PENDING = {
    "en": "{preview}\nReply yes to go ahead, or no to cancel.",
    "zh": "{preview}\n回复“是”继续，或回复“否”取消。",
}
HELD = {"en": "After your answer I will also run:", "zh": "你确认之后，我还会执行："}
DROPPED = {"en": "(The action waiting for your confirmation was dropped.)",
           "zh": "（之前等待确认的操作已放弃。）"}
NOTHING_PENDING = {"en": "There is nothing waiting for a confirmation in this thread.",
                   "zh": "这个对话里没有等待确认的操作。"}
