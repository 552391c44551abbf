"""``stackwise eval``: run the eval suites and print their tables (or one JSON object)."""

from __future__ import annotations

import json
import sys
from typing import Any

from evals.routing import CASES, format_routing, load_cases, run_routing

# "dev" is the set the router was tuned on; "holdout" was written separately (its first run, before
# any tuning on it, is recorded in CHANGELOG.md); "blind" was written by someone who saw neither the
# router nor the other sets and has never been tuned on: the honest estimate for new phrasings.
ROUTING_SETS = {"dev": CASES, "holdout": CASES.with_name("routing_holdout.jsonl"),
                "blind": CASES.with_name("routing_blind.jsonl")}


def _brain(settings: Any):
    from agent import Agent

    agent = Agent(settings)
    return agent, agent.brain


def run_evals(suite: str, *, settings: Any, as_json: bool = False, failures: int = 15) -> int:
    suites = ["routing", "retrieval", "answers", "shap", "memory"] if suite == "all" else [suite]
    results: dict[str, Any] = {}
    agent = None
    try:
        for name in suites:
            if name == "routing":
                agent, brain = _brain(settings)
                for label, path in ROUTING_SETS.items():
                    results[f"routing:{label}"] = report = run_routing(brain, load_cases(path))
                    if not as_json:
                        print(f"\n== {label} ({path.name}) ==")
                        print(format_routing(report, show_failures=failures))
            elif name == "shap":
                from evals.shap_eval import format_shap_eval, run_shap_eval

                results["shap"] = report = run_shap_eval()
                if not as_json:
                    print("\n== shap (synthetic sets with planted drivers) ==")
                    print(format_shap_eval(report))
            elif name == "retrieval":
                from evals import retrieval

                for label, path in retrieval.RETRIEVAL_SETS.items():
                    results[f"retrieval:{label}"] = report = retrieval.run_retrieval(settings,
                                                                                    retrieval.load_cases(path))
                    if not as_json:
                        print(f"\n== retrieval, {label} ({path.name}) ==")
                        print(retrieval.format_retrieval(report, show_failures=failures))
            elif name == "memory":
                from evals import memory_eval

                for label, path in memory_eval.MEMORY_SETS.items():
                    results[f"memory:{label}"] = report = memory_eval.run_memory_eval(settings,
                                                                                      memory_eval.load_cases(path))
                    if not as_json:
                        print(f"\n== memory, {label} ({path.name}): facts stated, then used after a restart ==")
                        print(memory_eval.format_memory(report, show_failures=failures))
            elif name == "answers":
                from evals.answers import format_answers, run_answers

                results["answers"] = report = run_answers(settings)
                if not as_json:
                    print("\n== answers (explain_concept on the retrieval and unknown-concept sets) ==")
                    print(format_answers(report, show_failures=failures))
    finally:
        if agent is not None:
            agent.close()
    if as_json:
        sys.stdout.write(json.dumps(results, ensure_ascii=False) + "\n")
    return 0
