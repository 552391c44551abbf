"""A question the bot asks ("which data set?") is answered by the user's next short message."""

from __future__ import annotations

import pytest

from agent import Agent, Settings
from agent.brains.local import _bare_value

# Fine-tune requests in these conversations name a local model and data set (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("ft_workdir")


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    bot = Agent.from_settings(Settings.from_env({"STACKWISE_HOME": str(tmp_path_factory.mktemp("followup"))}))
    yield bot
    bot.close()


def test_a_short_reply_fills_the_missing_dataset_and_the_launch_asks_for_confirmation(agent):
    first = agent.ask("fine-tune Qwen2.5-0.5B with lora rank 8", thread_id="f1", user_id="u")
    assert first.tool_calls[0].error["type"] == "invalid_args"
    assert "data set" in first.answer
    second = agent.ask("medical_cot.jsonl", thread_id="f1", user_id="u")
    assert second.pending is not None
    assert second.pending.args == {"base_model": "Qwen2.5-0.5B", "dataset": "medical_cot.jsonl", "method": "lora",
                                   "lora_rank": 8}


def test_the_answer_works_in_chinese(agent):
    agent.ask("帮我微调 Qwen2.5-0.5B", thread_id="f2", user_id="u")
    reply = agent.ask("用 train.parquet", thread_id="f2", user_id="u")
    assert reply.pending is not None and reply.pending.args["dataset"] == "train.parquet"
    assert "是" in reply.answer   # the confirmation question is in Chinese


def test_a_new_request_after_a_question_is_routed_as_usual(agent):
    agent.ask("fine-tune Qwen2.5-0.5B", thread_id="f3", user_id="u")
    reply = agent.ask("how similar are 'king' and 'queen'?", thread_id="f3", user_id="u")
    assert [c.tool for c in reply.tool_calls] == ["embedding_distance"] and reply.pending is None


def test_the_question_is_asked_only_once(agent):
    agent.ask("fine-tune Qwen2.5-0.5B", thread_id="f4", user_id="u")
    agent.ask("hi", thread_id="f4", user_id="u")                       # chit-chat answers nothing…
    reply = agent.ask("data.jsonl", thread_id="f4", user_id="u")       # …and the question has expired
    assert reply.pending is None


@pytest.mark.parametrize(("text", "value"), [
    ("churn", "churn"), ("the target is churn.", "churn"), ("「revenue」", "revenue"), ("目标列是 price", "price"),
    ("it's ft-3", "ft-3"), ("I really do not know what you mean by that", ""),
])
def test_bare_values(text, value):
    assert _bare_value(text) == value


def test_the_confirmation_exchange_is_in_the_thread_history(agent):
    agent.ask("cancel ft-3", thread_id="f5", user_id="u")
    agent.ask("no", thread_id="f5", user_id="u")
    history = agent.history("f5", user_id="u")
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    assert history[0]["content"] == "cancel ft-3"
    assert "ft-3" in history[1]["content"] and history[2]["content"] == "no"
