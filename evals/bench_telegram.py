"""``bench_telegram``: the Telegram channel under load — 100 simulated chats × 5 messages against the fake Bot API
server (``tests/fake_telegram.py``), which answers 429 ``retry_after`` to 10 % of edits.

Each chat sends a message, waits for its answer, then sends the next, all chats at once. The agent is a stub
that streams eight steps over ~4 s (so progress messages are posted and edited) and runs turns concurrently:
this measures the channel, not the brain. For every message, the channel's added latency is the time from the
update being available to the answer reaching the server, minus the agent's own time (measured inside the stub).
Every answer carries a unique token; the bench counts answers lost (never arrived) and duplicated (arrived twice).

Example:
    >>> bench_telegram(chats=10, messages=2)["lost"]     # doctest: +SKIP
    0
"""

from __future__ import annotations

import asyncio
import random
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from evals.bench import _percentile

ROOT = Path(__file__).resolve().parents[1]


class StubAgent:
    """Streams eight steps at random pauses (about ``turn_s`` in all) and answers with a token; thread-safe."""

    def __init__(self, home: Path, turn_s: float = 4.0, seed: int = 1):
        self.settings = SimpleNamespace(home=home)
        self.turn_s, self.rng, self.lock = turn_s, random.Random(seed), threading.Lock()
        self.spent: dict[str, float] = {}

    def stream(self, text: str, *, thread_id: str, user_id: str, approve: bool | None = None):
        from agent.reply import Reply

        t0 = time.monotonic()
        steps = []
        kinds = ("plan", "route", "tool", "observe", "tool", "observe", "reflect", "answer")
        for kind in kinds:
            with self.lock:
                pause = self.rng.uniform(0.5, 1.5) * self.turn_s / len(kinds)
            time.sleep(pause)
            steps.append({"kind": kind, "text": f"{kind} for {text}"})
            yield {"type": "step", **steps[-1]}
        reply = Reply(thread_id=thread_id, answer=f"Answer to {text}: **done** — 完成 ✓", steps=steps)
        with self.lock:
            self.spent[text] = time.monotonic() - t0
        yield {"type": "reply", "reply": reply}

    def watch_jobs(self, callback: Any, **kw: Any) -> Any:
        return SimpleNamespace(stop=lambda: None)


def bench_telegram(chats: int = 100, messages: int = 5, edit_429: float = 0.10, turn_s: float = 4.0) -> dict:
    """Run the load and return the measurements (prints nothing). The fake server and the simulated users run in
    a process of their own, as Telegram's servers and users would: their CPU time does not compete with the bot's
    interpreter (the clock, ``time.monotonic``, is the same system-wide clock in both processes)."""
    import multiprocessing

    from bots.channel import TurnQueue
    from bots.telegram import TelegramBot, TelegramConfig

    ctx = multiprocessing.get_context("spawn")
    here, there = ctx.Pipe()
    users = ctx.Process(target=_users_side, args=(there, chats, messages, edit_429), daemon=True)
    users.start()
    env = here.recv()
    agent = StubAgent(Path(tempfile.mkdtemp(prefix="sw-tg-bench-")), turn_s)
    bot = TelegramBot(agent, TelegramConfig.from_env(env, poll_timeout=10), turns=TurnQueue(chats))
    loop, ready = asyncio.new_event_loop(), threading.Event()
    box: dict[str, asyncio.Event] = {}

    def serve() -> None:
        asyncio.set_event_loop(loop)
        box["stop"] = asyncio.Event()
        ready.set()
        loop.run_until_complete(bot.run(box["stop"]))

    runner = threading.Thread(target=serve, daemon=True)
    runner.start()
    ready.wait(10)
    try:
        here.send("go")
        seen = here.recv()
    finally:
        loop.call_soon_threadsafe(box["stop"].set)
        runner.join(30)
        here.send("stop")
        users.join(30)
        bot.turns.close()
    added = [seen["arrived"][t][0] - seen["sent_at"][t] - agent.spent[t] for t in seen["expected"]
             if seen["arrived"].get(t) and t in agent.spent]
    return {"chats": chats, "messages": len(seen["expected"]),
            "answered": sum(bool(seen["arrived"].get(t)) for t in seen["expected"]),
            "lost": sum(not seen["arrived"].get(t) for t in seen["expected"]),
            "duplicated": sum(len(seen["arrived"].get(t, [])) > 1 for t in seen["expected"]),
            "edits": seen["edits"], "edits_429": seen["edits_429"], "progress_messages": seen["progress"],
            "orphaned_progress": seen["orphaned_progress"],
            "wall_s": seen["wall_s"], "agent_p50_s": _percentile(list(agent.spent.values()), 0.5),
            "added_p50_ms": _percentile(added, 0.5) * 1000, "added_p95_ms": _percentile(added, 0.95) * 1000,
            "added_max_ms": max(added) * 1000, "fake_errors": seen["fake_errors"],
            "min_edit_gap_s": seen["min_edit_gap_s"]}


