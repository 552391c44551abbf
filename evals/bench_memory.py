"""Memory benchmarks for ``stackwise bench``: thread-store growth over 1,000 turns without and with retention, and
``kill -9`` trials (no acknowledged message may be lost).

- **growth**: one thread, N turns of a realistic mix (help, concepts, embeddings, a refused fine-tune, a memory
  fact), once with retention off (keep every checkpoint — LangGraph's default) and once with
  ``keep_checkpoints`` (default 20). Sizes are the SQLite file plus its WAL, sampled along the way.
- **kill -9**: a child process (``python -m evals.bench_memory child HOME``) chats on one thread and writes
  memory facts, printing ``ACK <n>`` after each turn or fact is acknowledged; it is killed with SIGKILL at a random
  moment (mid-turn or mid-write), then the next trial's child opens the same home, checks the database's
  integrity and that every acknowledged message and fact is there, and continues the thread.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

GROWTH_MESSAGES = [
    "hi", "what is QLoRA?", "how similar are 'king' and 'queen'?", "什么是注意力机制？", "thanks",
    "my GPU is an RTX 4090 with 24 GB", "what GPU do I have?", "explain LoRA, then compare 'cat' and 'dog'",
    "fine-tune Qwen2.5-0.5B on data.jsonl", "status of ft-3",
]
SAMPLES = (100, 250, 500, 1000)


def _db_bytes(home: Path) -> int:
    return sum(p.stat().st_size for p in (home / "threads.sqlite", home / "threads.sqlite-wal") if p.exists())


def _growth(settings: Any, turns: int, keep: int) -> dict:
    from agent import Agent

    home = Path(tempfile.mkdtemp(prefix="sw-growth-"))
    agent = Agent(settings.with_(home=home, keep_checkpoints=keep, thread_max_idle_days=0))
    samples, started = [], time.perf_counter()
    try:
        for n in range(1, turns + 1):
            agent.ask(GROWTH_MESSAGES[(n - 1) % len(GROWTH_MESSAGES)], thread_id="bench", user_id="bench")
            if n in SAMPLES or n == turns:
                stats = agent.retention.stats()
                samples.append({"turns": n, "bytes": _db_bytes(home), "checkpoints": stats["checkpoints"],
                                "live_bytes": stats["live_bytes"]})
        state = len(json.dumps(agent.history("bench", user_id="bench"), ensure_ascii=False).encode())
        seconds = time.perf_counter() - started
        messages = len(agent.history("bench", user_id="bench"))
    finally:
        agent.close()
        shutil.rmtree(home, ignore_errors=True)
    return {"keep": keep, "samples": samples, "seconds": round(seconds, 1), "messages": messages,
            "conversation_bytes": state}


def bench_growth(settings: Any, turns: int = 1000, keep: int | None = None) -> dict:
    """DB size after ``turns`` turns on one thread: retention off vs ``keep`` checkpoints per thread."""
    keep = keep or settings.keep_checkpoints
    off = _growth(settings, turns, keep=10**9)
    on = _growth(settings, turns, keep=keep)
    return {"turns": turns, "without_retention": off, "with_retention": on,
            "ratio": round(off["samples"][-1]["bytes"] / max(on["samples"][-1]["bytes"], 1), 1)}


# --- kill -9 ------------------------------------------------------------------------------------------------

def child(home: str, seed: int) -> None:
    """One trial's process: verify what earlier trials acknowledged, then chat and remember until killed."""
    from agent import Agent, Settings

    home_path = Path(home)
    ledger = home_path / "acked.jsonl"        # written by the parent from our ACK lines, never by us
    acked = [json.loads(line) for line in ledger.read_text().splitlines()] if ledger.exists() else []
    problems = _integrity(home_path)
    agent = Agent(Settings.from_env({"STACKWISE_HOME": home}), channel="cli")
    messages = [m["content"] for m in agent.history("durable", user_id="ada") if m["role"] == "user"]
    facts: dict[str, set[str]] = {}
    for item in acked:
        if item["kind"] == "turn" and item["text"] not in messages:
            problems.append(f"lost acknowledged message {item['text']!r}")
        if item["kind"] == "fact":
            if item["user"] not in facts:
                facts[item["user"]] = {f["said"] for f in agent.memory_show(item["user"])}
            if item["text"] not in facts[item["user"]]:
                problems.append(f"lost acknowledged fact {item['text']!r}")
    agent.ask("hi", thread_id="warm-up", user_id="warm-up")    # models loaded: the kill lands in steady work
    agent.remember("warm-up", "remember that the warm-up is done")
    print("CHECK " + json.dumps({"acked": len(acked), "problems": problems}), flush=True)
    rng = random.Random(seed)
    n = 0
    while True:
        n += 1
        if rng.random() < 0.3:
            text = f"remember that trial {seed} note {n} is {rng.randrange(10**6)}"
            agent.remember(f"ada-{seed}", text)    # one user per trial: a user keeps at most 200 notes
            print("ACK " + json.dumps({"kind": "fact", "user": f"ada-{seed}", "text": text[len("remember that "):]}),
                  flush=True)
        else:
            # (no concept questions: the first one indexes the knowledge base, which is not what is measured here)
            text = rng.choice(["hi", "how similar are 'a' and 'b'?", "谢谢", "my GPU is an RTX 4090 with 24 GB",
                               "what GPU do I have?"]) + f" #{seed}-{n}"
            agent.ask(text, thread_id="durable", user_id="ada")
            print("ACK " + json.dumps({"kind": "turn", "text": text}), flush=True)


