"""Threads, user memory and job records in PostgreSQL (``STACKWISE_DATABASE_URL``), against a real server: several
processes with different homes — several machines — share one state; retention works on Postgres's tables."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from agent import Agent, Settings
from memory.checkpoints import StoreError
from memory.sql_store import SqlStore


def _settings(home, url, **more) -> Settings:
    return Settings.from_env({"STACKWISE_HOME": str(home), "STACKWISE_DATABASE_URL": url,
                              **{k: str(v) for k, v in more.items()}})


def _embed(texts):
    return np.array([[1.0, 0.0] if "gpu" in t.lower() else [0.0, 1.0] for t in texts])


def test_the_store_on_postgres_is_shared_between_connections(pg_url):
    index = {"dims": 2, "embed": _embed, "fields": ["text"]}
    a, b = SqlStore(pg_url, index=index), SqlStore(pg_url, index=index)
    try:
        a.put(("users", "ada", "facts"), "gpu", {"text": "my GPU is a 4090", "kind": "gpu"})
        a.put(("users", "ada", "facts"), "lang", {"text": "answer in Chinese", "kind": "language"})
        hits = b.search(("users", "ada"), query="which GPU")
        assert [h.key for h in hits] == ["gpu", "lang"] and hits[0].score == pytest.approx(1.0)
        assert b.search(("users",), filter={"kind": "language"})[0].key == "lang"
        assert b.list_namespaces(prefix=("users",)) == [("users", "ada", "facts")]
        b.delete(("users", "ada", "facts"), "gpu")
        assert a.get(("users", "ada", "facts"), "gpu") is None and a.size_bytes() > 0
        assert "***" not in a.location or "password" not in a.location
    finally:
        a.close()
        b.close()


def test_two_agents_on_two_homes_share_threads_memory_and_jobs(pg_url, tmp_path, ft_workdir):
    one = Agent(_settings(tmp_path / "machine-1", pg_url))
    two = Agent(_settings(tmp_path / "machine-2", pg_url))
    try:
        assert one.retention.postgres and type(one.checkpointer).__name__ == "PostgresSaver"
        one.ask("my GPU is an RTX 4090 with 24 GB", thread_id="shared", user_id="ada")
        reply = one.ask("fine-tune Qwen2.5-0.5B on data.jsonl with lora rank 8", thread_id="shared", user_id="ada",
                        approve=True)
        job_id = reply.tool_calls[-1].result["job_id"]
        # the other machine continues the same thread and sees the memory and the job
        assert [m["content"] for m in two.history("shared", user_id="ada")][0] == "my GPU is an RTX 4090 with 24 GB"
        assert "4090" in two.ask("what GPU do I have?", thread_id="shared", user_id="ada").answer
        assert two.memory_show("ada")[0]["data"]["name"] == "RTX 4090"
        assert [j["id"] for j in two.jobs().list("ada")] == [job_id]
        assert len(one.history("shared", user_id="ada")) == len(two.history("shared", user_id="ada")) == 8
        assert two.history("shared", user_id="bob") == [] and two.memory_show("bob") == []
        for home in (tmp_path / "machine-1", tmp_path / "machine-2"):   # nothing went to local files
            assert not (home / "threads.sqlite").exists() and not (home / "memory.sqlite").exists()
            assert not (home / "jobs.sqlite").exists()
        assert two.memory_forget("ada") == 1 and one.memory_show("ada") == []
        assert two.forget_threads("ada") == 1 and one.history("shared", user_id="ada") == []
    finally:
        one.close()
        two.close()


def test_a_cli_process_writes_what_an_api_process_reads(pg_url, tmp_path, cli_env, stackwise_bin):
    env = {**cli_env, "STACKWISE_DATABASE_URL": pg_url}
    proc = subprocess.run([stackwise_bin, "ask", "我的显卡是 3060 12G", "--user", "ada", "--json"], env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "3060" in json.loads(proc.stdout)["answer"]
    api = Agent(_settings(tmp_path / "api-home", pg_url), channel="http")
    try:
        assert api.memory_show("ada")[0]["data"] == {"name": "RTX 3060", "memory_gb": 12.0, "memory_assumed": False}
        assert [m["content"] for m in api.history("cli:ada", user_id="ada")][0] == "我的显卡是 3060 12G"
    finally:
        api.close()
    proc = subprocess.run([stackwise_bin, "memory", "stats", "--user", "ada", "--json"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    stats = json.loads(proc.stdout)
    assert stats["threads"]["backend"] == "postgres" and stats["memory"]["backend"] == "postgres"
    assert stats["memory"]["facts"] == 1 and stats["user"]["facts"] == 1 and stats["threads"]["bytes"] > 0


def test_retention_on_postgres_prunes_checkpoints_writes_and_unreferenced_blobs(pg_url, tmp_path):
    import psycopg

    bot = Agent(_settings(tmp_path / "home", pg_url, STACKWISE_KEEP_CHECKPOINTS=10**9))
    try:
        for n in range(8):
            bot.ask(["hi", "thanks", "how similar are 'a' and 'b'?"][n % 3], thread_id="p", user_id="ada")
        bot.ask("hi", thread_id="other", user_id="ada")
        with psycopg.connect(pg_url) as conn:
            blobs_before = conn.execute("SELECT count(*) FROM checkpoint_blobs").fetchone()[0]
        bot.retention.keep = 2
        assert bot.retention.prune(next(t["key"] for t in bot.retention.threads("ada") if t["thread_id"] == "p")) == 6
        with psycopg.connect(pg_url) as conn:
            blobs_after = conn.execute("SELECT count(*) FROM checkpoint_blobs").fetchone()[0]
            assert conn.execute("SELECT count(*) FROM checkpoints WHERE thread_id LIKE %s",
                                ["3:ada|p"]).fetchone()[0] == 2
        assert blobs_after < blobs_before
        assert len(bot.history("p", user_id="ada")) == 16            # the conversation is whole
        bot.ask("thanks", thread_id="p", user_id="ada")
        assert len(bot.history("p", user_id="ada")) == 18 and bot.retention.stats()["backend"] == "postgres"
        assert bot.retention.delete_threads([t["key"] for t in bot.retention.threads("ada")]) == 2
        assert bot.threads("ada") == []
    finally:
        bot.close()


def test_an_unreachable_server_is_a_clear_error_without_the_password(tmp_path):
    url = "postgresql://bot:s3cret-pw@127.0.0.1:1/stackwise"
    with pytest.raises(StoreError) as err:
        Agent(_settings(tmp_path / "home", url))
    assert "127.0.0.1:1" in str(err.value) and "s3cret-pw" not in str(err.value)
