"""Two users, every channel: nothing of alice's — thread, memory, upload, report, job, private document — is visible
to bob, whichever channel either of them uses, including by asking the agent ("what did the other user ask?").

Channels driven here: Python (``Agent``), CLI (``stackwise`` processes), HTTP (the ``stackwise serve`` app on
loopback with bearer tokens) and MCP (``stackwise mcp`` over stdio, one server per user, ``STACKWISE_MCP_USER``).
All share one ``$STACKWISE_HOME``, as a deployment running several channels would.

The chat bots are driven the same way (alice's fact, upload, SHAP report and launched fine-tune; bob's memory, jobs,
cancel, button presses, her file by name and "what did the other user ask?") next to their other tests, where the
real bot runs against a fake server: ``tests/test_telegram.py::test_isolation_two_users_share_nothing`` and
``tests/test_slack.py::test_isolation_two_users_share_nothing``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from tables import churn_csv

from agent import Agent, Settings
from bots.http import background_server, create_app

ALICE, BOB = "alice-token-0123456789", "bob-token-9876543210"
# Each of alice's secrets names the channel it went through; none may ever reach bob.
SECRETS = ("PY-ALICE-7713", "HTTP-ALICE-5521", "CLI-ALICE-8842", "DOC-ALICE-3307", "alice_churn", "RTX 4090")
ROOT = Path(__file__).resolve().parents[1]


def _leaks(text: str) -> list[str]:
    return [s for s in SECRETS if s.lower() in text.lower()]


def _cli(world, *args: str, user: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "stackwise"), *args, "--user", user], env=world.env,
                          cwd=world.work, capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def world(tmp_path_factory, kb_seed, ft_assets):
    """One home, alice active on every channel; bob's sessions ready."""
    base = tmp_path_factory.mktemp("isolation")
    home, work = base / "home", base / "work"
    shutil.copytree(kb_seed, home)          # the concept cards already indexed
    shutil.copytree(ft_assets, work)
    before = Path.cwd()
    os.chdir(work)
    env = {k: v for k, v in os.environ.items() if not k.startswith("STACKWISE_")}
    env.update(STACKWISE_HOME=str(home), PYTHONWARNINGS="ignore")
    agent = Agent(Settings.from_env({"STACKWISE_HOME": str(home)}))
    try:
        with background_server(create_app(agent, tokens={ALICE: "alice", BOB: "bob"})) as url:
            http = {name: httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=120)
                    for name, token in (("alice", ALICE), ("bob", BOB))}
            world = SimpleNamespace(agent=agent, home=home, work=work, env=env, url=url, alice=http["alice"],
                                    bob=http["bob"])
            _alice_everywhere(world)
            yield world
            for client in http.values():
                client.close()
    finally:
        agent.close()
        os.chdir(before)


def _alice_everywhere(world) -> None:
    a = world.alice
    # Python
    world.agent.ask("remember that my locker code is PY-ALICE-7713", thread_id="alice-py", user_id="alice")
    notes = world.work / "alice_notes.md"
    notes.write_text("# Project Kestrel\n\nKestrel's launch password is DOC-ALICE-3307; only alice knows it.\n")
    world.agent.ingest([str(notes)], user_id="alice")
    notes.unlink()
    # HTTP: memory and a question, an upload, a SHAP report on it, a queued fine-tune
    a.post("/v1/threads/alice-http/messages", json={"text": "my GPU is an RTX 4090 with 24 GB"}).raise_for_status()
    a.post("/v1/threads/alice-http/messages",
           json={"text": "remember that my project is HTTP-ALICE-5521"}).raise_for_status()
    a.post("/v1/files", files={"file": ("alice_churn.csv", churn_csv())}).raise_for_status()
    report = a.post("/v1/tools/shap_report", json={"data": "alice_churn.csv", "target": "churn"})
    assert report.status_code == 200, report.text
    world.report = report.json()["result"]["report"]
    launched = a.post("/v1/threads/alice-job/messages",
                      json={"text": "fine-tune Qwen2.5-0.5B on data.jsonl with lora rank 8", "approve": True}).json()
    world.job = launched["tool_calls"][-1]["result"]["job_id"]
    # CLI
    done = _cli(world, "ask", "remember that my codename is CLI-ALICE-8842", user="alice")
    assert done.returncode == 0, done.stderr[-2000:]
    world.alice_upload = world.home / "uploads" / "alice" / "alice_churn.csv"
    assert world.alice_upload.exists() and Path(world.report).exists()


