"""``stackwise eval memory``: is the right remembered fact used? (``evals/cases/memory*.jsonl``)

Each case is a user who states facts (``say``, one turn each, English or Chinese) and later asks or requests
something (``ask``) — in a new thread of a *new* ``Agent`` on the same home, so only long-term memory can
carry the fact over. ``others_say`` are statements of another user, which must never show up. The case passes
when every expectation holds:

- ``contains`` / ``not_contains``: strings in the answer (recall, show, forget, other users);
- ``answer_lang``: the answer's language (the language preference is used);
- ``args``: arguments of the tool the follow-up called or asked to confirm ("my usual data set" → med.jsonl);
- ``preview``: strings in the confirmation preview (the fine-tune preflight's advice for the user's GPU).

The follow-ups run beside a local tiny model (``Qwen2.5-0.5B``), a 7B-shaped one (``Qwen2.5-7B``: the real
config, tiny weights — the preflight reads only the config) and small chain-of-thought data sets.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

CASES = Path(__file__).parent / "cases" / "memory.jsonl"
# "dev": written first and used to improve the rules (first run 82.5 %); "holdout": written next, before any run on
# it (first run 61.9 %), then its failures guided generic fixes; "blind": written last and never tuned on — the
# honest estimate for new phrasings (first runs are recorded in CHANGELOG.md).
MEMORY_SETS = {"dev": CASES, "holdout": CASES.with_name("memory_holdout.jsonl"),
               "blind": CASES.with_name("memory_blind.jsonl")}
QWEN_7B = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584,
           "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
           "vocab_size": 152064, "max_position_embeddings": 32768, "tie_word_embeddings": False,
           "torch_dtype": "bfloat16", "rms_norm_eps": 1e-6, "rope_theta": 1000000.0}
DATA_SETS = ("med.jsonl", "cot.jsonl", "data.jsonl", "legal_qa.jsonl")
_CJK = re.compile(r"[\u4e00-\u9fff]")


def load_cases(path: Path = CASES) -> list[dict]:
    cases = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for case in cases:
        if not isinstance(case.get("say"), list) or not case.get("ask") or not case.get("expect"):
            raise ValueError(f"{path}: case {case.get('id')!r} needs say (a list), ask and expect")
    return cases


def make_workdir(folder: Path) -> Path:
    """Models and data sets the follow-ups name, built offline in a few seconds."""
    from tools.finetune.tiny import build_tiny_model

    build_tiny_model(folder / "Qwen2.5-0.5B", arch="qwen2")
    shutil.copytree(folder / "Qwen2.5-0.5B", folder / "Qwen2.5-7B")
    (folder / "Qwen2.5-7B" / "config.json").write_text(json.dumps(QWEN_7B), encoding="utf-8")
    rows = [{"Question": f"Patient {i} has a fever of {38 + i % 3} °C and a cough. What next?",
             "Complex_CoT": f"Fever and cough suggest an infection; case {i} needs an exam and fluids.",
             "Response": f"Examine patient {i}, give fluids and rest, and test if it lasts."} for i in range(80)]
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    for name in DATA_SETS:
        (folder / name).write_text(text, encoding="utf-8")
    return folder


def answer_language(text: str) -> str:
    """``zh`` when at least a fifth of the letters are Chinese characters, else ``en``."""
    han = len(_CJK.findall(text))
    latin = len(re.findall(r"[A-Za-z]", text))
    return "zh" if han and han * 5 >= han + latin else "en"


def check(case: dict, reply: Any) -> list[str]:
    """What went wrong (empty: the right fact was used)."""
    exp, answer, problems = case["expect"], reply.answer, []
    for s in exp.get("contains", []):
        if s.lower() not in answer.lower():
            problems.append(f"answer lacks {s!r}")
    for s in exp.get("not_contains", []):
        if s.lower() in answer.lower():
            problems.append(f"answer shows {s!r}")
    if exp.get("answer_lang") and answer_language(answer) != exp["answer_lang"]:
        problems.append(f"answer is in {answer_language(answer)}, not {exp['answer_lang']}")
    if "args" in exp:
        calls = [c.args for c in reply.tool_calls] + ([reply.pending.args] if reply.pending else [])
        if not any(all(isinstance(a, dict) and a.get(k) == v for k, v in exp["args"].items()) for a in calls):
            problems.append(f"no call with {exp['args']} (calls: {calls})")
    if "preview" in exp:
        preview = reply.pending.preview if reply.pending else ""
        for s in exp["preview"]:
            if s not in preview:
                problems.append(f"preview lacks {s!r}" + ("" if reply.pending else " (nothing pending)"))
    return problems


def run_memory_eval(settings: Any, cases: list[dict] | None = None) -> dict:
    """Run the cases on a fresh home: statements with one Agent, follow-ups with a second one (a restart)."""
    from agent import Agent

    cases = cases or load_cases()
    with tempfile.TemporaryDirectory(prefix="sw-memory-eval-") as tmp, _chdir(make_workdir(Path(tmp) / "work")):
        home = Path(tmp) / "home"
        first = Agent(settings.with_(home=home))
        try:
            for case in cases:
                for n, text in enumerate(case.get("others_say", [])):
                    first.ask(text, thread_id=f"{case['id']}-other-{n}", user_id=f"{case['id']}-other")
                for n, text in enumerate(case["say"]):
                    first.ask(text, thread_id=f"{case['id']}-say-{n}", user_id=case["id"])
        finally:
            first.close()
        second = Agent(settings.with_(home=home))
        results = []
        try:
            for case in cases:
                reply = second.ask(case["ask"], thread_id=f"{case['id']}-ask", user_id=case["id"])
                results.append({"id": case["id"], "lang": case["lang"], "kind": case["kind"], "ask": case["ask"],
                                "problems": check(case, reply), "answer": reply.answer[:300]})
        finally:
            second.close()
    return summarize(results)


def summarize(results: list[dict]) -> dict:
    groups: dict[str, dict[str, list[bool]]] = {"lang": defaultdict(list), "kind": defaultdict(list)}
    for r in results:
        ok = not r["problems"]
        groups["lang"][r["lang"]].append(ok)
        groups["kind"][r["kind"]].append(ok)
    passed = sum(not r["problems"] for r in results)
    return {"cases": len(results), "passed": passed, "right_fact_pct": round(100 * passed / max(len(results), 1), 1),
            "by_lang": {k: _rate(v) for k, v in sorted(groups["lang"].items())},
            "by_kind": {k: _rate(v) for k, v in sorted(groups["kind"].items())},
            "failures": [r for r in results if r["problems"]]}


def _rate(oks: list[bool]) -> dict:
    return {"cases": len(oks), "passed": sum(oks), "pct": round(100 * sum(oks) / len(oks), 1)}


def format_memory(report: dict, show_failures: int = 15) -> str:
    lines = [f"right fact used: {report['passed']}/{report['cases']} = {report['right_fact_pct']:.1f} %  "
             "(target ≥ 95 %)", "", f"{'group':<22}{'cases':>6}{'passed':>8}{'%':>8}"]
    for title, key in (("language", "by_lang"), ("kind", "by_kind")):
        for name, r in report[key].items():
            lines.append(f"{title + ': ' + name:<22}{r['cases']:>6}{r['passed']:>8}{r['pct']:>8.1f}")
    for f in report["failures"][:show_failures]:
        lines.append(f"✗ {f['id']}: {f['ask']!r} — {'; '.join(f['problems'])}\n    answer: {f['answer'][:160]!r}")
    return "\n".join(lines)


@contextlib.contextmanager
def _chdir(folder: Path):
    before = Path.cwd()
    os.chdir(folder)
    try:
        yield folder
    finally:
        os.chdir(before)
