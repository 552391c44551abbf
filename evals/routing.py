"""Routing eval: does a brain pick the right tools, in order, with the right key args?

The local brain routes each step of a message; the llm brain (``stackwise eval routing --brain llm``)
gets the whole message and is scored on the tool calls its model makes (``predict_calls``), so the
same table compares a model with the local router.

Cases live in ``evals/cases/routing.jsonl`` (``id``, ``lang``, ``text``, ``expect``). A case's tools
are right when the predicted tool sequence equals the expected one (no tool for chit-chat); its
args are right when, in addition, every expected key arg matches (strings case-insensitively,
``query`` by containment, numbers numerically, ``null`` meaning absent).
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

CASES = Path(__file__).parent / "cases" / "routing.jsonl"


def load_cases(path: Path = CASES) -> list[dict]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def value_matches(key: str, expected: Any, got: Any) -> bool:
    if expected is None:
        return got is None
    if got is None:
        return False
    if isinstance(expected, bool) or isinstance(got, bool):
        return expected == got
    if isinstance(expected, (int, float)):
        try:
            return math.isclose(float(expected), float(got), rel_tol=1e-9, abs_tol=1e-12)
        except (TypeError, ValueError):
            return False
    if isinstance(expected, list):
        return (isinstance(got, list) and len(got) == len(expected)
                and all(value_matches(key, e, g) for e, g in zip(expected, got, strict=True)))
    e, g = str(expected).strip().lower(), str(got).strip().lower()
    return e in g if key == "query" else e == g


def args_match(expected: dict, got: dict) -> list[str]:
    """The keys whose values differ (empty: all match)."""
    return [k for k, v in expected.items() if not value_matches(k, v, got.get(k))]


def predict(brain: Any, text: str) -> list[dict]:
    from agent.language import clean_text, detect_language, split_steps

    if hasattr(brain, "predict_calls"):     # the llm brain: the model sees the whole message
        return [{"tool": c["tool"], "args": c["args"]} for c in brain.predict_calls(text)]
    text = clean_text(text)
    lang = detect_language(text)
    calls = [brain.route_step(step, lang, {}) for step in split_steps(text)]
    return [{"tool": c["tool"], "args": c["args"]} for c in calls if c.get("tool")]


def run_routing(brain: Any, cases: list[dict] | None = None) -> dict:
    cases = cases if cases is not None else load_cases()
    rows: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: {"n": 0, "tool": 0, "args": 0})
    failures = []
    started = time.perf_counter()
    for case in cases:
        got = predict(brain, case["text"])
        want = case["expect"]
        tools_ok = [g["tool"] for g in got] == [w["tool"] for w in want]
        bad_args = []
        if tools_ok:
            for w, g in zip(want, got, strict=True):
                bad_args += [f"{w['tool']}.{k}" for k in args_match(w.get("args", {}), g["args"])]
        args_ok = tools_ok and not bad_args
        groups = {w["tool"] for w in want} or {"(no tool)"}
        if len(want) > 1:
            groups.add("(compound)")
        for group in groups:
            for key in ((group, case["lang"]), (group, "all")):
                rows[key]["n"] += 1
                rows[key]["tool"] += tools_ok
                rows[key]["args"] += args_ok
        for key in (("ALL", case["lang"]), ("ALL", "all")):
            rows[key]["n"] += 1
            rows[key]["tool"] += tools_ok
            rows[key]["args"] += args_ok
        if not args_ok:
            failures.append({"id": case["id"], "text": case["text"], "want": want, "got": got,
                             "why": "tools" if not tools_ok else ", ".join(bad_args)})
    elapsed = time.perf_counter() - started
    table = [{"group": g, "lang": lang, "n": r["n"], "tool_acc": r["tool"] / r["n"], "args_acc": r["args"] / r["n"]}
             for (g, lang), r in sorted(rows.items())]
    return {"brain": getattr(brain, "label", getattr(brain, "name", type(brain).__name__)), "cases": len(cases),
            "ms_per_case": 1000 * elapsed / max(1, len(cases)), "table": table, "failures": failures}


def format_routing(report: dict, *, show_failures: int = 20) -> str:
    brain = f" ({report['brain']})" if report.get("brain") else ""
    lines = [f"routing eval{brain}: {report['cases']} cases, {report['ms_per_case']:.1f} ms/case",
             f"{'group':<22}{'lang':<6}{'n':>5}{'tool acc':>11}{'args acc':>11}"]
    for row in report["table"]:
        lines.append(f"{row['group']:<22}{row['lang']:<6}{row['n']:>5}{row['tool_acc']:>10.1%}{row['args_acc']:>11.1%}")
    fails = report["failures"]
    if fails and show_failures:
        lines.append(f"\nfailures ({len(fails)}; first {min(show_failures, len(fails))}):")
        for f in fails[:show_failures]:
            lines.append(f"  {f['id']}: {f['text']}\n    want {json.dumps(f['want'], ensure_ascii=False)}"
                         f"\n    got  {json.dumps(f['got'], ensure_ascii=False)}  [{f['why']}]")
    return "\n".join(lines)
