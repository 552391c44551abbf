"""A fine-tune's end is announced in the chat that launched it: the launch records where it came from
(channel, thread, language), the job store hands each ended job's announcement out once, ``Agent.watch_jobs``
delivers it to a channel's callback, and the REPL prints it (and lists jobs with ``/jobs``)."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.console import Console

from agent import Agent, Settings
from agent.jobs import JobsService
from bots.repl import run_repl
from memory.jobs import JobStore

pytestmark = pytest.mark.usefixtures("ft_workdir")

LAUNCH = "fine-tune Qwen2.5-0.5B on data.jsonl with lora rank 8"


@pytest.fixture(scope="module")
def agents(tmp_path_factory):
    """Two agents on one home, as two channels' processes would be: Telegram's and the terminal's."""
    home = tmp_path_factory.mktemp("announce-home")
    settings = Settings.from_env({"STACKWISE_HOME": str(home)})
    telegram = Agent(settings, channel="telegram")
    terminal = Agent(settings, channel="cli")          # the embedders are cached: loaded once
    yield telegram, terminal
    telegram.close()
    terminal.close()


def end(store: JobStore, job_id: str, status: str = "succeeded", **kw) -> None:
    """What a worker does with a job: take it, then record how it ended."""
    claimed = store.claim("w-test")
    assert claimed is not None and claimed.id == job_id
    store.finish(job_id, status, **kw)


def launch(agent: Agent, thread: str, user: str, text: str = LAUNCH) -> str:
    reply = agent.ask(text, thread_id=thread, user_id=user, approve=True)
    call = next(c for c in reply.tool_calls if c.tool == "launch_finetune")
    assert call.ok, call.error
    return call.result["job_id"]


