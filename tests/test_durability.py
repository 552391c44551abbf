"""kill -9 in the middle of a turn and in the middle of writing memory: after a restart every acknowledged message
and fact is there, the thread continues, and the databases pass SQLite's integrity check (WAL)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from agent import Agent, Settings
from evals.bench_memory import bench_kill

ROOT = Path(__file__).resolve().parents[1]


def _integrity(path: Path) -> str:
    with sqlite3.connect(path) as conn:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]


def _child(tmp_path: Path, home: Path, body: str) -> subprocess.CompletedProcess:
    """Run ``body`` in a fresh Python process with an Agent on ``home`` bound to ``bot``; it ends by SIGKILL."""
    script = tmp_path / "child.py"
    script.write_text("import os, signal, sys\nfrom agent import Agent, Settings\n"
                      f"bot = Agent(Settings.from_env({{'STACKWISE_HOME': {str(home)!r}}}))\n" + textwrap.dedent(body))
    env = {**os.environ, "STACKWISE_HOME": str(home), "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_random_kill9_trials_lose_no_acknowledged_message_or_fact():
    result = bench_kill(trials=3, seed=11, min_s=0.5, max_s=2.5)
    assert result["problems"] == []
    assert result["lost"] == 0 and result["corrupt"] == 0 and result["acknowledged"] > 0


def test_killed_mid_turn_the_thread_keeps_every_acknowledged_turn_and_continues(tmp_path):
    home = tmp_path / "home"
    done = _child(tmp_path, home, """
        from langgraph.checkpoint.sqlite import SqliteSaver
        for text in ("hi", "how similar are 'king' and 'queen'?"):
            bot.ask(text, thread_id="t", user_id="ada")
            print("ACK", text, flush=True)
        def die(*args, **kwargs):            # the third turn has run its nodes; its checkpoint is being written
            os.kill(os.getpid(), signal.SIGKILL)
        SqliteSaver.put = die
        bot.ask("how similar are 'a' and 'b'?", thread_id="t", user_id="ada")
        print("NOT REACHED", flush=True)
    """)
    first_two = ["hi", "how similar are 'king' and 'queen'?"]
    assert done.returncode == -9 and done.stdout.split("\n")[:2] == [f"ACK {t}" for t in first_two]
    assert _integrity(home / "threads.sqlite") == "ok"
    bot = Agent(Settings.from_env({"STACKWISE_HOME": str(home)}))
    try:
        said = [m["content"] for m in bot.history("t", user_id="ada") if m["role"] == "user"]
        assert said == first_two          # acknowledged turns kept; the killed one never happened
        bot.ask("thanks", thread_id="t", user_id="ada")
        assert [m["content"] for m in bot.history("t", user_id="ada") if m["role"] == "user"][-1] == "thanks"
        assert len(bot.history("t", user_id="ada")) == 6
    finally:
        bot.close()


def test_killed_inside_a_memory_write_the_old_fact_is_intact(tmp_path):
    home = tmp_path / "home"
    done = _child(tmp_path, home, """
        from memory import sql_store
        bot.remember("ada", "my GPU is an RTX 3060 12G")
        print("ACK", flush=True)
        original = sql_store.SqlStore._put
        def dying(self, execute, op, vectors):
            def execute_then_die(statement, params=None):
                if statement.lstrip().startswith("INSERT INTO memory_items"):
                    os.kill(os.getpid(), signal.SIGKILL)   # the old vectors are already deleted in this transaction
                return execute(statement, params)
            return original(self, execute_then_die, op, vectors)
        sql_store.SqlStore._put = dying
        bot.remember("ada", "I upgraded to an RTX 4090 with 24 GB")
        print("NOT REACHED", flush=True)
    """)
    assert done.returncode == -9 and done.stdout.strip() == "ACK", done.stderr[-2000:]
    assert _integrity(home / "memory.sqlite") == "ok"
    bot = Agent(Settings.from_env({"STACKWISE_HOME": str(home)}))
    try:
        (fact,) = bot.memory_show("ada")
        assert fact["data"]["name"] == "RTX 3060"                 # the half-done write was rolled back entirely
        assert "3060" in bot.ask("what GPU do I have?", thread_id="t", user_id="ada").answer   # vectors too
        bot.remember("ada", "I upgraded to an RTX 4090 with 24 GB")
        assert bot.memory_show("ada")[0]["data"]["name"] == "RTX 4090"
    finally:
        bot.close()


@pytest.mark.parametrize("name", ["threads.sqlite", "memory.sqlite"])
def test_a_store_is_opened_in_wal_mode_with_secure_delete(tmp_path, name):
    home = tmp_path / "home"
    bot = Agent(Settings.from_env({"STACKWISE_HOME": str(home)}))
    try:
        bot.ask("my GPU is an RTX 4090", thread_id="t", user_id="ada")
        conn = bot.checkpointer.conn if name == "threads.sqlite" else bot.user_memory.store.db._conn
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA secure_delete").fetchone()[0] == 1
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1     # NORMAL: safe against a killed process
    finally:
        bot.close()
