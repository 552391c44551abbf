"""Chain-of-thought data sets in categories of chosen sizes, for the trial-run tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

SIZES = {"cardiology": 1500, "neurology": 900, "pediatrics": 450, "dermatology": 150}


def cot_rows(n_by_category: dict[str, int], *, seed: int = 0, category: bool = True) -> list[dict]:
    """Chain-of-thought rows in categories of the given sizes, answers of varied length, shuffled."""
    rng = random.Random(seed)
    rows = []
    for cat, n in n_by_category.items():
        for i in range(n):
            words = " ".join(rng.choice(["heart", "brain", "skin", "fever", "pain", "scan"])
                             for _ in range(rng.randint(2, 80)))
            row = {"Question": f"{cat} case {i}: what next?", "Complex_CoT": f"Consider {words}.",
                   "Response": f"Answer {i} for {cat}."}
            rows.append(row | {"category": cat} if category else row)
    rng.shuffle(rows)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path
