"""A trial in chat: "try it on 500 rows first" / "先用500条试一下" launches a trial (after a yes), its status and its
announcement say so and offer the full run, and "run the full job" / "跑完整的" — or a bare "yes" right after the
announcement in the same thread — asks to launch the same spec on all rows, which a yes then queues."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from trial_rows import SIZES, cot_rows, write_jsonl

from agent import Agent, Settings
from agent import templates as T
from agent.slots import extract_slots
from agent.trials import wants_full_run
from tools.finetune.rundir import RunPaths

pytestmark = pytest.mark.usefixtures("ft_workdir")

ROWS = cot_rows(SIZES)
TRIAL_EN = "fine-tune Qwen2.5-0.5B on big.jsonl with lora rank 8, try it on 500 rows first"
TRIAL_ZH = "用 LoRA 在 big.jsonl 上微调 Qwen2.5-0.5B，秩 8，先用500条试一下"
FULL_ARGS = {"base_model": "Qwen2.5-0.5B", "dataset": "big.jsonl", "lora_rank": 8}


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    bot = Agent(Settings.from_env({"STACKWISE_HOME": str(tmp_path_factory.mktemp("trial-home"))}), channel="cli")
    yield bot
    bot.close()


@pytest.fixture(autouse=True)
def big(ft_workdir) -> Path:
    return write_jsonl(ft_workdir / "big.jsonl", ROWS)


def finish(agent: Agent, job_id: str) -> None:
    """A worker takes the queued jobs in order; ``job_id`` succeeds (any older one left by another test fails)."""
    store = agent.jobs().store
    while (job := store.claim("w-test")) is not None and job.id != job_id:
        store.finish(job.id, "failed", error="not this test's job")
    assert job is not None
    store.finish(job_id, "succeeded", summary={"status": "succeeded", "steps": 119, "final_loss": 1.05})


def launch_trial(agent: Agent, thread: str, user: str, text: str = TRIAL_EN) -> str:
    asked = agent.ask(text, thread_id=thread, user_id=user)
    assert asked.pending is not None and asked.pending.args["sample_rows"] == 500, asked.answer
    done = agent.ask("yes" if "try" in text else "是", thread_id=thread, user_id=user)
    [call] = done.tool_calls
    assert call.ok, call.error
    return call.result["job_id"]


def spec_of(agent: Agent, job_id: str, user: str) -> dict:
    job = agent.jobs().store.get(job_id, owner=user)
    return json.loads(RunPaths(Path(job.run_dir)).spec.read_text(encoding="utf-8"))


def test_a_trial_asked_for_in_chat_is_launched_after_yes_and_its_status_says_so(agent):
    asked = agent.ask(TRIAL_EN, thread_id="t1", user_id="ann")
    assert asked.pending.tool == "launch_finetune"
    assert asked.pending.args == FULL_ARGS | {"method": "lora", "sample_rows": 500}
    preview = asked.pending.preview
    assert "500 rows (475 train, 25 eval)" in preview
    assert "Trial run: a sample of 500 of 3,000 rows" in preview and "'category' column" in preview
    assert agent.jobs().list("ann") == []                                  # nothing before the yes
    done = agent.ask("yes", thread_id="t1", user_id="ann")
    job_id = done.tool_calls[0].result["job_id"]
    spec = spec_of(agent, job_id, "ann")
    assert spec["sample_rows"] == 500 and spec["trial"]["rows"] == 500 and spec["trial"]["of"] == 3000
    status = agent.ask(f"status of {job_id}", thread_id="t1", user_id="ann")
    assert "This is a trial on 500 of 3,000 rows" in status.answer


def test_run_the_full_job_after_a_trial_asks_for_the_same_spec_on_all_rows(agent):
    trial = launch_trial(agent, "t2", "bob")
    finish(agent, trial)
    [notice] = [n for n in agent.jobs().announcements("cli", "bob")]
    assert notice["trial"]["of"] == 3000
    assert 'Say "run the full job" (or "yes") to launch the same spec on all 3,000 rows.' in notice["text"]

    asked = agent.ask("run the full job", thread_id="t2", user_id="bob")
    assert asked.pending is not None and asked.pending.tool == "launch_finetune"
    assert asked.pending.args == FULL_ARGS                                  # the trial's spec minus sample_rows
    assert "3,000 rows (2,850 train, 150 eval)" in asked.pending.preview
    assert f"The full run: trial {trial}'s spec without the sample, on all 3,000 rows" in asked.answer
    assert len(agent.jobs().list("bob")) == 1                               # still only the trial
    done = agent.ask("yes", thread_id="t2", user_id="bob")
    [call] = done.tool_calls
    assert call.ok and call.result["job_id"] != trial
    spec = spec_of(agent, call.result["job_id"], "bob")
    assert spec["sample_rows"] is None and "trial" not in spec and spec["max_steps"] is None
    assert (call.result["train_rows"], call.result["eval_rows"]) == (2850, 150)

    again = agent.ask("yes, full run", thread_id="t2b", user_id="bob")     # asked again elsewhere: it says so
    assert again.pending.args == FULL_ARGS and f"{call.result['job_id']} already ran or runs" in again.answer


def test_the_chinese_phrases_launch_a_trial_and_then_the_full_run(agent):
    asked = agent.ask(TRIAL_ZH, thread_id="z1", user_id="chen")
    assert asked.pending.args["sample_rows"] == 500 and "试跑：从 3,000 行中抽样 500 行" in asked.pending.preview
    done = agent.ask("是", thread_id="z1", user_id="chen")
    trial = done.tool_calls[0].result["job_id"]
    finish(agent, trial)
    [notice] = agent.jobs().announcements("cli", "chen")
    assert "说“跑完整的”（或回复“是”）" in notice["text"]
    full = agent.ask("跑完整的", thread_id="z1", user_id="chen")
    assert full.pending is not None and full.pending.args == FULL_ARGS
    assert "完整任务" in full.answer and "3,000 行" in full.pending.preview
    queued = agent.ask("是", thread_id="z1", user_id="chen")
    assert queued.tool_calls[0].ok and spec_of(agent, queued.tool_calls[0].result["job_id"], "chen")["sample_rows"] \
        is None


def test_a_bare_yes_right_after_the_announcement_opens_the_full_run_in_that_thread_only(agent):
    trial = launch_trial(agent, "y1", "dana")
    finish(agent, trial)
    agent.jobs().announcements("cli", "dana")
    elsewhere = agent.ask("yes", thread_id="y-other", user_id="dana")       # another thread: not its announcement
    assert elsewhere.pending is None and elsewhere.answer == T.NOTHING_PENDING["en"]
    reply = agent.ask("yes", thread_id="y1", user_id="dana")
    assert reply.pending is not None and reply.pending.args == FULL_ARGS
    assert T.NOTHING_PENDING["en"] not in reply.answer and "The full run" in reply.answer
    assert reply.tool_calls == [] and len(agent.jobs().list("dana")) == 1  # a question, not a launch
    declined = agent.ask("no", thread_id="y1", user_id="dana")
    assert declined.tool_calls[0].error["type"] == "declined" and len(agent.jobs().list("dana")) == 1
    later = agent.ask("yes", thread_id="y1", user_id="dana")                # the thread moved on: a plain yes again
    assert later.pending is None and later.answer == T.NOTHING_PENDING["en"]


def test_a_yes_before_the_announcement_or_an_ok_after_it_opens_nothing(agent):
    trial = launch_trial(agent, "y2", "eve")
    finish(agent, trial)                                                    # ended, but not announced yet
    reply = agent.ask("yes", thread_id="y2", user_id="eve")
    assert reply.pending is None and reply.answer == T.NOTHING_PENDING["en"]
    agent.jobs().announcements("cli", "eve")
    ok = agent.ask("ok", thread_id="y2", user_id="eve")                     # an acknowledgement, not the offer's yes
    assert ok.pending is None and ok.answer == T.NOTHING_PENDING["en"]


@pytest.mark.parametrize(("text", "words"), [
    ("run the full job", ["no trial job", "try it on 500 rows first"]),
    ("跑完整的", ["还没有试跑任务", "先用500条试一下"]),
])
def test_the_full_run_without_a_trial_says_how_to_start_one(agent, text, words):
    reply = agent.ask(text, thread_id=f"n-{text}", user_id="frank")
    assert reply.pending is None and reply.tool_calls == []
    for word in words:
        assert word in reply.answer


def test_try_it_on_500_rows_first_turns_the_launch_just_shown_into_a_trial(agent):
    first = agent.ask("fine-tune Qwen2.5-0.5B on big.jsonl with lora rank 8", thread_id="a1", user_id="gus")
    assert "3,000 rows" in first.pending.preview and "sample_rows" not in first.pending.args
    trial = agent.ask("try it on 500 rows first", thread_id="a1", user_id="gus")
    assert trial.pending is not None and trial.pending.args == FULL_ARGS | {"method": "lora", "sample_rows": 500}
    assert T.DROPPED["en"] in trial.answer and "500 rows (475 train, 25 eval)" in trial.pending.preview


def test_a_full_run_asked_for_with_its_trial_waits_for_the_trial(agent):
    text = "fine-tune Qwen2.5-0.5B on big.jsonl with lora rank 8, try it on 500 rows first, then run the full job"
    asked = agent.ask(text, thread_id="w1", user_id="hana")
    assert asked.pending.args["sample_rows"] == 500
    done = agent.ask("yes", thread_id="w1", user_id="hana")
    assert [c.tool for c in done.tool_calls] == ["launch_finetune"] and done.tool_calls[0].ok
    assert "The full run comes after the trial" in done.answer and len(agent.jobs().list("hana")) == 1


@pytest.mark.parametrize("text", [
    "run the full job", "yes, full run", "Yes, full run please", "run it on all rows", "go for the full run",
    "launch the full run on all 3,000 rows", "now the full data set",
    "跑完整的", "好的，跑完整的", "跑全量", "用全部数据跑一遍", "正式跑吧", "那就跑完整版吧"])
def test_full_run_phrases(text):
    assert wants_full_run(text)


@pytest.mark.parametrize("text", ["what is a full run?", "run a full fine-tune of Qwen2.5-0.5B on data.jsonl", "yes",
                                  "explain full fine-tuning", "start a full SFT run of Qwen on alpaca.csv",
                                  "开始全量微调", "全量微调是什么", "做完整的评估", "完整的训练流程是什么？",
                                  "用全部数据微调 Qwen2.5-0.5B"])
def test_not_full_run_phrases(text):
    assert not wants_full_run(text)


@pytest.mark.parametrize(("text", "rows"), [
    ("try it on 500 rows first", 500), ("test with 1k examples first", 1000), ("a quick 500-row trial", 500),
    ("fine-tune on the first 200 rows of data.jsonl", 200), ("sample_rows=300", 300), ("先用500条试一下", 500),
    ("先拿 1,000 条数据跑一下", 1000), ("抽样 2千条", 2000), ("只用 800 条训练", 800),
    ("my data set has 3000 rows, fine-tune Qwen on it", None), ("explain row 12 of churn.csv", None),
    ("第3行为什么被预测为流失", None), ("数据有 3000 条，用 LoRA 微调 Qwen2.5-0.5B", None),
    ("run 500 steps first", None),
])
def test_trial_sizes_in_words(text, rows):
    lang = "zh" if any("\u4e00" <= c <= "\u9fff" for c in text) else "en"
    assert extract_slots(text, lang).get("sample_rows") == rows
