"""The routing eval: its scoring rules, and the integrity of the case files it reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evals.routing import CASES, format_routing, load_cases, run_routing, value_matches
from tools.registry import ToolRegistry

SETS = [CASES, CASES.with_name("routing_holdout.jsonl")]


def test_value_matching_rules():
    assert value_matches("query", "QLoRA", "what QLoRA means")          # query: containment
    assert not value_matches("base_model", "Qwen", "Qwen2.5-0.5B")      # other strings: exact
    assert value_matches("base_model", "qwen2.5-0.5b", "Qwen2.5-0.5B")  # … but case-insensitive
    assert value_matches("learning_rate", 2e-4, 0.0002)
    assert not value_matches("lora_rank", 16, 8)
    assert value_matches("job_id", None, None) and not value_matches("job_id", None, "ft-1")
    assert value_matches("texts", ["a", "B"], ["A", "b"]) and not value_matches("texts", ["a", "b"], ["b", "a"])


@pytest.mark.parametrize("path", SETS, ids=lambda p: p.name)
def test_case_files_are_well_formed(path: Path):
    registry = ToolRegistry.default(plugins=False)
    cases = load_cases(path)
    assert len(cases) >= (150 if path == CASES else 50)
    assert len({c["id"] for c in cases}) == len(cases)
    langs = {c["lang"] for c in cases}
    assert langs == {"en", "zh"}
    for case in cases:
        assert set(case) == {"id", "lang", "text", "expect"}, case["id"]
        for call in case["expect"]:
            model = registry.get(call["tool"]).args_model
            unknown = set(call.get("args", {})) - set(model.model_fields)
            assert not unknown, f"{case['id']}: {unknown} are not args of {call['tool']}"


def test_every_tool_and_chit_chat_and_compounds_are_covered():
    cases = load_cases()
    tools = {call["tool"] for c in cases for call in c["expect"]}
    assert tools == set(ToolRegistry.default(plugins=False).names())
    assert sum(1 for c in cases if not c["expect"]) >= 20
    assert sum(1 for c in cases if len(c["expect"]) > 1) >= 15


class ScriptedBrain:
    """Routes by a lookup table, so the scoring can be checked without a model."""

    def __init__(self, table: dict[str, dict]):
        self.table = table

    def route_step(self, step: str, lang: str, memo: dict) -> dict:
        return self.table.get(step, {"tool": None, "args": {}})


def test_run_routing_scores_tools_and_args_separately():
    cases = [
        {"id": "a", "lang": "en", "text": "cmp 'x' 'y'", "expect": [{"tool": "embedding_distance",
                                                                 "args": {"texts": ["x", "y"]}}]},
        {"id": "b", "lang": "en", "text": "what is lora", "expect": [{"tool": "explain_concept",
                                                                   "args": {"query": "lora"}}]},
        {"id": "c", "lang": "zh", "text": "你好", "expect": []},
    ]
    brain = ScriptedBrain({
        "cmp 'x' 'y'": {"tool": "embedding_distance", "args": {"texts": ["x", "z"]}},   # right tool, wrong args
        "what is lora": {"tool": "explain_concept", "args": {"query": "what is LoRA"}},
    })
    report = run_routing(brain, cases)
    overall = next(r for r in report["table"] if r["group"] == "ALL" and r["lang"] == "all")
    assert overall["n"] == 3
    assert overall["tool_acc"] == pytest.approx(1.0)
    assert overall["args_acc"] == pytest.approx(2 / 3)
    assert [f["id"] for f in report["failures"]] == ["a"]
    text = format_routing(report)
    assert "embedding_distance" in text and "texts" in text


def test_eval_json_is_one_object(tmp_path):
    report = run_routing(ScriptedBrain({}), [{"id": "c", "lang": "en", "text": "hi", "expect": []}])
    assert json.loads(json.dumps(report))["cases"] == 1
