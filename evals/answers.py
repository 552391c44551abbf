"""Answers eval: run ``explain_concept`` on every retrieval question and on questions about concepts
the base does not hold. Measures: answer language = question language (quoted document lines, which
keep their own language, are not counted), every answer from cards or documents carries citations,
the answer is about an expected card/document, and unknown concepts are said to be unknown.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from evals.retrieval import CASES, group_of, load_cases, open_base

UNKNOWN = Path(__file__).parent / "cases" / "unknown.jsonl"
GROUPS = ("en", "zh", "cross", "unknown", "all")


def answer_language(answer: str) -> str:
    """The language most of the answer is written in: Chinese characters against English words.
    Quoted document lines keep their own language and the sources block names papers (English
    either way), so neither is counted."""
    own = "\n".join(line for line in answer.splitlines() if not line.startswith(">"))
    body = "\n\n".join(own.split("\n\n")[:-1]) or own
    han = len(re.findall(r"[\u4e00-\u9fff]", body))
    words = len(re.findall(r"[A-Za-z]{2,}", body))
    return "zh" if han >= words else "en"


def answered(result: dict) -> set[str]:
    if result.get("mode") == "document":
        return {f"doc:{Path(e['source']).name}" for e in result.get("excerpts", [])}
    concept = result.get("concept")
    return set(concept) if isinstance(concept, list) else {concept} if concept else set()


def run_answers(settings: Any) -> dict:
    from tools.base import ToolContext
    from tools.registry import ToolRegistry

    kb = open_base(settings, settings.kb_embedder)
    registry = ToolRegistry.default()
    cases = load_cases(CASES) + [{**c, "kind": "unknown", "expect": []} for c in load_cases(UNKNOWN)]
    stats: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    failures: list[dict] = []
    try:
        ctx = ToolContext(home=kb.home, user_id="eval", knowledge=lambda: kb)
        for case in cases:
            record = registry.call("explain_concept", {"query": case["query"]}, ctx)
            group = "unknown" if case["kind"] == "unknown" else group_of(case)
            result = record["result"] if record["ok"] else {}
            mode = result.get("mode")
            lang_ok = record["ok"] and answer_language(result["explanation"]) == case["lang"]
            cited = bool(result.get("citations")) if mode in ("card", "compare", "document") else None
            expected = set(case["expect"])
            correct = mode == "unknown" if group == "unknown" else bool(answered(result) & expected)
            for g in (group, "all"):
                stats[g]["language"].append(lang_ok)
                stats[g]["correct"].append(correct)
                stats[g]["said_unknown"].append(mode == "unknown")
                if cited is not None:
                    stats[g]["cited"].append(cited)
            if not (lang_ok and correct and cited is not False):
                failures.append({"query": case["query"], "expect": case["expect"] or "unknown", "mode": mode,
                                 "got": sorted(answered(result)), "language_ok": lang_ok,
                                 "error": None if record["ok"] else record["error"]})
    finally:
        kb.close()
    table = {g: {"n": len(stats[g]["language"]),
                 **{m: round(sum(v) / len(v), 4) if (v := stats[g][m]) else None
                    for m in ("language", "cited", "correct", "said_unknown")}} for g in GROUPS}
    return {"groups": table, "failures": failures}


def format_answers(report: dict, show_failures: int = 15) -> str:
    head = f"{'group':<9}{'n':>5}{'language':>10}{'cited':>8}{'right':>8}{'unknown':>9}"
    lines = [head, "-" * len(head)]
    for group, row in report["groups"].items():
        cells = "".join(f"{row[m]:>{w}.3f}" if row[m] is not None else f"{'—':>{w}}"
                        for m, w in (("language", 10), ("cited", 8), ("correct", 8), ("said_unknown", 9)))
        lines.append(f"{group:<9}{row['n']:>5}{cells}")
    lines.append("right: answered about an expected card/document (unknown group: said it does not know); "
                 "cited: share of card/document answers with citations")
    if report["failures"] and show_failures:
        lines.append(f"failures ({len(report['failures'])}):")
        for f in report["failures"][:show_failures]:
            lines.append("  " + json.dumps(f, ensure_ascii=False)[:220])
    return "\n".join(lines)
