"""Small generated tables the channel and isolation tests upload (one copy, imported by each)."""

from __future__ import annotations

import random


def churn_csv(rows: int = 240, seed: int = 3) -> str:
    """A churn table (tenure, monthly, support_calls → churn) with a clear driver: many support calls churn."""
    rng = random.Random(seed)
    lines = ["tenure,monthly,support_calls,churn"]
    for _ in range(rows):
        tenure, monthly, calls = rng.randint(1, 72), rng.randint(20, 120), rng.randint(0, 9)
        churn = int(calls > 5 or (tenure < 12 and monthly > 80) or rng.random() < 0.1)
        lines.append(f"{tenure},{monthly},{calls},{churn}")
    return "\n".join(lines) + "\n"