def _integrity(home: Path) -> list[str]:
    problems = []
    for name in ("threads.sqlite", "memory.sqlite"):
        path = home / name
        if path.exists():
            with sqlite3.connect(path) as conn:
                result = conn.execute("PRAGMA integrity_check").fetchone()[0]
            if result != "ok":
                problems.append(f"{name}: {result}")
    return problems


def _run_child(home: Path, seed: int, kill_after_s: float | None, env: dict, timeout_s: float = 180) -> dict:
    """Start a trial process; after its check, wait ``kill_after_s`` and SIGKILL it (None: kill at once — the last
    check). Every ``ACK`` line it printed before dying counts as acknowledged."""
    import threading

    log = home / f"trial-{seed}.stderr"
    with log.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "evals.bench_memory", "child", str(home), str(seed)],
                                stdout=subprocess.PIPE, stderr=err, text=True, env=env,
                                cwd=str(Path(__file__).resolve().parents[1]))
        lines: list[str] = []
        checked = threading.Event()

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line.rstrip("\n"))
                if line.startswith("CHECK "):
                    checked.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        if checked.wait(timeout_s) and kill_after_s:
            time.sleep(kill_after_s)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        reader.join(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()
    check = next((json.loads(line[6:]) for line in lines if line.startswith("CHECK ")), None)
    if check is None:
        raise RuntimeError(f"the trial process failed before its check: {log.read_text()[-2000:]}")
    acks = [json.loads(line[4:]) for line in lines if line.startswith("ACK ")]
    return {"check": check, "acks": acks}


def bench_kill(trials: int = 20, *, seed: int = 7, min_s: float = 0.2, max_s: float = 3.0) -> dict:
    """``trials`` kill -9 trials on one home; the last check runs in a process that is not killed."""
    rng = random.Random(seed)
    home = Path(tempfile.mkdtemp(prefix="sw-kill-"))
    env = {**os.environ, "STACKWISE_HOME": str(home), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("STACKWISE_DATABASE_URL", None)
    ledger = home / "acked.jsonl"
    lost, problems, acked = 0, [], 0
    for trial in range(trials + 1):
        final = trial == trials
        result = _run_child(home, seed * 1000 + trial, None if final else rng.uniform(min_s, max_s), env)
        problems += result["check"]["problems"]
        lost += sum("lost acknowledged" in p for p in result["check"]["problems"])
        with ledger.open("a") as f:
            for ack in result["acks"]:
                f.write(json.dumps(ack) + "\n")
        acked += len(result["acks"])
    shutil.rmtree(home, ignore_errors=True)
    return {"trials": trials, "acknowledged": acked, "lost": lost, "problems": problems,
            "corrupt": sum("lost acknowledged" not in p for p in problems)}


def format_memory_bench(growth: dict, kill: dict) -> list[tuple[str, str, str]]:
    off, on = growth["without_retention"], growth["with_retention"]
    mb = 2**20
    rows = []
    for a, b in zip(off["samples"], on["samples"], strict=True):
        rows.append((f"thread DB after {a['turns']:,} turns (off → keep {on['keep']})",
                     f"{a['bytes'] / mb:.1f} MiB ({a['checkpoints']} ckpts) → {b['bytes'] / mb:.1f} MiB "
                     f"({b['checkpoints']} ckpts)", "bounded by keep" if a is off["samples"][-1] else ""))
    rows.append(("conversation itself after the last turn", f"{on['conversation_bytes'] / mb:.2f} MiB, "
                 f"{on['messages']} messages", ""))
    rows.append((f"time for {growth['turns']:,} turns (off / on)", f"{off['seconds']:.0f} s / {on['seconds']:.0f} s",
                 ""))
    rows.append((f"kill -9 trials ({kill['trials']})", f"{kill['lost']} lost of {kill['acknowledged']} acknowledged; "
                 f"{kill['corrupt']} corrupt", "0 lost"))
    return rows


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "child":
        child(sys.argv[2], int(sys.argv[3]))
    else:
        sys.stderr.write("usage: python -m evals.bench_memory child HOME SEED  (stackwise bench runs the rest)\n")
        sys.exit(2)
