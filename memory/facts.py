"""Facts users state or imply about themselves, read from a message in English or Chinese.

Kinds (one value each, a newer statement replaces the older one; notes add up):

========================  ===================================================  ============================
kind                      said like                                            ``data``
========================  ===================================================  ============================
``gpu``                   "my GPU is an RTX 4090 with 24 GB", "我的显卡是 3060 12G",  ``name``, ``memory_gb``,
                          "I'm training on my A100", "I don't have a GPU"      ``memory_assumed``, ``none``
``language``              "answer in Chinese", "以后用英文回答"                   ``lang`` (zh / en)
``dataset_domain``        "my data sets are medical Q&A", "我的数据是法律文书"     ``domain``, ``topic``
``usual_dataset``         "my usual data set is med.jsonl", "我平时用 cot.jsonl"  ``file``
``usual_model``           "I usually fine-tune Qwen2.5-7B", "我常用的模型是 …"     ``model``
``preferred_method``      "I prefer QLoRA", "我一般用 LoRA"                       ``method``
``name``                  "my name is Ada", "我叫小王"                            ``name``
``note``                  "remember that …", "记住……" (nothing structured in it)  ``text``
========================  ===================================================  ============================

Only statements count: a clause that is a question ("is my GPU a 4090?"), a hypothesis ("if I had an
A100") or a negation of the fact ("my GPU is not a 4090") teaches nothing.

Example:
    >>> [(f.kind, f.data) for f in extract_facts("my GPU is an RTX 4090 with 24 GB")]
    [('gpu', {'name': 'RTX 4090', 'memory_gb': 24.0, 'memory_assumed': False})]
    >>> [(f.kind, f.data) for f in extract_facts("我的显卡是 3060 12G，以后用中文回答")]
    [('gpu', {'name': 'RTX 3060', 'memory_gb': 12.0, 'memory_assumed': False}), ('language', {'lang': 'zh'})]
    >>> extract_facts("is my GPU an RTX 4090?")
    []
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from memory.facts_gpu import GPU_MEMORY, gpu_name, read_gpu  # noqa: F401 - re-exported

SINGLE = ("gpu", "language", "dataset_domain", "usual_dataset", "usual_model", "preferred_method", "name")
KINDS = (*SINGLE, "note")

# VRAM of GPUs people name without saying it (the common variant; marked as assumed).
_LANGS = {"chinese": "zh", "mandarin": "zh", "中文": "zh", "汉语": "zh", "普通话": "zh", "华语": "zh",
          "english": "en", "英文": "en", "英语": "en"}
_LANG_PREF = [
    re.compile(r"\b(?:answer|reply|respond|talk|speak|write|explain|chat)(?:\s+(?:to\s+)?me)?\s+(?:only\s+|always\s+)?"
               r"(?:in\s+)?(?P<lang>chinese|mandarin|english)\b", re.IGNORECASE),
    re.compile(r"\b(?:please\s+)?(?:use|prefer|switch\s+to)\s+(?P<lang>chinese|mandarin|english)\b", re.IGNORECASE),
    re.compile(r"\b(?P<lang>chinese|english)\s+(?:answers|replies|please|only|from\s+now\s+on)\b", re.IGNORECASE),
    re.compile(r"(?:用|以|说|讲)(?P<lang>中文|汉语|普通话|华语|英文|英语)(?:来)?(?:回答|回复|答复|交流|和我说|跟我说|聊|说|讲|回)"),
    re.compile(r"(?:请|以后|之后|今后|从现在起|从现在开始|接下来)(?:都|全部|一律)?(?:用|说|讲)(?P<lang>中文|汉语|英文|英语)"),
    re.compile(r"(?:我)?(?:喜欢|偏好|更喜欢|习惯)(?:用)?(?P<lang>中文|英文|英语)(?:回答|回复|交流)?"),
]
_LANG_AUTO = re.compile(r"\b(?:answer|reply|respond)\s+in\s+(?:the\s+)?(?:same\s+)?language\s+(?:i|that\s+i)\s+"
                        r"(?:write|use|ask)|用我(?:提问|说话|写)的语言(?:回答|回复)", re.IGNORECASE)

FILE = r"(?P<file>[\w./~-]*[\w-]\.(?:jsonl|json|csv|parquet|tsv|txt|arrow))\b"
_FILE = re.compile(r"(?<![\w/.-])" + FILE, re.IGNORECASE)
_MODEL = re.compile(
    r"(?<![\w./-])(?P<model>(?:modelscope:)?[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*[\w]"
    r"|(?:qwen|llama|deepseek|mistral|mixtral|gemma|phi|smollm|chatglm|glm|baichuan|yi|internlm|tinyllama|"
    r"gpt2|minicpm|olmo|falcon)[\w.-]*\d[\w.-]*[\w]"
    r"|(?:qwen|llama|deepseek|mistral|gemma|phi|smollm|baichuan|internlm)(?![\w.-]))", re.IGNORECASE)
_HABIT = re.compile(r"\b(?:usually|normally|always|mostly|typically|generally|often|by\s+default|most\s+of\s+the\s+time"
                    r"|keep\s+using|for\s+(?:all|most|every)\s+(?:of\s+)?my\s+(?:runs?|jobs?|experiments?|fine-?tunes?)"
                    r"|every\s+time)\b|\bmy\s+(?:usual|default|normal|regular|main|favou?rite|go-to|standard)\b"
                    r"|常用|平时|平常|一般|通常|总是|经常|默认|惯用|习惯|常常|老是|一直", re.IGNORECASE)
_DATA_WORD = re.compile(r"\b(?:data\s*sets?|datasets?|data|training\s+(?:data|set)|corpus|corpora)\b|数据集|数据|语料"
                        r"|训练集", re.IGNORECASE)
_MODEL_WORD = re.compile(r"\b(?:models?|base\s+models?|llms?|checkpoints?)\b|模型|基座|底座", re.IGNORECASE)
_METHOD = re.compile(r"(?<![\w-])(?P<method>q-?lora|lora|full(?:\s+|-)?(?:fine-?tun\w*|parameter|sft)|全参(?:数)?|全量)"
                     r"(?![\w-])", re.IGNORECASE)
_METHOD_PREF = re.compile(r"\bi'?m\s+(?:a|an)\s+(?:big\s+)?(?:q-?lora|lora)\s+(?:person|fan|user|guy|girl)\b|"
                          r"\bfan\s+of\b|"
                          r"\b(?:i|we)\s+(?:prefer|like|love|(?:usually|normally|always|mostly|typically)\s+(?:use|"
                          r"go\s+with|do|pick|choose))\b|\bmy\s+(?:preferred|usual|default|favou?rite|go-to)\s+"
                          r"(?:method|approach|technique|fine-?tuning\s+method)\b|(?:我)?(?:喜欢|偏好|习惯|更喜欢|"
                          r"一般|通常|总是|默认|平时|常)(?:都)?(?:用|使用|选|做)", re.IGNORECASE)

_DOMAINS = {
    "medical": r"medic|clinic|health|patient|doctor|hospital|biomed|医|临床|病历|健康|患者|诊疗",
    "legal": r"legal|\blaw\b|lawyer|court|contract|法律|法务|合同|判决|律师",
    "finance": r"financ|bank|stock|trading|insurance|accounting|金融|财务|银行|股票|保险|会计|证券",
    "code": r"\bcode\b|coding|programming|software|sql|代码|编程|程序",
    "math": r"\bmath|arithmetic|数学|算术|奥数",
    "customer service": r"customer|support\s+tickets|客服|售后|工单",
    "education": r"educat|student|teacher|exam|教育|学生|考试|教学",
    "e-commerce": r"e-?commerce|shopping|product\s+review|电商|商品|购物",
    "science": r"scien|chemi|physic|biolog|科学|化学|物理|生物",
    "news": r"\bnews|新闻|资讯",
}
_DOMAIN_STATEMENT = [
    re.compile(r"\bi'?m\s+(?:building|training|making|fine-?tuning|developing)\s+(?:a|an|my)\s+[\w\s-]{0,30}?\s+"
               r"(?:on|for|with|from|about)\s+(?P<what>[\w\s&/'-]{3,60})", re.IGNORECASE),
    re.compile(r"\b(?:my|our)\s+(?:own\s+)?(?:data\s*sets?|datasets?|data|training\s+data|corpus|corpora|fine-?tuning\s+data)\s+"
               r"(?:is|are|'s|consists?\s+of|contains?|is\s+all|are\s+all)\s+(?:mostly\s+|mainly\s+|all\s+|usually\s+"
               r"|largely\s+)?(?P<what>.+)", re.IGNORECASE),
    re.compile(r"\b(?:i|we)\s+(?:mostly\s+|mainly\s+|usually\s+|only\s+)?(?:work|train|fine-?tune|finetune|deal)\s+"
               r"(?:mostly\s+|mainly\s+)?(?:with|on)\s+(?P<what>[\w\s&/'-]+?\s+(?:data|data\s*sets?|datasets?|dialogues?|"
               r"conversations?|documents?|texts?|q&a|qa|questions?|records?|notes?|reports?))\b", re.IGNORECASE),
    re.compile(r"我(?:们)?的?(?:数据集|数据|训练数据|语料|训练集)(?:都|主要|大多|大部分|基本)?(?:是|为|属于|来自)(?P<what>.+)"),
    re.compile(r"我(?:主要|一般|通常|平时)?(?:做|用|处理|训练)(?P<what>[\u4e00-\u9fffA-Za-z&]{1,12}?)"
               r"(?:领域)?的?(?:数据集|数据|问答|对话|语料|文本)"),
]
_NAME = [   # the lead words in any case, the name capitalised (not "call me later")
    re.compile(r"(?i:\bmy\s+name\s+is)\s+(?P<name>[A-Z][\w'-]*(?:\s+[A-Z][\w'-]*)?)"),
    re.compile(r"(?i:\b(?:please\s+)?call\s+me|\bi'?m\s+called|\bi\s+am\s+called|\bmy\s+friends\s+call\s+me)\s+"
               r"(?P<name>[A-Z][\w'-]*)"),
    re.compile(r"(?:我叫|我的名字是|我的名字叫|叫我)\s*(?P<name>[\u4e00-\u9fff]{1,4}|[A-Za-z][\w'-]*)")]

REMEMBER = re.compile(r"^\s*(?:please\s+|pls\s+|and\s+)?(?:remember|memori[sz]e|keep\s+in\s+mind|don'?t\s+forget|"
                      r"make\s+a\s+note)\s*(?:that|this|:|,)?\s*(?P<rest>.*)$"
                      r"|^\s*(?:请|麻烦)?(?:帮我)?(?:记住|记下|记一下|记着|牢记|别忘了)(?:一下)?[:：，,]?\s*(?P<rest_zh>.*)$",
                      re.IGNORECASE | re.DOTALL)
_QUESTION_START = re.compile(r"^\s*(?:what|which|who|whom|whose|where|when|why|how|is|are|am|was|were|do|does|did|can|"
                             r"could|would|should|will|shall|have|has|may|might)\b", re.IGNORECASE)
_QUESTION_ZH = re.compile(r"吗|呢|什么|哪|多少|几[个张块种]|是否|是不是|有没有|能不能|可不可以|怎么|如何|为什么|谁")
_HYPOTHETICAL = re.compile(r"\b(?:if|suppose|supposing|assuming|assume|imagine|would|were\s+to|wish|might|maybe|"
                           r"planning\s+to|want\s+to\s+buy|thinking\s+of)\b|如果|假如|假设|(?<![主只需])要是|打算买|想买|万一|是否",
                           re.IGNORECASE)
_NEGATED = re.compile(r"\b(?:not|no\s+longer|isn'?t|aren'?t|never|don'?t|doesn'?t|no)\b|不是|不再|没有|不用|别", re.I)
_CLAUSE = re.compile(r"[^,;，；、\n]+[,;，；、]?")
# "… and my GPU is …", "… and I usually …", "…，而且我…": a new clause about the writer.
_AND_SELF = re.compile(r"\s+(?:and|but|also|plus)\s+(?=(?:my|i|i'm|i've|i'd)\b)|(?:而且|并且|另外|还有|同时)(?=我)",
                       re.IGNORECASE)
# A sentence ends at . ! ? followed by a space or the end (not inside "med.jsonl" or "Qwen2.5"), or at 。！？.
_SENTENCE_END = re.compile(r"(?<=[.!?])(?:\s+|$)|(?<=[。！？])|\n")


@dataclass(frozen=True)
class Fact:
    """One thing a user said about themselves."""

    kind: str
    data: dict[str, Any]
    said: str                                   # the words it came from
    extra: dict[str, Any] = field(default_factory=dict, compare=False)


def is_question(clause: str) -> bool:
    """A question, by its shape: a question word at the start, a question mark, or Chinese question particles."""
    text = clause.strip()
    return bool(text.endswith(("?", "？")) or _QUESTION_START.match(text) or _QUESTION_ZH.search(text))


def statement_clauses(text: str) -> list[str]:
    """The clauses of ``text`` that state something (questions and hypotheses left out)."""
    out = []
    for sentence in filter(str.strip, _SENTENCE_END.split(text)):
        parts = [p.strip(" ,;，；、") for c in _CLAUSE.findall(sentence) for p in _AND_SELF.split(c)]
        parts = [p for p in parts if p.strip(" .!?。！？")]
        last_is_question = sentence.rstrip().endswith(("?", "？"))
        for i, part in enumerate(parts):
            trailing = last_is_question and i == len(parts) - 1
            if _HYPOTHETICAL.search(part) or ((trailing or is_question(part)) and not _POLITE_LANGUAGE.search(part)):
                continue
            out.append(part.strip(" .!?。！？"))
    return out


# "can you answer in Chinese?", "能不能用英文跟我说？": a request, though shaped as a question.
_POLITE_LANGUAGE = re.compile(r"^\s*(?:can|could|would|will)\s+you\b.*\b(?:chinese|mandarin|english)\b|"
                              r"^\s*(?:请)?(?:能不能|能否|可不可以|可以)\s*(?:用|说|讲).{0,3}(?:中文|汉语|英文|英语)",
                              re.IGNORECASE)


def extract_facts(text: str) -> list[Fact]:
    """Every fact ``text`` states about its writer (see the module docstring), in order, one per kind."""
    text = text.strip()
    if not text:
        return []
    m = REMEMBER.match(text)
    if m:
        rest = (m.group("rest") or m.group("rest_zh") or "").strip()
        return remembered(rest) if rest else []
    found: dict[str, Fact] = {}
    for clause in statement_clauses(text):
        for fact in _clause_facts(clause):
            found.setdefault(fact.kind, fact)
    return list(found.values())


def remembered(text: str) -> list[Fact]:
    """What "remember that TEXT" keeps: the structured facts in it, else TEXT as a note."""
    facts: dict[str, Fact] = {}
    for clause in statement_clauses(text) or [text]:
        for fact in _clause_facts(clause):
            facts.setdefault(fact.kind, fact)
    if facts:
        return list(facts.values())
    note = " ".join(text.split()).strip(" .。")
    return [Fact("note", {"text": note}, note)] if note else []


def _clause_facts(clause: str) -> list[Fact]:
    facts = []
    for reader in (_gpu, _language, _usual, _method, _domain, _name):
        facts.extend(reader(clause))
    return facts


# --- the readers ----------------------------------------------------------------------------------------------

def _gpu(clause: str) -> list[Fact]:
    data = read_gpu(clause)
    return [Fact("gpu", data, clause)] if data else []

def _language(clause: str) -> list[Fact]:
    if _LANG_AUTO.search(clause):
        return [Fact("language", {"lang": "auto"}, clause)]
    for rx in _LANG_PREF:
        m = rx.search(clause)
        if m and not re.search(r"\b(?:translate|translation|into)\b|翻译|译成", clause, re.IGNORECASE):
            return [Fact("language", {"lang": _LANGS[m.group("lang").lower()]}, clause)]
    return []


def _usual(clause: str) -> list[Fact]:
    """Usual data set and model: a habit ("usually", "常用") or "my data set is FILE" with a file or model named."""
    facts = []
    habit = _HABIT.search(clause)
    file_m = _FILE.search(clause)
    if file_m and (habit or re.search(r"\bmy\s+(?:data\s*set|dataset|data|training\s+(?:data|set))\s+is\b|"
                                      r"我的(?:数据集|数据|训练数据|训练集)(?:是|为)", clause, re.IGNORECASE)):
        if not _NEGATED.search(clause[:file_m.start()]):
            facts.append(Fact("usual_dataset", {"file": file_m.group("file")}, clause))
    elif habit and _DATA_WORD.search(clause):
        m = re.search(r"(?:data\s*set|dataset|data|数据集|数据)\s*(?:is|are|:|：|是|为)\s*"
                      r"[\"'“「]?(?P<name>[\w./-]{3,64})", clause, re.IGNORECASE)
        if m and not _MODEL.fullmatch(m.group("name")) and not _METHOD.fullmatch(m.group("name")):
            facts.append(Fact("usual_dataset", {"file": m.group("name")}, clause))
    model_text = _FILE.sub(" ", clause)
    model_m = _MODEL.search(model_text)
    habitual_model = habit and (_MODEL_WORD.search(clause) or re.search(
        r"\b(?:fine-?tune|train|use|run|work\s+with|start\s+from)\b|微调|训练|用", clause, re.IGNORECASE))
    said_model = re.search(r"\bmy\s+(?:base\s+)?model\s+is\b|我的(?:基础)?模型(?:是|为)", clause, re.IGNORECASE)
    if model_m and (habitual_model or said_model) and not _NEGATED.search(model_text[:model_m.start()]):
        facts.append(Fact("usual_model", {"model": model_m.group("model")}, clause))
    return facts


def _method(clause: str) -> list[Fact]:
    m = _METHOD.search(clause)
    if not m or not _METHOD_PREF.search(clause) or _NEGATED.search(clause[:m.start()]):
        return []
    raw = m.group("method").lower().replace("-", "")
    method = "qlora" if raw.startswith("q") else "lora" if raw == "lora" else "full"
    return [Fact("preferred_method", {"method": method}, clause)]


def _domain(clause: str) -> list[Fact]:
    for rx in _DOMAIN_STATEMENT:
        m = rx.search(clause)
        if not m:
            continue
        what = m.group("what").strip(" .。,，'\"“”")
        if not what or _FILE.search(what) or _MODEL.fullmatch(what) or len(what) > 80:
            continue
        if _NEGATED.match(what):
            continue
        domain = next((d for d, rx_d in _DOMAINS.items() if re.search(rx_d, what, re.IGNORECASE)), None)
        if domain is None and len(what.split()) > 6:
            continue
        return [Fact("dataset_domain", {"domain": domain or what.lower(), "topic": what}, clause)]
    return []


def _name(clause: str) -> list[Fact]:
    for rx in _NAME:
        m = rx.search(clause)
        if m:
            return [Fact("name", {"name": m.group("name").strip()}, clause)]
    return []