def _users_side(conn: Any, chats: int, messages: int, edit_429: float) -> None:
    """The other process: the fake Bot API server and the users, who each send a message, wait for its answer,
    then send the next."""
    sys.path.insert(0, str(ROOT / "tests"))
    from fake_telegram import FakeTelegram

    fake = FakeTelegram(edit_429=edit_429).start()
    conn.send(fake.env)
    conn.recv()
    try:
        conn.send(_drive(fake, chats, messages))
        conn.recv()
    finally:
        fake.stop()


def _drive(fake: Any, chats: int, messages: int) -> dict:
    users = {1000 + c: fake.user(1000 + c, f"user{c}") for c in range(chats)}
    sent_at: dict[str, float] = {}
    arrived: dict[str, list[float]] = {}
    step = {chat: 0 for chat in users}

    def send(chat: int) -> None:
        token = f"c{chat}-m{step[chat]}"
        sent_at[token] = time.monotonic()
        fake.send_text(chat, users[chat], token)

    def collect(calls: list) -> list[str]:
        tokens = []
        for call in calls:
            if call.method == "sendMessage" and call.status == 200 and call.params["text"].startswith("Answer to"):
                token = call.params["text"].split()[2].rstrip(":")
                arrived.setdefault(token, []).append(call.t)
                tokens.append(token)
        return tokens

    t0 = time.monotonic()
    for chat in users:
        send(chat)
    seen, deadline = 0, t0 + 60 + messages * 10
    while any(s < messages for s in step.values()) and time.monotonic() < deadline:
        time.sleep(0.005)
        with fake.cond:
            new, seen = fake.calls[seen:], len(fake.calls)
        for token in collect(new):
            chat = int(token[1:].split("-")[0])
            if len(arrived[token]) == 1 and token == f"c{chat}-m{step[chat]}":
                step[chat] += 1
                if step[chat] < messages:
                    send(chat)
    wall = time.monotonic() - t0
    time.sleep(1.5)             # late duplicates, if any, would arrive now
    with fake.cond:
        collect(fake.calls[seen:])
        edits = [c for c in fake.calls if c.method == "editMessageText"]
        progress = [c for c in fake.calls if c.method == "sendMessage" and c.params["text"].startswith("⏳")]
        orphans = sum(m.get("text", "").startswith("⏳") for m in fake.messages.values())
    shown: dict[int, list[float]] = {}
    for call in progress + edits:         # a chat's progress: posted, then edited — how close together?
        shown.setdefault(call.params["chat_id"], []).append(call.t)
    gaps = [b - a for times in shown.values() for a, b in zip(sorted(times), sorted(times)[1:], strict=False)]
    return {"min_edit_gap_s": min(gaps, default=float("nan")),
            "expected": [f"c{chat}-m{i}" for chat in users for i in range(messages)], "sent_at": sent_at,
            "arrived": arrived, "edits": len(edits), "edits_429": sum(c.status == 429 for c in edits),
            "progress": len(progress), "orphaned_progress": orphans, "wall_s": wall, "fake_errors": len(fake.errors)}


def main() -> int:
    r = bench_telegram()
    rows = [("chats × messages", f"{r['chats']} × {r['messages'] // r['chats']}", ""),
            ("answers lost / duplicated", f"{r['lost']} / {r['duplicated']}", "0 / 0"),
            ("edits (429 refused)", f"{r['edits']} ({r['edits_429']})", "~10 % refused"),
            ("progress messages (left behind)", f"{r['progress_messages']} ({r['orphaned_progress']})", "(0)"),
            ("shortest gap between a chat's edits", f"{r['min_edit_gap_s']:.2f} s", "≥ ~1 s"),
            ("agent time per turn p50 (stub)", f"{r['agent_p50_s']:.2f} s", ""),
            ("channel added latency p50 / p95 / max", f"{r['added_p50_ms']:.0f} / {r['added_p95_ms']:.0f} / "
             f"{r['added_max_ms']:.0f} ms", "p95 ≤ 1000 ms"),
            ("wall time", f"{r['wall_s']:.1f} s", "")]
    for name, value, target in rows:
        print(f"{name:<40}{value:<28}{target}")
    return 0 if r["lost"] == r["duplicated"] == 0 and r["added_p95_ms"] <= 1000 else 1


if __name__ == "__main__":
    sys.exit(main())
