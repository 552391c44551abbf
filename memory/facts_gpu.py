"""Reading a GPU from what a user says: the name as people write it, its VRAM (said, or the usual size of that
model), how many, or that there is none ("I don't have a GPU"). Used by :mod:`memory.facts`.

Example:
    >>> read_gpu("my GPU is an RTX 4090 with 24 GB")
    {'name': 'RTX 4090', 'memory_gb': 24.0, 'memory_assumed': False}
    >>> read_gpu("我有两张 4090")["count"], read_gpu("I have 3060 rows in my data")
    (2, None)
"""

from __future__ import annotations

import re
from typing import Any

GPU_MEMORY = {
    "RTX 5090": 32, "RTX 5080": 16, "RTX 5070 TI": 16, "RTX 5070": 12, "RTX 4090": 24, "RTX 4080 SUPER": 16,
    "RTX 4080": 16, "RTX 4070 TI SUPER": 16, "RTX 4070 TI": 12, "RTX 4070 SUPER": 12, "RTX 4070": 12,
    "RTX 4060 TI": 8, "RTX 4060": 8, "RTX 3090 TI": 24, "RTX 3090": 24, "RTX 3080 TI": 12, "RTX 3080": 10,
    "RTX 3070 TI": 8, "RTX 3070": 8, "RTX 3060 TI": 8, "RTX 3060": 12, "RTX 3050": 8, "RTX 2080 TI": 11,
    "RTX 2080 SUPER": 8, "RTX 2080": 8, "RTX 2070": 8, "RTX 2060": 6, "GTX 1080 TI": 11, "GTX 1080": 8,
    "GTX 1070": 8, "GTX 1660 TI": 6, "GTX 1660": 6, "GTX 1650": 4, "A100": 40, "H100": 80, "H200": 141,
    "H800": 80, "A800": 80, "H20": 96, "L40S": 48, "L40": 48, "L20": 48, "L4": 24, "A10G": 24, "A10": 24,
    "A6000": 48, "RTX A6000": 48, "A5000": 24, "A4000": 16, "V100": 16, "T4": 16, "P100": 16, "K80": 12,
    "MI300X": 192, "MI250": 128, "RX 7900 XTX": 24, "910B": 64,
}

_GPU_NAME = re.compile(
    r"(?<![\w.])(?:nvidia\s*|geforce\s*|英伟达\s*|amd\s*|radeon\s*)*"
    r"(?P<name>(?:rtx|gtx)[\s-]*a?\d{4}(?:[\s-]*(?:ti|super)){0,2}(?:\s*laptop)?"
    r"|rtx\s*a\d{4}"
    r"|(?:a100|h100|h200|h800|a800|h20|l40s|l40|l20|l4|a10g|a10|a6000|a5000|a4000|v100|t4|p100|k80)(?=s?\b)s?"
    r"|mi\d{3}x?|rx\s*\d{4}\s*xtx?|910b|m[1-4]\s*(?:pro|max|ultra)"
    r"|(?:50|40|30|20)[5-9]0(?:[\s-]*(?:ti|super)){0,2}|1[06][5-8]0(?:[\s-]*(?:ti|super))?)"
    r"(?![\w])", re.IGNORECASE)
_MEMORY = re.compile(r"(?<![\w.])(?P<gb>\d{1,4}(?:\.\d+)?)\s*(?:gb|gib|g|gigs?|千兆)(?![a-z])", re.IGNORECASE)
_GPU_WORD = re.compile(r"\b(?:gpus?|graphics\s+cards?|video\s+cards?|cards?|vram|gpu\s+memory)\b|显卡|显存|卡|[张块]",
                       re.IGNORECASE)
_VRAM_WORD = re.compile(r"\b(?:vram|gpu\s+memory|video\s+memory|memory)\b|显存", re.IGNORECASE)
_NO_GPU = re.compile(r"\b(?:i|we)\s+(?:don'?t|do\s+not|dont)\s+(?:have|own)\s+(?:an?\s+|any\s+)?(?:nvidia\s+)?"
                     r"(?:gpu|graphics\s+card)|\b(?:i\s+have|i'?m\s+on|i\s+use)\s+(?:only\s+)?(?:a\s+)?cpu[- ]only\b"
                     r"|\bi\s+only\s+have\s+(?:a\s+)?cpu|\bno\s+gpu\s+here|我没有(?:独立)?(?:显卡|gpu|GPU)"
                     r"|我(?:只有|只能用)\s*cpu|我这(?:里|边)?没有(?:显卡|gpu|GPU)", re.IGNORECASE)
