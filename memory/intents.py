"""What a message asks of the user memory: remember, forget, show all, recall one thing, or something about other
users (never answered). Pure text rules, English and Chinese; the brain decides what to do with them.

Example:
    >>> memory_intent("forget my GPU"), memory_intent("忘记我的显卡")
    (('forget', 'gpu'), ('forget', 'gpu'))
    >>> memory_intent("what do you remember about me?"), memory_intent("what did the other user ask?")
    (('show', None), ('other_users', None))
    >>> memory_intent("what GPU do I have?"), memory_intent("what is LoRA?")
    (('recall', None), None)
"""

from __future__ import annotations

import re

from memory.facts import REMEMBER, is_question

# Which fact kinds a question or a forget command is about.
KIND_WORDS = {
    "gpu": r"\bgpus?\b|graphics\s+card|video\s+card|\bcards?\b|\bvram\b|gpu\s+memory|\bhardware\b|显卡|显存|\bgpu|卡"
           r"|硬件",
    "language": r"\blanguage\b|\bchinese\b|\benglish\b|语言|中文|英文|英语",
    "dataset_domain": r"kind\s+of\s+data|type\s+of\s+data|\bdomain\b|what\s+(?:sort|kind)\s+of\s+data|\bcorpus\b|"
                      r"data\s+(?:is|are)?\s*about|语料|领域|什么样的数据|哪类数据|数据.{0,4}(?:类型|方面|关于)|什么(?:类型|方面)的数据",
    "usual_dataset": r"data\s*sets?|datasets?|\bfiles?\b|数据集|文件|训练数据",
    "usual_model": r"\bmodels?\b|模型",
    "preferred_method": r"\bmethod\b|\bq?lora\b|\bapproach\b|方法|方式|qlora|lora",
    "name": r"\bname\b|call\s+me|\bwho\s+am\s+i\b|名字|叫什么|我是谁",
}
_FORGET = re.compile(
    r"^\s*(?:please\s+|pls\s+|now\s+)?(?:forget|erase|delete|remove|wipe|clear)\s+(?P<what>.+?)\s*[.!]*$"
    r"|^\s*(?:请|麻烦)?(?:你)?(?:忘记|忘掉|忘了|删除|删掉|清除|清空)(?:掉)?(?P<what_zh>.+?)[。！!]*$", re.IGNORECASE)
_FORGET_TARGET = re.compile(
    r"\bmy\b|\bme\b|\bi\b|\babout\s+me\b|\bmemory\b|\bmemories\b|\bwhat\s+you\s+(?:know|remember)\b|"
    r"\beverything\b|\bthat\s+(?:i|my)\b|\bthe\s+(?:fact|note)\b|我|记忆|记住的|全部|所有|一切", re.IGNORECASE)
_FORGET_EXCLUDE = re.compile(r"^\s*(?:forget\s+(?:it|about\s+it|that)|never\s*mind)\s*[.!]*$|\bknowledge\s+base\b|"
                             r"\bft-\d+|\bjob\b|\bupload|\bfrom\s+(?:the\s+)?kb\b|知识库|任务|算了", re.IGNORECASE)
_ALL = re.compile(r"^(?:(?:all|everything|it\s+all|all\s+of\s+it)(?:\s+about\s+me)?|(?:everything|all|what)\s+you\s+"
                  r"(?:know|remember|kept|keep)(?:\s+about\s+me)?|(?:about\s+)?me|my\s+(?:memory|memories|facts|data|"
                  r"profile|info(?:rmation)?)|(?:all\s+)?my\s+facts)$|^(?:关于)?我的?(?:一切|所有信息|全部信息|信息|记忆|"
                  r"资料)?$|^(?:所有|全部|一切)(?:信息|记忆|内容)?$|^你(?:记住|知道)的?(?:关于我的)?(?:一切|所有|全部)"
                  r"(?:信息|内容)?$", re.IGNORECASE)
