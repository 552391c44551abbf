"""Bounded thread history: the last N checkpoints per thread, idle threads dropped, the store's size measured —
while every thread keeps its whole conversation and a pending confirmation survives the pruning."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from agent import Agent, Settings
from memory.checkpoints import split_thread_key, thread_key
from memory.retention import DAY_S, Retention, checkpoint_time

pytestmark = pytest.mark.usefixtures("ft_workdir")
TURNS = ["hi", "how similar are 'king' and 'queen'?", "thanks", "my GPU is an RTX 4090", "what GPU do I have?"]


@pytest.fixture
def make_agent(tmp_path):
    agents = []

    def make(**settings) -> Agent:
        env = {"STACKWISE_HOME": str(tmp_path / "home")} | {k: str(v) for k, v in settings.items()}
        bot = Agent(Settings.from_env(env))
        agents.append(bot)
        return bot

    yield make
    for bot in agents:
        bot.close()


def _checkpoints(bot: Agent, user: str, thread: str) -> int:
    return next(t["checkpoints"] for t in bot.threads(user) if t["thread_id"] == thread)


def test_only_the_last_n_checkpoints_stay_and_the_conversation_is_whole(make_agent):
    bot = make_agent(STACKWISE_KEEP_CHECKPOINTS=3)
    for n in range(12):
        bot.ask(TURNS[n % len(TURNS)], thread_id="t", user_id="ada")
    assert _checkpoints(bot, "ada", "t") == 3
    history = bot.history("t", user_id="ada")
    assert len(history) == 24 and [m["content"] for m in history[::2]][:3] == TURNS[:3]
    assert bot.retention.stats()["writes"] == 0            # no pending writes of pruned checkpoints are left behind
    bot.ask("hi", thread_id="t", user_id="ada")
    assert len(bot.history("t", user_id="ada")) == 26 and _checkpoints(bot, "ada", "t") == 3


def test_a_pending_confirmation_survives_pruning(make_agent):
    bot = make_agent(STACKWISE_KEEP_CHECKPOINTS=1)
    bot.ask("hi", thread_id="c", user_id="ada")
    reply = bot.ask("fine-tune Qwen2.5-0.5B on data.jsonl with lora rank 8", thread_id="c", user_id="ada")
    assert reply.pending is not None and _checkpoints(bot, "ada", "c") == 1
    done = bot.ask("yes", thread_id="c", user_id="ada")
    assert done.pending is None and done.tool_calls[-1].ok and done.tool_calls[-1].result["job_id"].startswith("ft-")


def test_pruning_keeps_the_store_bounded_while_unbounded_history_grows_quadratically(tmp_path):
    sizes = {}
    for keep in (10**9, 4):
        home = tmp_path / f"home-{keep}"
        bot = Agent(Settings.from_env({"STACKWISE_HOME": str(home), "STACKWISE_KEEP_CHECKPOINTS": str(keep)}))
        try:
            for n in range(40):
                bot.ask(TURNS[n % 3], thread_id="g", user_id="ada")
            stats = bot.retention.stats()
            sizes[keep] = (stats["checkpoints"], stats["live_bytes"])
        finally:
            bot.close()
    assert sizes[4][0] == 4 and sizes[10**9][0] == 40
    assert sizes[10**9][1] > 4 * sizes[4][1]


def test_idle_threads_are_dropped_and_recent_ones_kept(make_agent):
    bot = make_agent(STACKWISE_THREAD_MAX_IDLE_DAYS=30)
    bot.ask("hi", thread_id="old", user_id="ada")
    bot.ask("hi", thread_id="new", user_id="bob")
    now = time.time()
    assert abs(bot.threads("ada")[0]["last_active"] - now) < 60
    later = Retention(bot.checkpointer, keep=20, max_idle_days=30, clock=lambda: now + 31 * DAY_S)
    assert later.sweep() == 2 and bot.threads("ada") == [] and bot.threads("bob") == []
    bot.ask("hi", thread_id="fresh", user_id="ada")
    assert Retention(bot.checkpointer, keep=20, max_idle_days=30, clock=lambda: now + 29 * DAY_S).sweep() == 0
    assert Retention(bot.checkpointer, keep=20, max_idle_days=0, clock=lambda: now + 10**6 * DAY_S).sweep() == 0
    assert [t["thread_id"] for t in bot.threads("ada")] == ["fresh"]


def test_a_turn_sweeps_idle_threads_at_most_once_per_interval(make_agent):
    bot = make_agent()
    bot.retention = Retention(bot.checkpointer, keep=20, max_idle_days=1 / DAY_S, sweep_every_s=3600)  # idle: 1 s
    bot.ask("hi", thread_id="stale", user_id="ada")      # the first turn sweeps (nothing is idle yet)
    assert [t["thread_id"] for t in bot.threads("ada")] == ["stale"]
    bot.retention._last_sweep = 0.0                      # as if an hour had passed since
    time.sleep(1.2)
    bot.ask("hi", thread_id="live", user_id="bob")       # this turn's sweep drops the stale thread
    assert bot.threads("ada") == [] and [t["thread_id"] for t in bot.threads("bob")] == ["live"]
    time.sleep(1.2)
    bot.ask("hi", thread_id="again", user_id="carol")    # within the hour: no sweep, bob's idle thread stays
    assert [t["thread_id"] for t in bot.threads("bob")] == ["live"]


def test_threads_are_listed_per_user_whatever_the_ids_contain(make_agent):
    bot = make_agent()
    for user in ("a", "a|b", "1:a", "ab"):
        bot.ask("hi", thread_id=f"t-{user}", user_id=user)
    assert [t["thread_id"] for t in bot.threads("a")] == ["t-a"]
    assert [t["thread_id"] for t in bot.threads("a|b")] == ["t-a|b"]
    assert [t["thread_id"] for t in bot.threads("1:a")] == ["t-1:a"]
    assert split_thread_key(thread_key("a|b", "x|y")) == ("a|b", "x|y") and split_thread_key("garbage") is None
    assert checkpoint_time("not-a-uuid") is None


def test_vacuum_gives_space_back_and_the_cli_reports_it(make_agent, cli_env, stackwise_bin):
    bot = make_agent(STACKWISE_KEEP_CHECKPOINTS=10**9)
    for n in range(30):
        bot.ask(TURNS[n % 3], thread_id="v", user_id="ada")
    bot.close()
    env = {**cli_env, "STACKWISE_KEEP_CHECKPOINTS": "2"}
    proc = subprocess.run([stackwise_bin, "memory", "prune", "--vacuum", "--json"], env=env, capture_output=True,
                          text=True, timeout=120)
    result = json.loads(proc.stdout)
    assert proc.returncode == 0 and result["checkpoints_deleted"] == 28
    assert result["bytes_after"] < result["bytes_before"] / 2
    proc = subprocess.run([stackwise_bin, "memory", "stats"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "1 thread(s), 2 checkpoint(s)" in proc.stdout and "keep 2 per thread" in proc.stdout