# Who owns the GPU: the user ("my …", "I have …", "我的…", "我有…").
_GPU_MINE = re.compile(
    r"\bmy\s+(?:own\s+)?(?:gpus?|graphics\s+cards?|video\s+cards?|cards?|machine|box|rig|workstation|pc|"
    r"laptop|server|vram)\b|\bmy\s+(?:nvidia\s+|geforce\s+)?(?=(?:rtx|gtx|a100|h100|h200|a6000|v100|t4|l4|\d{4}))"
    r"|^\s*(?:gpus?|graphics\s+card|显卡|gpu\s*型号|显卡型号)\s*[:：=]|\bour\s+(?:gpus?|cards?|cluster|lab|servers?)\b"
    r"|\b(?:i|we)\s*(?:have|'ve\s+got|have\s+got|got|own|use|am\s+using|'m\s+using|run|'m\s+running|am\s+running|"
    r"train\s+on|'m\s+training\s+on|am\s+training\s+on|'m\s+on|am\s+on|work\s+on|bought|just\s+bought|"
    r"upgraded\s+to|switched\s+to|only\s+have)\b|\bon\s+my\b|\bi'?ve\s+an?\b|\bi\s+have\s+\d+\s*(?:x|×)"
    r"|我的?\s*(?:显卡|gpu|卡|机器|电脑|服务器|显存)|我(?:有|用|在用|用的是|使用|手上有|手里有|这边是|这里是|买了|换成了?|换了|"
    r"升级到|升级成|只有)|我(?:这|那)(?:边|里)", re.IGNORECASE)
_NEGATED = re.compile(r"\b(?:not|no\s+longer|isn'?t|aren'?t|never|don'?t|doesn'?t|no)\b|不是|不再|没有|不用|别", re.I)


def gpu_name(raw: str) -> str:
    """A GPU's name as people write it in specs: ``rtx4090`` → ``RTX 4090``, ``3060ti`` → ``RTX 3060 Ti``.

    Example:
        >>> gpu_name("4090"), gpu_name("rtx3060ti"), gpu_name("a100"), gpu_name("GTX 1080")
        ('RTX 4090', 'RTX 3060 Ti', 'A100', 'GTX 1080')
    """
    name = re.sub(r"[\s-]+", " ", raw.strip()).upper()
    name = re.sub(r"^(RTX|GTX)\s*(A?\d{4})", r"\1 \2", name)
    name = re.sub(r"(\d)\s*(TI|SUPER)", r"\1 \2", name)
    name = re.sub(r"\s*(TI|SUPER)\b", lambda m: " " + m.group(1), name).replace("  ", " ")
    if re.fullmatch(r"(?:50|40|30|20)[5-9]0(?: TI| SUPER)*", name):
        name = "RTX " + name
    elif re.fullmatch(r"1[06][5-8]0(?: TI| SUPER)?", name):
        name = "GTX " + name
    name = re.sub(r"^RX\s*(\d{4})\s*(XTX?)$", r"RX \1 \2", name)
    if name.endswith("S") and name not in GPU_MEMORY and name[:-1] in GPU_MEMORY:
        name = name[:-1]                               # "8 A100s"
    name = re.sub(r"^M([1-4])\s*(PRO|MAX|ULTRA)$", lambda m: f"M{m.group(1)} {m.group(2).title()}", name)
    return re.sub(r"\bTI\b", "Ti", re.sub(r"\bSUPER\b", "Super", name)).replace("LAPTOP", "Laptop")


def read_gpu(clause: str) -> dict[str, Any] | None:
    """The GPU ``clause`` says its writer has, as ``data`` of a ``gpu`` fact, or None."""
    if _NO_GPU.search(clause):
        return {"name": None, "memory_gb": 0.0, "none": True}
    if not _GPU_MINE.search(clause):
        return None
    name_m = _GPU_NAME.search(clause)
    bare_number = bool(name_m and re.fullmatch(r"[\d\s-]+(?:ti|super)?", name_m.group("name"), re.IGNORECASE))
    if name_m and bare_number and not (_GPU_WORD.search(clause) or re.search(r"\bmy\s+\d{4}|on\s+my", clause, re.I)
                                      or _MEMORY.search(clause[name_m.end():])
                                      or not clause[name_m.end():].strip(" .。!！")):
        name_m = None     # "I have 3060 rows": a number, not a GPU
    mem = None
    for m in _MEMORY.finditer(clause):
        value = float(m.group("gb"))
        if 1 <= value <= 4096 and not (name_m and name_m.start() <= m.start() < name_m.end()):
            mem = value
            break
    if name_m is None:
        said_gpu = re.search(r"\bmy\s+(?:gpu|card)\b|显卡|我的卡", clause, re.IGNORECASE)
        if mem is not None and (_VRAM_WORD.search(clause) or said_gpu):
            if _NEGATED.search(clause):
                return None
            return {"name": None, "memory_gb": mem, "memory_assumed": False}
        return None
    between = clause[:name_m.start()]
    if re.search(r"\b(?:not|isn'?t|no\s+longer)\b|不是|不再", between, re.IGNORECASE):
        return None
    name = gpu_name(name_m.group("name"))
    assumed = mem is None
    if assumed:
        base = re.sub(r" Laptop$", "", name).upper()
        mem = GPU_MEMORY.get(base) or GPU_MEMORY.get(base.replace("RTX ", ""))
    data = {"name": name, "memory_gb": float(mem) if mem is not None else None, "memory_assumed": assumed}
    count = re.search(r"\b(\d)\s*(?:x|×)\s*(?=\S)|(?:两|二)\s*[张块]|(\d)\s*[张块]", clause)
    if count:
        n = int(count.group(1) or count.group(2) or 2)
        if 1 < n <= 16:
            data["count"] = n
    return data
