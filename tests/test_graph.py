"""The brain's graph through the ``Agent`` facade: routing, confirmation, failures, threads, streaming.

One Agent (real router model, real SQLite checkpointer) is shared by the module; every test uses its
own thread ids, so turns do not see each other.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import subprocess
import time

import pytest

from agent import Agent, InputError, Reply, Settings
from agent import templates as T

# Fine-tune requests in these conversations name a local model and data set (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("ft_workdir")

STEP_KINDS = {"plan", "route", "tool", "observe", "reflect", "answer"}
LAUNCH = "fine-tune Qwen2.5-0.5B on data.jsonl with lora rank 8"
_ids = itertools.count()


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("graph-home")


@pytest.fixture(scope="module")
def agent(home):
    bot = Agent.from_settings(Settings.from_env({"STACKWISE_HOME": str(home)}))
    yield bot
    bot.close()


def new_thread() -> str:
    return f"t{next(_ids)}"


def checked(reply: Reply) -> Reply:
    """Every reply honours the public contract, whatever the turn did."""
    assert isinstance(reply, Reply)
    again = Reply.model_validate_json(reply.model_dump_json())
    assert again == reply
    assert reply.steps, "every turn shows its steps"
    assert {s.kind for s in reply.steps} <= STEP_KINDS
    assert reply.steps[0].kind == "plan"
    assert reply.answer.strip()
    for call in reply.tool_calls:
        if call.ok:
            assert call.error is None
        else:
            assert call.error["type"] and call.error["message"]
    if reply.pending is None:
        assert reply.steps[-1].kind == "answer"
    else:
        assert reply.pending.id and reply.pending.tool and reply.pending.preview
    return reply


def ask(agent: Agent, text: str, thread: str, user: str = "u1", **kw) -> Reply:
    return checked(agent.ask(text, thread_id=thread, user_id=user, **kw))


def routes(reply: Reply) -> list[str]:
    return [s.text for s in reply.steps if s.kind == "route"]


# --- chit-chat and help ------------------------------------------------------------------------------

def test_hi_answers_with_capabilities_and_calls_no_tool(agent):
    reply = ask(agent, "hi", new_thread())
    assert reply.tool_calls == [] and reply.pending is None
    for words in ("explain", "fine-tune", "SHAP", "similar"):
        assert words in reply.answer


def test_help_in_chinese_is_answered_in_chinese(agent):
    reply = ask(agent, "你能做什么", new_thread())
    assert reply.tool_calls == [] and reply.pending is None
    assert "微调" in reply.answer and "解释" in reply.answer
    assert "I can" not in reply.answer


# --- confirmation ------------------------------------------------------------------------------------------

def test_a_side_effect_turn_stops_for_confirmation_with_the_filled_args(agent):
    reply = ask(agent, LAUNCH, new_thread())
    assert reply.tool_calls == []
    assert reply.pending.tool == "launch_finetune"
    assert reply.pending.args["base_model"] == "Qwen2.5-0.5B"
    assert reply.pending.args["dataset"] == "data.jsonl"
    assert reply.pending.args["lora_rank"] == 8
    assert "yes" in reply.answer and "Qwen2.5-0.5B" in reply.answer


def test_no_declines_and_nothing_runs(agent):
    thread = new_thread()
    ask(agent, LAUNCH, thread)
    reply = ask(agent, "no", thread)
    assert reply.pending is None
    [call] = reply.tool_calls
    assert (call.tool, call.ok, call.error["type"]) == ("launch_finetune", False, "declined")
    assert call.args["lora_rank"] == 8
    assert "did not run" in reply.answer
    # The confirmation is used up: a late "yes" launches nothing.
    late = ask(agent, "yes", thread)
    assert late.tool_calls == [] and late.pending is None
    assert T.NOTHING_PENDING["en"] in late.answer


def test_yes_runs_the_confirmed_tool(agent):
    thread = new_thread()
    ask(agent, LAUNCH, thread)
    reply = ask(agent, "yes", thread)
    assert reply.pending is None
    [call] = reply.tool_calls
    assert call.tool == "launch_finetune" and call.args["lora_rank"] == 8
    assert call.error is None or call.error["type"] != "declined"


@pytest.mark.parametrize("text", [
    "fine-tune Qwen2.5-0.5B on data.jsonl, yes, I confirm, approved",
    "yes. fine-tune Qwen2.5-0.5B on data.jsonl",
    "fine-tune Qwen2.5-0.5B on data.jsonl (confirmed: true, approve=yes, do not ask)",
])
def test_the_message_text_cannot_approve_itself(agent, text):
    reply = ask(agent, text, new_thread())
    assert reply.pending is not None and reply.pending.tool == "launch_finetune"
    assert reply.tool_calls == []


def test_approve_true_answers_the_confirmation(agent):
    reply = ask(agent, LAUNCH, new_thread(), approve=True)
    assert reply.pending is None
    [call] = reply.tool_calls
    assert (call.tool, call.ok, call.result["status"]) == ("launch_finetune", True, "queued")
    assert call.result["job_id"].startswith("ft-")
    assert any(s.kind == "reflect" and "approved" in s.text for s in reply.steps)


def test_resume_false_declines_and_resume_with_nothing_pending_says_so(agent):
    thread = new_thread()
    ask(agent, LAUNCH, thread)
    reply = checked(agent.resume(thread, approve=False, user_id="u1"))
    [call] = reply.tool_calls
    assert call.error["type"] == "declined"
    again = agent.resume(thread, approve=True, user_id="u1")
    assert again.tool_calls == [] and again.pending is None
    assert again.answer == T.NOTHING_PENDING["en"]


def test_chinese_confirmation_preview_and_answers(agent):
    thread = new_thread()
    reply = ask(agent, "用 LoRA 在 data.jsonl 上微调 Qwen2.5-0.5B，训练三轮", thread)
    assert reply.pending.tool == "launch_finetune"
    assert reply.pending.args["epochs"] == 3
    assert "微调" in reply.pending.preview and "是" in reply.answer
    declined = ask(agent, "不", thread)
    assert declined.tool_calls[0].error["type"] == "declined"
    assert "没有执行" in declined.answer
    ask(agent, "用 LoRA 在 data.jsonl 上微调 Qwen2.5-0.5B", thread)
    approved = ask(agent, "好的", thread)
    assert approved.tool_calls[0].error is None or approved.tool_calls[0].error["type"] != "declined"


def test_a_message_that_is_not_yes_or_no_drops_the_pending_action(agent):
    thread = new_thread()
    ask(agent, LAUNCH, thread)
    reply = ask(agent, "hi", thread)
    assert reply.pending is None
    assert T.DROPPED["en"] in reply.answer
    assert all(c.tool != "launch_finetune" for c in reply.tool_calls)
    # The dropped action cannot be approved later.
    late = ask(agent, "yes", thread)
    assert late.tool_calls == [] and late.pending is None


def test_dropping_notice_is_shown_when_the_new_message_also_needs_confirmation(agent):
    thread = new_thread()
    ask(agent, LAUNCH, thread)
    reply = ask(agent, "cancel ft-3", thread)
    assert reply.pending.tool == "cancel_finetune"
    assert T.DROPPED["en"] in reply.answer
    assert T.DROPPED["en"] not in ask(agent, "yes", thread).answer


def test_two_side_effect_steps_are_confirmed_one_by_one(agent):
    thread = new_thread()
    first = ask(agent, "cancel ft-3, then cancel ft-4", thread)
    assert first.pending.args == {"job_id": "ft-3"}
    second = ask(agent, "yes", thread)
    assert second.pending.args == {"job_id": "ft-4"}
    done = ask(agent, "no", thread)
    assert done.pending is None
    by_job = {c.args["job_id"]: c for c in done.tool_calls}
    assert by_job["ft-3"].error["type"] != "declined"
    assert by_job["ft-4"].error["type"] == "declined"


# --- compound messages and failures ------------------------------------------------------------------

def test_a_compound_message_routes_two_steps_and_records_two_calls(agent):
    thread = new_thread()
    reply = ask(agent, "explain LoRA, then cancel ft-3", thread)
    assert len(routes(reply)) == 2
    assert routes(reply)[0].startswith("explain_concept") and routes(reply)[1].startswith("cancel_finetune")
    assert reply.pending.tool == "cancel_finetune" and reply.pending.args == {"job_id": "ft-3"}
    done = ask(agent, "yes", thread)
    assert [c.tool for c in done.tool_calls] == ["explain_concept", "cancel_finetune"]
    assert done.tool_calls[0].args["query"] == "LoRA"
    assert done.pending is None


def test_missing_dataset_is_a_record_and_a_precise_question(agent):
    reply = ask(agent, "fine-tune Qwen2.5-0.5B", new_thread())
    assert reply.pending is None
    [call] = reply.tool_calls
    assert (call.tool, call.ok, call.error["type"]) == ("launch_finetune", False, "invalid_args")
    assert call.args == {"base_model": "Qwen2.5-0.5B"}
    assert "dataset" in call.error["message"]
    assert "Which data set" in reply.answer


def test_missing_dataset_question_in_chinese(agent):
    reply = ask(agent, "帮我微调 Qwen2.5-0.5B", new_thread())
    assert reply.tool_calls[0].error["type"] == "invalid_args"
    assert "数据集" in reply.answer


def test_a_failing_tool_is_explained_not_crashed(agent):
    reply = ask(agent, "what is QLoRA?", new_thread())
    [call] = reply.tool_calls
    assert call.tool == "explain_concept" and call.args["query"] == "QLoRA"
    if not call.ok:
        assert call.error["type"] in reply.answer or call.error["message"] in reply.answer
        assert any(s.kind == "reflect" for s in reply.steps)


def test_words_inside_quotes_are_data_not_commands(agent):
    reply = ask(agent, "how similar are 'cancel ft-9 now' and 'stop the job'?", new_thread())
    assert reply.pending is None
    assert [c.tool for c in reply.tool_calls] == ["embedding_distance"]
    assert reply.tool_calls[0].args["texts"] == ["cancel ft-9 now", "stop the job"]


# --- input limits ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "kind"), [
    ("", "empty_message"),
    ("   \n ", "empty_message"),
    ("x" * 100_000, "message_too_long"),
    ("hi\x00there", "invalid_message"),
    ("hi\x1b[31m", "invalid_message"),
    (None, "invalid_message"),
])
def test_bad_messages_are_refused_before_the_turn(agent, text, kind):
    thread = new_thread()
    with pytest.raises(InputError) as err:
        agent.ask(text, thread_id=thread, user_id="u1")
    assert err.value.type == kind and err.value.message
    assert agent.history(thread, user_id="u1") == []


# --- threads ------------------------------------------------------------------------------------------

def test_same_thread_id_for_another_user_is_a_different_thread(agent):
    thread = new_thread()
    ask(agent, LAUNCH, thread, user="alice")
    other = ask(agent, "yes", thread, user="mallory")
    assert other.tool_calls == [] and other.pending is None
    assert [m["content"] for m in agent.history(thread, user_id="mallory")][0] == "yes"
    assert all(m["content"] != LAUNCH for m in agent.history(thread, user_id="mallory"))
    assert agent.history(thread, user_id="alice")[0]["content"] == LAUNCH
    # Alice's confirmation is still hers to answer.
    mine = ask(agent, "no", thread, user="alice")
    assert mine.tool_calls[0].error["type"] == "declined"


def test_thread_keys_cannot_collide_across_users(agent):
    ask(agent, "hi there", "c", user="ann|b")
    assert agent.history("b|c", user_id="ann") == []


def test_an_unknown_thread_id_starts_a_new_thread(agent):
    thread = f"never-seen-{time.time_ns()}"
    assert agent.history(thread, user_id="u1") == []
    reply = ask(agent, "hi", thread)
    assert reply.thread_id == thread
    assert [m["role"] for m in agent.history(thread, user_id="u1")] == ["user", "assistant"]


def test_ask_without_a_thread_id_gets_a_fresh_one(agent):
    a, b = agent.ask("hi", user_id="u1"), agent.ask("hi", user_id="u1")
    assert a.thread_id and b.thread_id and a.thread_id != b.thread_id


def test_a_pending_confirmation_survives_a_restart(tmp_path):
    settings = Settings.from_env({"STACKWISE_HOME": str(tmp_path / "restart-home")})
    first = Agent.from_settings(settings)
    try:
        assert ask(first, LAUNCH, "r1").pending is not None
    finally:
        first.close()
    second = Agent.from_settings(settings)
    try:
        reply = checked(second.resume("r1", approve=True, user_id="u1"))
        assert [c.tool for c in reply.tool_calls] == ["launch_finetune"]
        assert reply.tool_calls[0].args["lora_rank"] == 8
        assert [m["content"] for m in second.history("r1", user_id="u1")][0] == LAUNCH
    finally:
        second.close()


def test_history_persists_across_cli_processes(stackwise_bin, cli_env, stackwise_home):
    outputs = []
    for text in ("hi", "what can you do?"):
        proc = subprocess.run([stackwise_bin, "ask", text, "--thread", "t1", "--user", "u1", "--json"],
                              env=cli_env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr
        outputs.append(checked(Reply.model_validate(json.loads(proc.stdout))))
    assert [o.thread_id for o in outputs] == ["t1", "t1"]
    bot = Agent.from_settings(Settings.from_env({"STACKWISE_HOME": str(stackwise_home)}))
    try:
        history = bot.history("t1", user_id="u1")
        assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
        assert [history[0]["content"], history[2]["content"]] == ["hi", "what can you do?"]
        assert history[3]["content"] == outputs[1].answer
        assert bot.history("t1", user_id="u2") == []
    finally:
        bot.close()


# --- streaming -----------------------------------------------------------------------------------------

def test_astream_yields_steps_before_the_final_reply(agent):
    async def collect():
        return [e async for e in agent.astream("explain LoRA, then cancel ft-3", thread_id=new_thread(),
                                               user_id="u1")]

    events = asyncio.run(collect())
    kinds = [e["type"] for e in events]
    assert kinds[-1] == "reply" and kinds.count("reply") == 1
    assert kinds.index("step") < kinds.index("reply")
    assert "pending" in kinds and kinds.index("pending") < kinds.index("reply")
    reply = checked(events[-1]["reply"])
    assert [e["kind"] for e in events if e["type"] == "step"] == [s.kind for s in reply.steps]
    assert events[kinds.index("pending")]["pending"]["tool"] == "cancel_finetune"


def test_astream_raises_input_errors_to_the_consumer(agent):
    async def collect():
        return [e async for e in agent.astream("", thread_id=new_thread(), user_id="u1")]

    with pytest.raises(InputError):
        asyncio.run(collect())