_SHOW = re.compile(
    r"\bwhat\s+(?:do|did)\s+you\s+(?:know|remember|keep|store|have)\s+(?:about|on)\s+me\b|\bwhat\s+(?:have\s+you|do\s+you)"
    r"\s+(?:remembered|stored|kept|saved)\b|\bshow\s+(?:me\s+)?(?:my\s+)?(?:memory|memories|facts|profile|what\s+you\s+"
    r"(?:know|remember))|\b(?:list|show)\s+(?:everything|all)\s+you\s+(?:know|remember)|\bwhat\s+do\s+you\s+remember\s*\?"
    r"|你(?:都)?(?:记得|记住了?|知道|存了?)(?:关于)?我(?:的)?(?:什么|哪些|些什么)|(?:显示|查看|列出|看看)我的(?:记忆|信息|资料)"
    r"|你(?:都)?记住了(?:什么|哪些)", re.IGNORECASE)
_OTHERS = re.compile(
    r"\b(?:other|another|different|previous|last)\s+(?:users?|persons?|people|customers?|accounts?)\b|\bsomeone\s+else"
    r"|\beveryone\s+else|\bother\s+people'?s?\b|\b(?:alice|bob)'s\s+(?:question|message|memory|gpu|data|jobs?|files?)"
    r"|(?:其他|别的|另一个|其它|上一个|之前的)(?:用户|人)|别人", re.IGNORECASE)
_SELF = re.compile(r"\b(?:my|mine|i|me|i'm|i've|we|our|us)\b|我", re.IGNORECASE)
# How-to, why and can-I questions want an explanation or a tool, not a remembered fact ("how do I use LoRA on my GPU?").
_HOW_TO = re.compile(r"^\s*(?:how\s+(?:do|can|should|would|could|to)\b|why\b|can\s+(?:i|we)\b|should\s+(?:i|we)\b|"
                     r"is\s+it\b|what\s+if\b|explain\b)|怎么|怎样|如何|为什么|为啥|能不能|可不可以|可以.{0,20}吗|应该",
                     re.IGNORECASE)
_RECALL = re.compile(
    r"\b(?:do|did)\s+you\s+(?:remember|know|recall)\b|\bwhat\s+did\s+i\s+(?:say|tell|mention)|\bi\s+(?:told|said|"
    r"mentioned)\b|\b(?:what|where|when|who|which)(?:'s|\s+is|\s+are|\s+was|\s+were)\s+(?:my|our)\b|"
    r"\b(?:what|which|where|when)(?:\s+\w+){0,3}\s+(?:do|does|did|am|is|are|have|has)\s+(?:i|my|we|our)\b|\bhow\s+(?:much|many)(?:\s+\w+){0,3}\s+(?:do|does|did|have|has)\s+(?:i|my)\b|"
    r"\bwho\s+am\s+i\b|\bremind\s+me\b|\btell\s+me\s+(?:what|which|my)\b|\b(?:what|which)\s+\w+(?:\s+\w+)?\s+i\s+"
    r"(?:have|use|own|prefer|work\s+with|train\s+on)\b|\bin\s+which\s+language\b|\bwhat\s+language\b"
    r"|\b(?:do|did|am|have)\s+i\s+(?:have|own|use|prefer|got|need)\b"
    r"|你(?:还)?记得|我(?:告诉|跟你说|说)过|我(?:的|常用的|平时用的|一般用的|最常用的|经常用的|用的)[^，。？?]{0,12}?"
    r"(?:什么|是啥|哪|多大|多少|是不是|吗|几)|我(?:平时|一般|通常|常|经常)?"
    r"(?:用|在用|微调|训练)(?:的)?(?:是)?(?:什么|哪|啥)|我(?:有|用)(?:的)?(?:是)?(?:什么|哪|几|多少)|我(?:是)?谁|我叫什么|"
    r"是我(?:常用|平时用|一般用|最常用|用)的|(?:用|以)什么语言", re.IGNORECASE)
# Questions about the answer language need no "my": "which language should you answer in?"
_LANGUAGE_QUESTION = re.compile(r"\b(?:which|what)\s+language\s+(?:should|do|will|must)\s+you\b"
                                r"|你(?:应该|要)?用什么语言", re.IGNORECASE)
# "remind me which GPU I have", "tell me my usual data set", "告诉我我的显卡": questions without a question mark.
_ASK_IMPERATIVE = re.compile(r"^\s*(?:please\s+)?(?:remind\s+me|tell\s+me|say)\b|^\s*(?:请)?(?:告诉我|提醒我|说说)",
                             re.IGNORECASE)
