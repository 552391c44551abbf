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

LATER = {"retrieval": "the knowledge-base issue", "answers": "the knowledge-base issue"}


def _brain(settings: Any):
    from agent import Agent

    agent = Agent(settings)
    return agent, agent.brain


def run_evals(suite: str, *, settings: Any, as_json: bool = False, failures: int = 15) -> int:
    suites = ["routing", "retrieval", "answers", "shap"] if suite == "all" else [suite]
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
            else:
                results[name] = {"skipped": f"arrives with {LATER[name]}"}
                if not as_json:
                    print(f"\n{name} eval: not available yet (arrives with {LATER[name]})")
    finally:
        if agent is not None:
            agent.close()
    if as_json:
        sys.stdout.write(json.dumps(results, ensure_ascii=False) + "\n")
    return 0