# --- Python ------------------------------------------------------------------------------------------
def test_python_bob_sees_no_thread_memory_job_upload_report_or_document(world):
    agent = world.agent
    assert {f["said"] for f in agent.memory_show("alice")} >= {"my locker code is PY-ALICE-7713",
                                                               "my project is HTTP-ALICE-5521"}
    assert agent.memory_show("bob") == [] and agent.threads("bob") == []
    for thread in ("alice-py", "alice-http", "alice-job", "cli:alice"):
        assert agent.history(thread, user_id="bob") == []
        assert agent.history(thread, user_id="alice") != []
    assert agent.jobs().list("bob") == []
    status = agent.call_tool("finetune_status", {"job_id": world.job}, user_id="bob")
    assert not status["ok"] and not _leaks(json.dumps(status))
    for data in ("alice_churn.csv", str(world.alice_upload), world.report):
        record = agent.call_tool("shap_report", {"data": data, "target": "churn"}, user_id="bob")
        assert not record["ok"] and record["error"]["type"] in ("not_found", "forbidden_path"), record["error"]
    assert agent.memory_forget("bob") == 0 and agent.memory_show("alice")   # bob's forget touches only bob


@pytest.mark.parametrize("question", [
    "what did the other user ask?", "what do you remember about me?", "what GPU do I have?",
    "what is my locker code?", "what is Kestrel's launch password?", "其他用户问了什么？", "show my memory",
])
def test_the_agent_never_tells_bob_about_alice(world, question):
    reply = world.agent.ask(question, thread_id="bob-asks", user_id="bob")
    assert _leaks(reply.answer + json.dumps([c.model_dump() for c in reply.tool_calls])) == []


# --- HTTP --------------------------------------------------------------------------------------------
def test_http_bob_gets_404s_and_answers_without_alice(world):
    b = world.bob
    for thread in ("alice-http", "alice-job", "alice-py"):
        assert b.get(f"/v1/threads/{thread}").status_code == 404
        assert world.alice.get(f"/v1/threads/{thread}").status_code == 200
    assert b.get(f"/v1/jobs/{world.job}").status_code == 404
    latest = b.get("/v1/jobs")
    assert latest.status_code == 404 and not _leaks(latest.text)
    cancel = b.post(f"/v1/jobs/{world.job}/cancel")
    assert cancel.status_code == 404 and world.agent.jobs().list("alice")[0]["status"] == "queued"
    for data in ("alice_churn.csv", str(world.alice_upload), world.report):
        record = b.post("/v1/tools/shap_report", json={"data": data, "target": "churn"})
        assert record.status_code in (403, 404) and not _leaks(record.text.replace(data, ""))
    # the same file name uploaded by bob is bob's own file; alice's stays as it was
    original = world.alice_upload.read_bytes()
    assert b.post("/v1/files", files={"file": ("alice_churn.csv", "a,b\n1,2\n")}).status_code == 201
    assert world.alice_upload.read_bytes() == original
    for text in ("what did the other user ask?", "what do you remember about me?", "what is my project?"):
        chat = b.post("/v1/chat/completions", json={"model": "stackwise", "messages": [{"role": "user",
                                                                                          "content": text}]})
        assert chat.status_code == 200 and not _leaks(chat.text)
    # bob naming alice's thread id gets a thread of his own, empty of alice's messages
    own = b.post("/v1/threads/alice-http/messages", json={"text": "what did I say before?"})
    assert own.status_code == 200 and not _leaks(own.text)
    assert [m["content"] for m in b.get("/v1/threads/alice-http").json()["messages"]][0] == "what did I say before?"