def test_a_launch_records_where_it_came_from_and_its_end_is_announced_there_once(agents):
    telegram, terminal = agents
    job_id = launch(telegram, "tg-chat-42", "alice")
    store = telegram.jobs().store
    job = store.get(job_id, owner="alice")
    assert job.origin == {"channel": "telegram", "thread_id": "tg-chat-42", "lang": "en"}

    assert telegram.jobs().announcements("telegram") == []          # still queued: nothing to say yet
    end(store, job_id, "succeeded", summary={"status": "succeeded", "steps": 6, "total_steps": 6,
                                             "final_loss": 1.234})
    assert terminal.jobs().announcements("cli") == []               # launched elsewhere: not the terminal's

    # Two processes of the Telegram bot look at once: exactly one of them announces.
    results: list[list[dict]] = []
    barrier = threading.Barrier(2)

    def look(service: JobsService) -> None:
        barrier.wait()
        results.append(service.announcements("telegram"))

    second = JobsService(telegram.settings)
    threads = [threading.Thread(target=look, args=(s,)) for s in (telegram.jobs(), second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    second.close()
    notices = [n for r in results for n in r]
    assert len(notices) == 1
    notice = notices[0]
    assert notice["job_id"] == job_id and notice["owner"] == "alice" and notice["status"] == "succeeded"
    assert notice["origin"]["thread_id"] == "tg-chat-42"
    assert notice["text"].startswith("🔔 Fine-tune finished")
    assert f"{job_id} succeeded: 6 steps, final loss 1.23" in notice["text"]
    assert telegram.jobs().announcements("telegram") == []          # taken: never twice
    assert store.get(job_id, owner="alice").announced_at is not None


def test_a_resumed_job_is_announced_again_when_it_ends_again(agents):
    telegram, _ = agents
    store = telegram.jobs().store
    job_id = launch(telegram, "tg-chat-7", "bob")
    end(store, job_id, "failed", error="CUDA out of memory")
    [failed] = telegram.jobs().announcements("telegram", user="bob")
    assert failed["text"].startswith("🔔 Fine-tune failed") and "CUDA out of memory" in failed["text"]
    assert f"stackwise jobs resume {job_id}" in failed["text"]

    store.resume(job_id, "bob")
    assert store.get(job_id, owner="bob").announced_at is None
    end(store, job_id, "cancelled")
    [cancelled] = telegram.jobs().announcements("telegram", user="bob")
    assert cancelled["status"] == "cancelled" and cancelled["text"].startswith("🔔 Fine-tune cancelled")


def test_a_chinese_launch_is_announced_in_chinese_and_only_to_its_user(agents):
    telegram, _ = agents
    store = telegram.jobs().store
    job_id = launch(telegram, "tg-chat-zh", "carol", "用 data.jsonl 微调 Qwen2.5-0.5B，LoRA rank 8")
    assert store.get(job_id, owner="carol").origin["lang"] == "zh"
    end(store, job_id, "succeeded", summary={"status": "succeeded", "steps": 3, "final_loss": 2.5})
    assert telegram.jobs().announcements("telegram", user="dave") == []
    [notice] = telegram.jobs().announcements("telegram", user="carol")
    assert notice["text"].startswith("🔔 微调任务完成") and f"{job_id} 已完成：3 步" in notice["text"]


def test_watch_jobs_delivers_to_the_callback_and_survives_a_failing_one(agents):
    telegram, _ = agents
    store = telegram.jobs().store
    got: list[dict] = []
    calls = []

    def callback(notice: dict) -> None:
        calls.append(notice["job_id"])
        if len(calls) == 1:
            raise RuntimeError("the chat API is down")
        got.append(notice)

    watcher = telegram.watch_jobs(callback, user_id="erin", poll_s=0.05)
    try:
        first = launch(telegram, "tg-chat-e", "erin")
        end(store, first, "interrupted")
        second = launch(telegram, "tg-chat-e", "erin")
        deadline = time.monotonic() + 20
        while not calls and time.monotonic() < deadline:
            time.sleep(0.05)
        end(store, second, "succeeded")
        while not got and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        watcher.stop()
    assert not watcher.is_alive()
    assert calls == [first, second]            # the failing callback was not retried; the watcher went on
    assert got[0]["job_id"] == second


class FakeAgent:
    """The surface the REPL uses for jobs: ``jobs().list`` and ``watch_jobs``."""

    def __init__(self, home: Path, rows: list[dict], notices: list[dict]):
        self.settings = SimpleNamespace(home=home)
        self.rows, self.notices, self.watching = rows, notices, []

    def jobs(self):
        return SimpleNamespace(list=lambda user, limit=20: [r for r in self.rows if r["owner"] == user])

    def watch_jobs(self, callback, *, user_id=None, poll_s=5.0):
        for notice in self.notices:
            callback(notice)
        watcher = SimpleNamespace(stopped=False)
        watcher.stop = lambda: setattr(watcher, "stopped", True)
        self.watching.append((user_id, watcher))
        return watcher


def test_the_repl_prints_announcements_and_lists_jobs(tmp_path):
    rows = [{"id": "ft-2", "owner": "alice", "status": "running", "step": 3, "total": 10, "loss": 1.5,
             "method": "lora", "base_model": "Qwen2.5-0.5B", "dataset": "data.jsonl", "error": None},
            {"id": "ft-1", "owner": "alice", "status": "failed", "step": None, "total": None, "loss": None,
             "method": "qlora", "base_model": "Qwen2.5-0.5B", "dataset": "d.jsonl", "error": "no GPU"}]
    notice = {"job_id": "ft-1", "text": "🔔 Fine-tune failed — ft-1 failed: no GPU.", "origin": {},
              "attachments": [{"kind": "image", "path": "/tmp/loss.png", "caption": "Loss of ft-1"}]}
    agent = FakeAgent(tmp_path, rows, [notice])
    out = io.StringIO()
    lines = iter(["/jobs"])

    def read(prompt: str) -> str:
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    assert run_repl(agent, user_id="alice", input_fn=read, console=Console(file=out, width=120)) == 0
    shown = out.getvalue()
    assert "🔔 Fine-tune failed — ft-1 failed: no GPU." in shown and "Loss of ft-1: /tmp/loss.png" in shown
    assert "ft-2     running" in shown and "3/10" in shown and "loss 1.5" in shown
    assert "ft-1     failed" in shown and "no GPU" in shown
    assert agent.watching[0][0] == "alice" and agent.watching[0][1].stopped      # stopped when the REPL ends


def test_the_pending_confirmation_can_be_read_back_and_survives_a_new_agent(agents, tmp_path):
    telegram, _ = agents
    reply = telegram.ask(LAUNCH, thread_id="tg-pending", user_id="gina")
    assert reply.pending is not None
    assert telegram.pending("tg-pending", user_id="gina") == reply.pending.model_dump()
    assert telegram.pending("tg-pending", user_id="hank") is None          # another user's thread: nothing
    again = Agent(telegram.settings, channel="telegram")                   # a restarted bot process
    try:
        assert again.pending("tg-pending", user_id="gina")["id"] == reply.pending.id
        again.resume("tg-pending", False, user_id="gina")
        assert again.pending("tg-pending", user_id="gina") is None
    finally:
        again.close()
