"""Checks on a model's answer before the user sees it: numbers come from the tools, sources are cited.

A number in the answer is grounded when a tool result (or the user's own message) holds the same
number — exactly, or rounded to the digits the answer shows (0.8123 may read 0.81 or 81.2 %, never
0.82). Small whole numbers (0–9: list items, "2 texts") are not checked.

Example:
    >>> ungrounded_numbers("cosine 0.81, rank 16", [{"cosine": 0.8123}, "lora rank 16"])
    []
    >>> ungrounded_numbers("cosine 0.93", [{"cosine": 0.8123}])
    ['0.93']
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

# Not glued to ASCII letters or digits ("Qwen2.5", "R1", "24GB" are names and units, not claims);
# Chinese text around a number ("为0.68。") is fine.
NUMBER = re.compile(r"(?<![A-Za-z0-9_.])[-−]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?%?"
                    r"(?![A-Za-z0-9_])")


def _parse(token: str) -> tuple[float, int, bool] | None:
    """(value, decimals shown, is a percentage) of a number as written."""
    percent = token.endswith("%")
    core = token.rstrip("%").replace(",", "").replace("−", "-").lstrip("-")
    try:
        value = float(core)
    except ValueError:
        return None
    mantissa = re.split(r"[eE]", core)[0]
    decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
    if "e" in core.lower():
        decimals = max(decimals, -int(re.split(r"[eE]", core)[1]) + decimals)
    return value, decimals, percent


def numbers_in(value: Any) -> Iterable[float]:
    """Every number in a JSON-like value: numeric leaves, and numbers written inside strings."""
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, int | float):
        if math.isfinite(value):
            yield abs(float(value))
    elif isinstance(value, str):
        for token in NUMBER.findall(value):
            parsed = _parse(token)
            if parsed:
                yield parsed[0] / 100 if parsed[2] else parsed[0]
                if parsed[2]:
                    yield parsed[0]
    elif isinstance(value, dict):
        for v in value.values():
            yield from numbers_in(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from numbers_in(v)


def _matches(value: float, decimals: int, sources: list[float]) -> bool:
    tolerance = 0.5 * 10 ** -decimals + 1e-12
    return any(abs(s - value) <= tolerance * (1 + 1e-9) or math.isclose(s, value, rel_tol=1e-9) for s in sources)


def ungrounded_numbers(answer: str, sources: list[Any]) -> list[str]:
    """The numbers of ``answer`` that no source holds (empty: every checked number is grounded)."""
    known = sorted(set(numbers_in(sources)))
    missing = []
    for token in NUMBER.findall(answer):
        parsed = _parse(token)
        if parsed is None:
            continue
        value, decimals, percent = parsed
        if not percent and decimals == 0 and value < 10:
            continue
        ok = _matches(value, decimals, known) or (percent and _matches(value / 100, decimals + 2, known))
        if not ok:
            missing.append(token)
    return missing


def cites(answer: str, citations: list[dict]) -> bool:
    """Whether the answer names at least one of the sources (by title, id or address)."""
    low = answer.lower()
    for c in citations:
        for key in ("title", "id", "source"):
            text = str(c.get(key) or "").strip().lower()
            if len(text) >= 4 and text in low:
                return True
    return False


def with_sources(answer: str, citations: list[dict], lang: str) -> str:
    """The answer, with the sources listed under it when it cites none of them."""
    if not citations or cites(answer, citations):
        return answer
    head = "来源：" if lang == "zh" else "Sources:"
    lines = [f"[{i}] {c.get('title') or c.get('id')}" + (f" — {c['source']}" if c.get("source") else "")
             for i, c in enumerate(citations, start=1)]
    return answer.rstrip() + "\n\n" + head + "\n" + "\n".join(lines)