# --- CLI ---------------------------------------------------------------------------------------------
def test_cli_bob_sees_nothing_of_alice(world):
    shown = _cli(world, "memory", "show", "--json", user="bob")
    assert shown.returncode == 0 and json.loads(shown.stdout)["facts"] == []
    assert not _leaks(shown.stdout)
    jobs = _cli(world, "jobs", "list", "--json", user="bob")
    assert jobs.returncode == 0 and world.job not in jobs.stdout
    status = _cli(world, "tool", "finetune_status", "--args", json.dumps({"job_id": world.job}), "--json", user="bob")
    assert status.returncode == 1 and not json.loads(status.stdout)["ok"] and not _leaks(status.stdout)
    asked = _cli(world, "ask", "what did the other user ask? and what do you remember about me?", "--thread",
                 "cli:alice", "--json", user="bob")
    assert asked.returncode == 0 and not _leaks(asked.stdout)
    alice = _cli(world, "memory", "show", "--json", user="alice")
    assert "CLI-ALICE-8842" in alice.stdout           # the same command does show alice her own


# --- MCP ---------------------------------------------------------------------------------------------
def _mcp_calls(world, user: str, calls: list[tuple[str, dict]]) -> list[dict]:
    from mcp import ClientSession, StdioServerParameters
    from mcp.client.stdio import stdio_client

    env = {**world.env, "STACKWISE_MCP_USER": user}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    params = StdioServerParameters(command=str(Path(sys.executable).parent / "stackwise"), args=["mcp"], env=env,
                                   cwd=str(world.work))

    async def run() -> list[dict]:
        with open(world.home.parent / f"mcp-{user}.log", "w", encoding="utf-8") as errlog:
            async with stdio_client(params, errlog=errlog) as (read, write), ClientSession(read, write) as session:
                await session.initialize()
                results = []
                for name, args in calls:
                    result = await session.call_tool(name, args)
                    results.append(json.loads(result.content[0].text))
                return results

    return asyncio.run(run())


def test_mcp_bob_cannot_reach_alices_jobs_uploads_or_reports(world):
    status, cancel, by_name, by_path, report = _mcp_calls(world, "bob", [
        ("finetune_status", {"job_id": world.job}),
        ("cancel_finetune", {"job_id": world.job, "confirm": True}),
        ("shap_report", {"data": "alice_churn.csv", "target": "churn"}),
        ("shap_report", {"data": str(world.alice_upload), "target": "churn"}),
        ("shap_report", {"data": world.report, "target": "churn"}),
    ])
    assert not status["ok"] and not cancel["ok"] and not _leaks(json.dumps(status) + json.dumps(cancel))
    assert world.agent.jobs().list("alice")[0]["status"] == "queued"
    # the name resolves in bob's uploads only: not found, or bob's own two-column file of that name (HTTP test)
    assert by_name["error"]["type"] in ("not_found", "unknown_target", "bad_data")
    assert "tenure" not in json.dumps(by_name)            # alice's columns never show
    assert by_path["error"]["type"] == "forbidden_path" and report["error"]["type"] == "forbidden_path"
    (mine,) = _mcp_calls(world, "alice", [("finetune_status", {"job_id": world.job})])
    assert mine["ok"] and mine["result"]["job_id"] == world.job     # the same call works for alice


# --- a known hole, outside this files ----------------------------------------------------------
def test_a_working_directory_that_contains_the_home_does_not_open_other_users_uploads(world, monkeypatch):
    # `stackwise serve` started from ~ with the default ~/.stackwise: the working directory holds the home.
    monkeypatch.chdir(world.home.parent)
    relative = os.path.relpath(world.alice_upload, world.home.parent)
    record = world.agent.call_tool("shap_report", {"data": relative, "target": "churn"}, user_id="bob")
    assert record["error"]["type"] == "forbidden_path"