# Signs of a tool request: then a question about "my job" or "my file" goes to the tool, not to memory.
_TOOLISH = re.compile(r"\bft-\d+|\bstatus\b|\bprogress\b|\bjobs?\b|\bcancel\b|\bshap\b|\bsimilar|\bdistance\b|"
                      r"\bclosest\b|\bnearest\b|\bcompare\b|\bfeatures?\b|\bpredict|"
                      r"\bfine-?tune\s+(?!on\b|with\b|it\b|them\b|most\b)\w|(?<!\w)['\"]|[“「]|\.\w{2,7}\b|\bexplain\b|\breport\b|进度|状态|任务|取消|"
                      r"相似|距离|解释|报告|特征|预测|影响", re.IGNORECASE)


def memory_intent(text: str) -> tuple[str, str | None] | None:
    """``(action, detail)``: ``("remember", None)``, ``("forget", KIND | "all" | WORDS)``, ``("show", None)``,
    ``("other_users", None)``, ``("recall", None)`` (worded as a memory question) or ``("recall", "maybe")`` (a
    question about the asker: memory answers only when a fact clearly fits) — or None when the text is no memory
    matter."""
    t = text.strip()
    if not t:
        return None
    if _OTHERS.search(t):
        return "other_users", None
    if REMEMBER.match(t):
        return "remember", None
    forget = _FORGET.match(t)
    if forget and not _FORGET_EXCLUDE.search(t):
        what = (forget.group("what") or forget.group("what_zh") or "").strip(" .。!！?？")
        if _FORGET_TARGET.search(what) or re.match(r"forget\b|忘", t, re.IGNORECASE):
            return "forget", forget_target(what)
    if _SHOW.search(t):
        return "show", None
    asks = is_question(t) or _ASK_IMPERATIVE.match(t)
    about_me = asks and _SELF.search(t) and not _TOOLISH.search(t) and not _HOW_TO.search(t)
    if _LANGUAGE_QUESTION.search(t) or (about_me and _RECALL.search(t)):
        return "recall", None
    if about_me:
        return "recall", "maybe"     # about the asker, but not worded as recall: only a clear memory hit answers it
    return None


def forget_target(what: str) -> str:
    """``"all"``, a fact kind, or the words themselves (matched against notes by meaning)."""
    w = re.sub(r"^(?:about\s+|that\s+|the\s+fact\s+that\s+|what\s+you\s+know\s+about\s+|关于)", "", what.strip(),
               flags=re.IGNORECASE).strip()
    if _ALL.match(w):
        return "all"
    kinds = kinds_in(w)
    stripped = re.sub(r"^(?:my|我的?)\s*", "", w, flags=re.IGNORECASE)
    if len(kinds) == 1 and len(stripped.split()) <= 4 and len(stripped) <= 24:
        return kinds[0]
    return w


def kinds_in(text: str) -> list[str]:
    """The fact kinds ``text`` mentions (for "what GPU do I have" → ``["gpu"]``)."""
    found = [k for k, rx in KIND_WORDS.items() if re.search(rx, text, re.IGNORECASE)]
    if "dataset_domain" in found and "usual_dataset" in found:
        found.remove("usual_dataset")      # "what kind of data sets do I use" asks about the domain
    if "preferred_method" in found and "usual_model" in found and re.search(r"lora|method|方法", text, re.I):
        found.remove("usual_model")
    return found


# "my usual data set" / "我常用的数据集", "my usual model" / "我常用的模型": references the brain resolves from memory.
USUAL_DATASET_REF = re.compile(
    r"\bmy\s+(?:usual|default|normal|regular|go-?to|favou?rite|main|standard|typical)\s+(?:data\s*set|dataset|data|"
    r"training\s+(?:data|set))|(?:我)?(?:常用|平时用|一般用|惯用|默认|经常用|最常用|平常用)的?(?:那个)?(?:数据集|数据|训练集)",
    re.IGNORECASE)
USUAL_MODEL_REF = re.compile(
    r"\bmy\s+(?:usual|default|normal|regular|go-?to|favou?rite|main|standard|typical)\s+(?:base\s+)?model"
    r"|(?:我)?(?:常用|平时用|一般用|惯用|默认|经常用|最常用|平常用)的?(?:那个)?(?:基础)?模型", re.IGNORECASE)
