"""The Telegram bot end to end: the real python-telegram-bot client talks to a fake Bot API server on loopback
(``tests/fake_telegram.py``, which checks HTML and the length limit the way Telegram does), and a real ``Agent``
answers. One bot runs for the module (users 101 — an admin —, 202, 303 and 505 allowed; 404 not)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import socket
import threading
import time
from types import SimpleNamespace

import httpx
import pytest
from fake_telegram import FakeTelegram, check_html, utf16
from tables import churn_csv as alice_csv

from agent import Agent, Reply, Settings
from bots import channel as C
from bots.telegram import TelegramBot, TelegramConfig, chat_of_thread
from bots.telegram_commands import COMMANDS

ANN, BOB, CY, EVE, DEE = (FakeTelegram.user(101, "Ann"), FakeTelegram.user(202, "Bob"), FakeTelegram.user(303, "Cy"),
                          FakeTelegram.user(404, "Eve"), FakeTelegram.user(505, "Dee", "zh"))
LAUNCH = "fine-tune Qwen2.5-0.5B on data.jsonl with lora rank 8"


class Running:
    """A bot on its own event loop in a background thread (as ``stackwise telegram`` runs it)."""

    def __init__(self, bot: TelegramBot, main=None):
        self.bot, self.loop = bot, asyncio.new_event_loop()
        self.stop_event: asyncio.Event | None = None
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(main or bot.run,), daemon=True)
        self.thread.start()
        assert self.ready.wait(10)

    def _run(self, main) -> None:
        asyncio.set_event_loop(self.loop)
        self.stop_event = asyncio.Event()
        self.ready.set()
        self.loop.run_until_complete(main(self.stop_event))
        self.loop.close()

    def call(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(20)
        assert not self.thread.is_alive()


class SlowAgent:
    """The real agent, with a pause before each event it streams (or failing): to watch progress and queues."""

    def __init__(self, inner: Agent, delay: float = 0.0, fail: bool = False):
        self.inner, self.delay, self.fail = inner, delay, fail

    def stream(self, text, **kw):
        if self.fail:
            raise RuntimeError("boom: a bug in the agent")
        for event in self.inner.stream(text, **kw):
            time.sleep(self.delay)
            yield event

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.fixture(scope="module")
def fake():
    server = FakeTelegram().start()
    yield server
    server.stop()
    assert server.errors == []


@pytest.fixture(scope="module")
def agent(kb_seed, tmp_path_factory):
    home = tmp_path_factory.mktemp("tg-home")
    shutil.copytree(kb_seed, home, dirs_exist_ok=True)
    bot = Agent(Settings.from_env({"STACKWISE_HOME": str(home)}), channel="telegram")
    yield bot
    bot.close()


@pytest.fixture(scope="module")
def running(fake, agent):
    env = fake.env | {"STACKWISE_TELEGRAM_ALLOWED_USERS": "101, 202 303,505", "STACKWISE_TELEGRAM_ADMINS": "101"}
    run = Running(TelegramBot(agent, TelegramConfig.from_env(env, poll_timeout=1, job_poll_s=0.2)))
    yield run
    run.stop()


@contextlib.contextmanager
def swapped(running: Running, agent, **config):
    bot, saved = running.bot, (running.bot.agent, dict(vars(running.bot.config)))
    bot.agent = agent
    for k, v in config.items():
        setattr(bot.config, k, v)
    try:
        yield
    finally:
        bot.agent = saved[0]
        vars(bot.config).update(saved[1])


def churn_csv(n: int) -> bytes:
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)
    tenure, contract = rng.integers(1, 72, n), rng.choice(["month", "year"], n)
    logit = -0.08 * tenure + np.where(contract == "month", 1.0, -0.5) + 1.5
    churn = np.where(rng.random(n) < 1 / (1 + np.exp(-logit)), "Yes", "No")
    frame = pd.DataFrame({"tenure": tenure, "contract": contract, "noise": rng.normal(size=n), "churn": churn})
    return frame.to_csv(index=False).encode()


def said(fake: FakeTelegram, chat: int) -> list[str]:
    """What the bot told ``chat`` in new messages (progress messages left out)."""
    return [t for t in fake.texts(chat) if not t.startswith("⏳")]


def exchange(fake: FakeTelegram, chat: int, user: dict, text: str, n: int = 1, **kw) -> list[str]:
    before = len(said(fake, chat))
    fake.send_text(chat, user, text, **kw)
    return fake.wait_for(lambda: said(fake, chat)[before:] if len(said(fake, chat)) >= before + n else None)


def settle(fake: FakeTelegram, seconds: float = 0.5) -> None:
    """Wait until the bot has been quiet for ``seconds``."""
    while True:
        count = len(fake.calls)
        time.sleep(seconds)
        if len(fake.calls) == count:
            return


# --- commands ----------------------------------------------------------------------------------
def test_start_help_and_the_command_menu(fake, running):
    menu = fake.wait_for(lambda: fake.calls_of("setMyCommands"))[0].params["commands"]
    assert [c["command"] for c in menu] == [name for name, _ in COMMANDS]
    start = exchange(fake, 101, ANN, "/start")[0]
    assert start.startswith("Hi Ann!") and "/new" in start and "/jobs" in start and "CSV" in start
    check_html(start)
    assert "/cancel ft-3" in exchange(fake, 101, ANN, "/help")[0]
    assert "命令" in exchange(fake, 505, DEE, "/help")[0]          # a Chinese Telegram gets Chinese help
    assert "/help lists" in exchange(fake, 101, ANN, "/frobnicate")[0]


def test_an_answer_is_html_with_sources_and_a_collapsed_trace(fake, running):
    text = exchange(fake, 101, ANN, "what is LoRA?")[0]
    assert text.startswith("<b>LoRA (Low-Rank Adaptation)</b>")
    assert "&amp;" in text and "<b>Sources</b>" in text and '<a href="https://arxiv.org/abs/2106.09685">' in text
    trace = re.search(r"<blockquote expandable>(.*?)</blockquote>", text, re.S).group(1)
    assert "route: explain_concept" in trace and "&quot;" not in trace      # quotes in text need no escaping
    reply_to = fake.calls_of("sendMessage", 101)[-1].params["reply_parameters"]
    assert reply_to["message_id"] == max(m for c, m in fake.messages if c == 101 and
                                         fake.messages[(c, m)]["from"]["id"] == 101)


def test_new_starts_a_fresh_thread_that_survives_a_restart(fake, running, agent):
    exchange(fake, 303, CY, "what is QLoRA?")
    assert running.bot.book.get("tg:303") == "tg:303"
    assert "fresh conversation" in exchange(fake, 303, CY, "/new")[0]
    fresh = running.bot.book.get("tg:303")
    assert fresh.startswith("tg:303~")
    exchange(fake, 303, CY, "hi")
    assert [m["content"] for m in agent.history(fresh, user_id="tg:303") if m["role"] == "user"] == ["hi"]
    assert len(agent.history("tg:303", user_id="tg:303")) == 2              # the old thread is kept, untouched
    stored = json.loads((agent.settings.home / "telegram" / "threads.json").read_text())
    assert stored["tg:303"] == fresh


def test_memory_commands_show_and_forget_what_the_agent_keeps_per_user(fake, running, agent, monkeypatch):
    assert "don't remember anything" in exchange(fake, 202, BOB, "/memory")[0]
    agent.remember("tg:202", "my GPU is an RTX 4090 with 24 GB")
    shown = exchange(fake, 202, BOB, "/memory")[0]
    assert "4090" in shown and shown.startswith("• ")
    assert "4090" not in exchange(fake, 303, CY, "/memory")[0]              # Cy sees only his own
    assert "Forgotten: 1" in exchange(fake, 202, BOB, "/forget")[0]
    assert "don't remember anything" in exchange(fake, 202, BOB, "/memory")[0]
    monkeypatch.delattr(type(agent), "memory_show")                          # an agent without the feature
    assert "not available" in exchange(fake, 202, BOB, "/memory")[0]


# --- uploads, photos, documents ----------------------------------------------------------------
def test_an_uploaded_csv_is_saved_and_used_by_name_with_plots_and_report_sent_back(fake, running, agent):
    data = churn_csv(200)
    fake.send_document(202, BOB, "../churn.csv", data)
    saved = fake.wait_for(lambda: [t for t in said(fake, 202) if "Saved" in t])[-1]
    assert "<code>churn.csv</code>" in saved
    path = agent.settings.home / "uploads" / "tg%3A202" / "churn.csv"
    assert path.read_bytes() == data
    photos, docs = len(fake.calls_of("sendPhoto", 202)), len(fake.calls_of("sendDocument", 202))
    answer = exchange(fake, 202, BOB, "which features drive churn in churn.csv?")[0]
    assert "tenure" in answer
    fake.wait_for(lambda: len(fake.calls_of("sendDocument", 202)) > docs)
    assert len(fake.calls_of("sendPhoto", 202)) > photos
    assert all(c.files["photo"][1][:4] == b"\x89PNG" for c in fake.calls_of("sendPhoto", 202))
    assert any(c.files["document"][0].endswith((".md", ".html")) for c in fake.calls_of("sendDocument", 202))
    # another user cannot reach Bob's file by its name
    other = exchange(fake, 303, CY, "which features drive churn in churn.csv?")[0]
    assert "tenure" not in other and "churn.csv" in other


def test_markdown_goes_into_the_private_knowledge_base_and_bad_uploads_are_refused(fake, running):
    note = b"# Marlin\n\nThe Marlin deployment window is every Tuesday at 14:00 UTC, owned by the infra team.\n"
    fake.send_document(101, ANN, "marlin.md", note)
    done = fake.wait_for(lambda: [t for t in said(fake, 101) if "marlin.md" in t])[-1]
    assert "knowledge base" in done
    before = len(said(fake, 101))
    fake.send_document(101, ANN, "tool.exe", b"MZ")
    fake.send_document(101, ANN, "big.csv", b"a,b\n", size=50 * 2**20)
    fake.send_photo(101, ANN)
    refusals = fake.wait_for(lambda: said(fake, 101)[before:] if len(said(fake, 101)) >= before + 3 else None)
    # Uploads are not turns of a thread, so the three answers may come in any order; each is said once.
    assert len(refusals) == 3
    assert len([r for r in refusals if "CSV" in r and "'tool.exe'" in r]) == 1
    assert len([r for r in refusals if "limit is 20 MB" in r]) == 1
    assert len([r for r in refusals if "as a document" in r]) == 1
    assert not [c for c in fake.calls_of("getFile") if c.params["file_id"] not in ("doc1", "doc2")]


# --- splitting -----------------------------------------------------------------------------------
def test_long_multibyte_answers_split_under_the_limit_without_breaking_markup(fake, running):
    paragraphs = [f"**第{i}节** 你好世界 😀 {'<注意> & 数据 🚀 ' * 30}" for i in range(12)]
    paragraphs.insert(5, "\n".join(f"line {i}: 中文 🧪 `code` " + "字" * 60 for i in range(80)))  # > 4096 alone
    paragraphs.append("   pair     cosine\n    1↔2     0.6807")
    reply = Reply(thread_id="tg:7001", answer="\n\n".join(paragraphs),
                  steps=[{"kind": "plan", "text": f"step {i} <x>"} for i in range(40)],
                  citations=[{"id": "kb:x", "title": "A & B", "source": "https://example.org/?a=1&b=2"}])
    running.call(running.bot.answer(7001, reply, SimpleNamespace(id=7001, language_code="en")))
    calls = fake.calls_of("sendMessage", 7001, ok=False)
    assert calls and all(c.status == 200 for c in calls)          # the fake refused no markup and no length
    visible = [check_html(c.params["text"]) for c in calls]
    assert len(calls) >= 3 and all(utf16(v) <= 4096 for v in visible)
    assert max(utf16(v) for v in visible) > 3500                  # packed, not one paragraph per message
    whole = "".join(visible)
    for i in range(12):
        assert sum(f"第{i}节" in v for v in visible) == 1           # each short paragraph whole in one message
        assert f"<b>第{i}节</b>" in "".join(c.params["text"] for c in calls)
    assert all(f"line {i}: 中文" in whole for i in range(80))       # the long one cut at line ends, nothing lost
    assert sum(v.count("<注意> & 数据 🚀") for v in visible) == 12 * 30
    assert "<pre>" in calls[-1].params["text"] or any("<pre>" in c.params["text"] for c in calls)
    assert "<blockquote expandable>" in calls[-1].params["text"] and "step 39 <x>" in visible[-1]


# --- confirmations, admins, jobs, announcements -----------------------------------------------------
@pytest.mark.usefixtures("ft_workdir")
def test_confirmation_buttons_only_for_the_asker_and_jobs_announced_where_launched(fake, running, agent):
    asked = exchange(fake, 101, ANN, LAUNCH)[0]
    assert "Qwen2.5-0.5B" in asked
    ask_call = fake.calls_of("sendMessage", 101)[-1]
    buttons = ask_call.params["reply_markup"]["inline_keyboard"][0]
    assert [b["text"] for b in buttons] == ["🚀 Launch", "✖ Cancel"]
    message_id = ask_call.result["message_id"]
    answers = len(fake.calls_of("answerCallbackQuery"))
    fake.press(101, BOB, message_id, buttons[0]["callback_data"])        # not Bob's to press
    refused = fake.wait_for(lambda: fake.calls_of("answerCallbackQuery")[answers:])[0]
    assert "Only the person who asked" in refused.params["text"] and refused.params["show_alert"] is True
    settle(fake, 0.3)
    assert agent.jobs().list("tg:101") == [] and agent.jobs().list("tg:202") == []

    before = len(said(fake, 101))
    fake.press(101, ANN, message_id, buttons[0]["callback_data"])
    launched = fake.wait_for(lambda: said(fake, 101)[before:])[0]
    job_id = agent.jobs().list("tg:101")[0]["id"]
    assert job_id in launched
    assert fake.calls_of("editMessageReplyMarkup", 101)                 # the buttons are gone
    fake.press(101, ANN, message_id, buttons[0]["callback_data"])       # pressing again launches nothing more
    fake.wait_for(lambda: "no longer waiting" in fake.calls_of("answerCallbackQuery")[-1].params.get("text", ""))
    assert len(agent.jobs().list("tg:101")) == 1

    assert job_id in exchange(fake, 101, ANN, "/jobs")[0]
    assert "no fine-tune jobs" in exchange(fake, 202, BOB, "/jobs")[0]  # Bob sees his own jobs only
    assert "Only this bot's admins" in exchange(fake, 202, BOB, f"/cancel {job_id}")[0]
    assert "/cancel ft-3" in exchange(fake, 101, ANN, "/cancel")[0]
    cancelled = exchange(fake, 101, ANN, f"/cancel {job_id}")[0]
    assert "cancelled" in cancelled
    notice = fake.wait_for(lambda: [t for t in said(fake, 101) if t.startswith("🔔")])[0]
    assert job_id in notice and "cancelled" in notice


@pytest.mark.usefixtures("ft_workdir")
def test_a_non_admin_cannot_launch_and_is_not_left_with_a_pending_question(fake, running, agent):
    answer = exchange(fake, 202, BOB, LAUNCH)[0]
    assert "Only this bot's admins" in answer
    assert "reply_markup" not in fake.calls_of("sendMessage", 202)[-1].params
    assert "nothing" in exchange(fake, 202, BOB, "yes")[0].lower()          # no confirmation left behind
    assert agent.jobs().list("tg:202") == []


@pytest.mark.usefixtures("ft_workdir")
def test_declining_by_button_launches_nothing(fake, running, agent):
    jobs = len(agent.jobs().list("tg:101"))
    exchange(fake, 101, ANN, LAUNCH)
    call = fake.calls_of("sendMessage", 101)[-1]
    cancel = call.params["reply_markup"]["inline_keyboard"][0][1]["callback_data"]
    before = len(said(fake, 101))
    fake.press(101, ANN, call.result["message_id"], cancel)
    declined = fake.wait_for(lambda: said(fake, 101)[before:])[0]
    assert "reply_markup" not in fake.calls_of("sendMessage", 101)[-1].params
    assert len(agent.jobs().list("tg:101")) == jobs and "launch" in declined.lower()


# --- access, groups, isolation, order ---------------------------------------------------------------
def test_strangers_get_one_polite_refusal_and_nothing_else(fake, running, agent):
    for text in ("hello", "/start", "what is LoRA?"):
        fake.send_text(404, EVE, text)
    settle(fake)
    assert len(fake.texts(404)) == 1 and "private stackwise bot" in fake.texts(404)[0]
    assert agent.history("tg:404", user_id="tg:404") == []


def test_groups_answer_mentions_and_replies_only_per_user(fake, running, agent):
    group = -100777
    fake.send_text(group, ANN, "just chatting among humans", kind="supergroup")
    answer = exchange(fake, group, ANN, "@stackwise_test_bot what is QLoRA?", kind="supergroup")[0]
    assert "QLoRA" in answer
    bot_msg = fake.calls_of("sendMessage", group)[-1].result["message_id"]
    exchange(fake, group, BOB, "thanks!", kind="supergroup", reply_to=bot_msg)
    assert [m["content"] for m in agent.history(f"tg:{group}:101", user_id="tg:101")][0] == "what is QLoRA?"
    assert [m["content"] for m in agent.history(f"tg:{group}:202", user_id="tg:202")][0] == "thanks!"
    assert len(said(fake, group)) == 2


def test_two_users_interleaved_stay_isolated_and_each_thread_keeps_its_order(fake, running, agent):
    bob = ["hi", "what is LoRA?", "how similar are 'cat' and 'dog'?"]
    cy = ["什么是注意力机制？", "thanks", "what is RAG?"]
    with swapped(running, SlowAgent(agent, 0.02), progress_grace=5.0):
        running.bot.book.renew("tg:202")
        running.bot.book.renew("tg:303")
        before = {202: len(said(fake, 202)), 303: len(said(fake, 303))}
        for a, b in zip(bob, cy, strict=True):          # all six queued at once, alternating users
            fake.send_text(202, BOB, a)
            fake.send_text(303, CY, b)
        fake.wait_for(lambda: all(len(said(fake, c)) >= before[c] + 3 for c in (202, 303)), timeout=40)
    for chat, uid, sent in ((202, "tg:202", bob), (303, "tg:303", cy)):
        history = agent.history(running.bot.book.get(f"tg:{chat}"), user_id=uid)
        assert [m["role"] for m in history] == ["user", "assistant"] * 3
        assert [m["content"] for m in history if m["role"] == "user"] == sent
        assert said(fake, chat)[before[chat]:][1].startswith(("<b>LoRA", "You're welcome"))
    # one user cannot open another's thread: the same thread id under another user is empty
    assert agent.history(running.bot.book.get("tg:202"), user_id="tg:303") == []


def everything_sent_to(fake: FakeTelegram, chat: int) -> str:
    """All the bot sent to ``chat``: every call's parameters (texts, edits, captions, buttons) and file names and
    contents — progress messages, refused calls and deleted messages included."""
    with fake.cond:
        calls = [c for c in fake.calls if c.params.get("chat_id") == chat]
    return "\n".join(json.dumps(c.params, ensure_ascii=False, default=str)
                     + "".join(f"\n{name}\n{data.decode('utf-8', 'replace')}" for name, data in c.files.values())
                     for c in calls)


@pytest.mark.usefixtures("ft_workdir")
def test_isolation_two_users_share_nothing(fake, running, agent):
    """Issue 9 on Telegram: nothing of alice's — fact, upload, report, job, confirmation — reaches bob, through a
    command, a button or the agent ("what did the other user ask?"); the same commands do show alice her own."""
    alice, bob = FakeTelegram.user(61001, "Alice"), FakeTelegram.user(62002, "Bob")
    a, b = alice["id"], bob["id"]
    secrets = ("TG-ALICE-4417", "support_calls", "tenure", "61001")    # her fact, her columns, her id

    def leaks(text: str, *more: str) -> list[str]:
        return [s for s in (*secrets, *more) if s.lower() in text.lower()]

    # No admins: every allowed user may launch and cancel fine-tunes, so only ownership keeps bob from hers.
    saved_access, running.bot.access = running.bot.access, C.AccessList(frozenset({str(a), str(b)}), frozenset())
    try:
        # --- alice: a fact, an upload, a SHAP report on it, a launched fine-tune -----------------------------
        exchange(fake, a, alice, "remember that my locker code is TG-ALICE-4417")
        assert "my locker code is TG-ALICE-4417" in {f["said"] for f in agent.memory_show("tg:61001")}
        fake.send_document(a, alice, "alice_churn.csv", alice_csv().encode())
        fake.wait_for(lambda: [t for t in said(fake, a) if "Saved" in t and "alice_churn.csv" in t])
        docs = len(fake.calls_of("sendDocument", a))
        report = exchange(fake, a, alice, "explain churn in alice_churn.csv")[0]
        assert "support_calls" in report
        fake.wait_for(lambda: [c for c in fake.calls_of("sendDocument", a)[docs:]
                               if c.files["document"][0].endswith((".md", ".html"))])
        exchange(fake, a, alice, LAUNCH)
        question = fake.calls_of("sendMessage", a)[-1]
        launch, decline = (key["callback_data"] for key in question.params["reply_markup"]["inline_keyboard"][0])
        mid = question.result["message_id"]

        def bob_presses(data: str) -> str:     # (the fake lets him press a button in her chat: the worst case)
            seen = len(fake.calls_of("answerCallbackQuery"))
            fake.press(a, bob, mid, data)
            return fake.wait_for(lambda: fake.calls_of("answerCallbackQuery")[seen:])[0].params.get("text", "")

        for data in (decline, launch):                                  # her current confirmation
            assert "Only the person who asked" in bob_presses(data)
        settle(fake, 0.3)
        assert not fake.calls_of("editMessageReplyMarkup", a)           # still hers to answer
        assert agent.jobs().list("tg:61001") == [] and agent.jobs().list("tg:62002") == []
        before = len(said(fake, a))
        fake.press(a, alice, mid, launch)
        fake.wait_for(lambda: said(fake, a)[before:])
        [job] = agent.jobs().list("tg:61001")
        assert job["status"] == "queued"
        assert "Only the person who asked" in bob_presses(launch)      # her answered (stale) confirmation
        settle(fake, 0.3)
        assert len(agent.jobs().list("tg:61001")) == 1 and agent.jobs().list("tg:62002") == []

        # --- bob: commands, the agent, her file -----------------------------------------------------------
        memory = exchange(fake, b, bob, "/memory")[0]
        assert "don't remember anything" in memory and not leaks(memory)
        jobs = exchange(fake, b, bob, "/jobs")[0]
        assert "no fine-tune jobs" in jobs and job["id"] not in jobs
        cancel = exchange(fake, b, bob, f"/cancel {job['id']}")[0]
        missing = exchange(fake, b, bob, "/cancel ft-999999")[0]
        assert cancel == missing.replace("ft-999999", job["id"])          # hers reads exactly like no job at all
        assert "no job" in cancel.lower() and agent.jobs().list("tg:61001")[0]["status"] == "queued"
        for text in ("what did the other user ask?", "what do you remember about me?"):
            answer = exchange(fake, b, bob, text)[0]
            assert not leaks(answer, "alice_churn", "locker", job["id"]), (text, answer)
        theirs = exchange(fake, b, bob, "explain churn in alice_churn.csv")[0]
        assert "alice_churn.csv" in theirs and not leaks(theirs)        # named back to him, not found, no columns
        settle(fake, 0.3)
        assert not fake.calls_of("sendDocument", b) and not fake.calls_of("sendPhoto", b)   # no report, no plot
        assert not (C.uploads_dir(agent, "tg:62002") / "alice_churn.csv").exists()

        # --- alice, on the same channel, still has all of hers --------------------------------------------
        assert "TG-ALICE-4417" in exchange(fake, a, alice, "/memory")[0]
        assert job["id"] in exchange(fake, a, alice, "/jobs")[0]
        assert "cancelled" in exchange(fake, a, alice, f"/cancel {job['id']}")[0]
        fake.wait_for(lambda: [t for t in said(fake, a) if t.startswith("🔔") and job["id"] in t])
        settle(fake, 0.3)
    finally:
        running.bot.access = saved_access
    sent_to_bob = everything_sent_to(fake, b)
    assert sent_to_bob and not leaks(sent_to_bob), leaks(sent_to_bob)
    assert "🔔" not in sent_to_bob                                      # her job's end is announced to her only


# --- progress, flood control, failures -----------------------------------------------------------------
def test_progress_is_one_message_edited_at_most_once_a_second_then_removed(fake, running, agent):
    with swapped(running, SlowAgent(agent, 0.45), progress_grace=0.2):
        answer = exchange(fake, 505, DEE, "what is LoRA?")[0]
    assert "LoRA" in answer
    progress = [c for c in fake.calls_of("sendMessage", 505) if c.params["text"].startswith("⏳")]
    assert len(progress) == 1
    progress_id = progress[0].result["message_id"]
    fake.wait_for(lambda: [c for c in fake.calls_of("deleteMessage", 505) if c.params["message_id"] == progress_id])
    edits = [c for c in fake.calls_of("editMessageText", 505, ok=False) if c.params["message_id"] == progress_id]
    assert edits, "the progress message was edited as steps arrived"
    times = [progress[0].t] + [c.t for c in edits]
    assert all(b - a >= 0.95 for a, b in zip(times, times[1:], strict=False))


def test_flood_control_is_honoured_and_the_answer_still_arrives_once(fake, running, agent):
    fake.edit_429 = 1.0
    try:
        with swapped(running, SlowAgent(agent, 0.4), progress_grace=0.1):
            answer = exchange(fake, 101, ANN, "what is QLoRA?")[0]
    finally:
        fake.edit_429 = 0.0
    assert "QLoRA" in answer
    refused = [c for c in fake.calls_of("editMessageText", 101, ok=False) if c.status == 429]
    assert refused
    later = [c for c in fake.calls_of("editMessageText", 101, ok=False) if c.t > refused[0].t]
    assert all(c.t - refused[0].t >= 0.95 for c in later)          # nothing edited before retry_after ran out
    # the answer's own send refused once: sent again after retry_after, exactly once
    fake.fail_next["sendMessage"] = [1]
    t0 = time.monotonic()
    answer = exchange(fake, 101, ANN, "what is DPO?")[0]
    assert time.monotonic() - t0 >= 1.0 and "DPO" in answer
    assert sum("DPO" in t for t in said(fake, 101)) == 1


def test_a_failing_turn_is_answered_with_an_apology_and_the_bot_lives_on(fake, running, agent, caplog):
    with swapped(running, SlowAgent(agent, fail=True)):
        apology = exchange(fake, 505, DEE, "what is LoRA?")[0]
    assert apology.startswith("抱歉")                                 # Dee's Telegram speaks Chinese
    assert any("boom: a bug" in (r.exc_text or "") for r in caplog.records)
    assert "control character" in exchange(fake, 505, DEE, "bell \x07 here")[0]     # a user error: its reason
    assert "LoRA" in exchange(fake, 505, DEE, "what is LoRA?")[0]


def test_a_job_notice_goes_to_the_chat_in_its_thread_id(fake, running):
    assert chat_of_thread("tg:-100777:101~ab12cd34") == -100777 and chat_of_thread("cli:bob") is None
    running.call(running.bot.announce({"job_id": "ft-99", "origin": {"thread_id": "tg:303~1234abcd"},
                                       "text": "🔔 Fine-tune failed — ft-99: out of memory <GPU 0>",
                                       "attachments": []}))
    assert "out of memory &lt;GPU 0&gt;" in fake.texts(303)[-1]


# --- configuration, webhook -----------------------------------------------------------------------
def test_configuration_and_the_command_line(fake, capsys, monkeypatch):
    from agent.settings import SettingsError
    from bots.cli import main

    config = TelegramConfig.from_env({"STACKWISE_TELEGRAM_TOKEN": "1:x", "STACKWISE_TELEGRAM_BASE_URL":
                                      "http://127.0.0.1:81", "STACKWISE_TELEGRAM_MAX_UPLOAD_MB": "5"})
    assert (config.base_url, config.base_file_url) == ("http://127.0.0.1:81/bot", "http://127.0.0.1:81/file/bot")
    assert config.max_upload_bytes == 5 * 2**20 and config.access.allows("anyone")
    with pytest.raises(SettingsError, match="STACKWISE_TELEGRAM_ADMINS"):
        TelegramConfig.from_env({"STACKWISE_TELEGRAM_TOKEN": "1:x", "STACKWISE_TELEGRAM_ADMINS": "12;drop"})
    monkeypatch.delenv("STACKWISE_TELEGRAM_TOKEN", raising=False)
    assert main(["telegram"]) == 1
    assert "STACKWISE_TELEGRAM_TOKEN" in capsys.readouterr().err


def test_webhook_mode_checks_its_secret_and_answers(fake, agent):
    from bots.telegram_webhook import run_webhook

    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    env = fake.env | {"STACKWISE_TELEGRAM_WEBHOOK_URL": f"http://127.0.0.1:{port}/tg-hook",
                      "STACKWISE_TELEGRAM_WEBHOOK_PORT": str(port), "STACKWISE_TELEGRAM_WEBHOOK_SECRET": "s3cret"}
    bot = TelegramBot(agent, TelegramConfig.from_env(env, job_poll_s=30))
    run = Running(bot, lambda stop: run_webhook(bot, stop=stop, sock=sock))
    try:
        hook = fake.wait_for(lambda: fake.calls_of("setWebhook"))[0].params
        assert hook["url"].endswith("/tg-hook") and hook["secret_token"] == "s3cret"
        update = {"update_id": 1, "message": {"message_id": 1, "date": 0, "chat": {"id": 8008, "type": "private"},
                                              "from": FakeTelegram.user(8008), "text": "hi"}}
        url = f"http://127.0.0.1:{port}/tg-hook"
        for _ in range(50):
            with contextlib.suppress(httpx.ConnectError):
                assert httpx.post(url, json=update).status_code == 403
                break
            time.sleep(0.1)
        assert httpx.post(url, json=update, headers={"X-Telegram-Bot-Api-Secret-Token": "s3cret"}).status_code == 200
        assert "stackwise" in fake.wait_for(lambda: fake.texts(8008))[0]
    finally:
        run.stop()
        sock.close()


@pytest.mark.usefixtures("ft_workdir")
def test_a_forged_button_in_someone_elses_private_chat_is_refused_and_changes_nothing(fake, running, agent):
    exchange(fake, 101, ANN, LAUNCH)
    call = fake.calls_of("sendMessage", 101)[-1]
    kind, approve, owner, pending_id = call.params["reply_markup"]["inline_keyboard"][0][0]["callback_data"].split(
        ":", 3)
    assert owner == str(ANN["id"])
    answers = len(fake.calls_of("answerCallbackQuery"))
    forged = ":".join((kind, approve, str(BOB["id"]), pending_id))          # Bob claims to own Ann's question
    fake.press(101, BOB, call.result["message_id"], forged)
    refused = fake.wait_for(lambda: fake.calls_of("answerCallbackQuery")[answers:])[0]
    assert "Only the person who asked" in refused.params["text"]
    ann_thread = running.bot.book.get("tg:101")
    assert agent.pending(ann_thread, user_id="tg:101")["id"] == pending_id     # Ann's question still waits
    assert agent.resume(ann_thread, False, user_id="tg:101").pending is None
