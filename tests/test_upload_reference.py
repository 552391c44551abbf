""""Explain churn in the file I just sent": a message that points at an upload means the asker's newest upload
(the bots and the HTTP API save uploads in the user's folder; the user need not repeat its name)."""

from __future__ import annotations

import os
import time

import pytest
from tables import churn_csv

from agent import Agent, Settings


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    bot = Agent(Settings.from_env({"STACKWISE_HOME": str(tmp_path_factory.mktemp("upload-ref"))}))
    yield bot
    bot.close()


def upload(agent: Agent, user: str, name: str, text: str, age_s: float = 0) -> None:
    folder = agent.toolbox.context(user).uploads_dir
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text, encoding="utf-8")
    stamp = time.time() - age_s
    os.utime(path, (stamp, stamp))


@pytest.mark.parametrize("text", ["explain churn in the file I just sent", "刚才发的文件里哪些特征影响 churn？"])
def test_the_file_i_just_sent_is_the_newest_upload(agent, tmp_path, monkeypatch, text):
    monkeypatch.chdir(tmp_path)
    upload(agent, "ann", "old.csv", churn_csv(), age_s=600)
    upload(agent, "ann", "notes.md", "# notes\n", age_s=300)
    upload(agent, "ann", "new_churn.csv", churn_csv(), age_s=60)              # the one just sent
    reply = agent.ask(text, thread_id=f"t-{abs(hash(text))}", user_id="ann")
    call = next(c for c in reply.tool_calls if c.tool == "shap_report")
    assert call.args["data"] == "new_churn.csv" and call.ok, call.error


def test_without_an_upload_nothing_is_made_up_and_other_users_files_are_not_used(agent, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    upload(agent, "bea", "bea_private.csv", churn_csv())
    reply = agent.ask("explain churn in the file I just sent", thread_id="t-cal", user_id="cal")
    calls = [c for c in reply.tool_calls if c.tool == "shap_report"]
    assert all(c.args.get("data") != "bea_private.csv" for c in calls)
    assert "bea_private" not in reply.answer
