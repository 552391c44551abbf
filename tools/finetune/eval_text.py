"""The held-out evaluation (``summary.json``'s ``evaluation``, see :mod:`tools.finetune.evaluate`) as one line
of text, in English or Chinese, for ``finetune_status`` and the end-of-job announcement."""

from __future__ import annotations

import math
from typing import Any


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) \
        and math.isfinite(value) else None


def _pair(values: dict, key: str, show) -> str | None:
    """``before → after`` of one evaluation number (just ``after`` when "before" is unknown)."""
    before, after = (_num((values.get(side) or {}).get(key)) for side in ("before", "after"))
    if after is None:
        return None
    return f"{show(before)} → {show(after)}" if before is not None else show(after)


def _plain(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.3g}"


def _percent(x: float) -> str:
    return f"{100 * x:.0f}%"


def evaluation_text(ev: Any, zh: bool) -> str | None:
    """The held-out evaluation in one line (summary.json's ``evaluation``, see tools/finetune/evaluate.py), e.g.
    ``held-out loss 2.31 → 1.72 (perplexity 10.1 → 5.6), <think> format 12% → 94%, exact match 0% → 40%``."""
    if not isinstance(ev, dict):
        return None
    ev = {**ev, "before": ev.get("before") if isinstance(ev.get("before"), dict) else None,
          "after": ev.get("after") if isinstance(ev.get("after"), dict) else None}
    notes = [str(n) for n in ev.get("notes") or []]
    if ev["after"] is None and not ev.get("rows") and notes and notes[-1].startswith("no held-out rows"):
        return ("没有留出集（数据少于 10 行，或 eval_fraction 为 0），未做评估。" if zh else
                "No held-out evaluation: the data set has no held-out rows.")
    loss, ppl = _pair(ev, "loss", _plain), _pair(ev, "perplexity", _plain)
    fmt, em, f1 = (_pair(ev, "format_ok", _percent), _pair(ev, "exact_match", _percent),
                   _pair(ev, "f1", lambda x: f"{x:.2f}"))
    if not (loss or fmt or em):     # it failed, or had nothing it could measure: say why
        reason = notes[-1] if notes else "?"
        return f"留出集评估没有结果：{reason}" if zh else f"Held-out evaluation: no result ({reason})."
    rows, answers = ev.get("rows"), ev.get("answers")
    parts = []
    if zh:
        if loss:
            parts.append(f"loss {loss}" + (f"（困惑度 {ppl}）" if ppl else ""))
        if fmt:
            parts.append(f"<think> 格式 {fmt}")
        if em:
            parts.append(f"精确匹配 {em}" + (f"，词重叠 F1 {f1}" if f1 else ""))
        elif answers:
            parts.append("参考答案较长，不计算精确匹配 / F1")
        return f"留出集评估（{rows} 行，生成 {answers} 条回答）：" + "，".join(parts) + "。"
    if loss:
        parts.append(f"loss {loss}" + (f" (perplexity {ppl})" if ppl else ""))
    if fmt:
        parts.append(f"<think> format {fmt}")
    if em:
        parts.append(f"exact match {em}" + (f", token F1 {f1}" if f1 else ""))
    elif answers:
        parts.append("exact match / F1 not applicable (long references)")
    return f"Held-out evaluation ({rows} rows, {answers} answers): " + ", ".join(parts) + "."
