"""The Slack bot end to end: signed Events API / interactivity requests over real HTTP into the bot's endpoint
(Bolt verifies them), a real ``Agent`` behind it, and the fake Slack Web API (``tests/fake_slack.py``) on loopback
that the real ``slack_sdk`` client posts to — so every assertion is about what a Slack user would see.

One bot, server and Agent for the module; every test uses its own threads (fresh message timestamps)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from fake_slack import BOT_USER, TEAM, FakeSlack, SlackSender
from tables import churn_csv

from agent import Agent, Reply, Settings
from bots import channel as C
from bots import slack_render as R
from bots.slack import SlackConfig, bound_socket, build_app, http_server, make_client, retry_delay
from bots.slack_bot import SlackBot, slack_thread_of

pytestmark = pytest.mark.usefixtures("ft_workdir")

SECRET = "test-signing-secret"
TOKEN = "xoxb-test-token"
ALICE, BOB, ADMIN, EVE = "UALICE", "UBOB", "UADMIN", "UEVE"
CHANNEL, DM = "C0CHAN", "D0DM"
LAUNCH = "fine-tune Qwen2.5-0.5B on data.jsonl with lora rank 8"
UPLOAD_LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def slack():
    with FakeSlack(token=TOKEN) as fake:
        yield fake


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    bot = Agent(Settings.from_env({"STACKWISE_HOME": str(tmp_path_factory.mktemp("slack-home"))}), channel="slack")
    yield bot
    bot.close()


@pytest.fixture(scope="module")
def bot(slack, agent):
    env = {"SLACK_BOT_TOKEN": TOKEN, "SLACK_SIGNING_SECRET": SECRET, "STACKWISE_SLACK_API_URL": slack.api_url,
           "STACKWISE_SLACK_ALLOWED_USERS": f"{ALICE},{BOB}", "STACKWISE_SLACK_ADMINS": ADMIN,
           "STACKWISE_SLACK_MAX_UPLOAD_MB": str(UPLOAD_LIMIT / 2**20)}
    config = SlackConfig.from_env(env, job_poll_s=0.2, progress_grace=0.3, edit_interval=0.2)
    bot = SlackBot(agent, config, make_client(config), retry_delay=retry_delay)
    bot.start()
    yield bot
    bot.stop()


@pytest.fixture(scope="module")
def sender(bot):
    server = http_server(build_app(bot, bot.config), "127.0.0.1", 0)
    sock = bound_socket()
    runner = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    runner.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    out = SlackSender(f"http://127.0.0.1:{sock.getsockname()[1]}/slack/events", SECRET)
    yield out
    out.close()
    server.should_exit = True
    runner.join(10)
    sock.close()


@pytest.fixture(autouse=True)
def _fresh(request, slack):
    slack.reset()


def wait_for(check, timeout: float = 20.0, what: str = "the bot"):
    """Poll ``check()`` until it returns something truthy (the bot works after its ack)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def answers(slack: FakeSlack, channel: str, ts: str, n: int = 1) -> list:
    """The first ``n`` messages the bot posted in the thread of ``ts`` (not counting progress messages)."""
    def found():
        posted = [m for m in slack.posts(channel, ts) if m.blocks]
        return len(posted) >= n and posted[:n]

    return wait_for(found, what=f"{n} message(s) in {channel}/{ts}")


def shown(message) -> str:
    """Everything a user sees of a message: its text and all its blocks' texts."""
    return json.dumps(message.current, ensure_ascii=False)


def section_text(message) -> str:
    return "\n".join(b["text"]["text"] for b in message.current["blocks"] if b["type"] == "section")


def thread(channel: str, ts: str, user: str) -> str:
    return f"slack:{TEAM}:{channel}:{ts}:{user}"


# --- the endpoint ------------------------------------------------------------------------------------

def test_only_signed_fresh_requests_get_through(sender, slack):
    event = {"type": "message", "channel_type": "im", "user": ALICE, "text": "hi", "channel": DM}
    assert sender.event(event, secret="not-the-secret").status_code == 401
    assert sender.event(event, timestamp=int(time.time()) - 600).status_code == 401     # a replayed old request
    challenge = sender.post(json.dumps({"type": "url_verification", "challenge": "c-123", "token": "x"}),
                            "application/json")
    assert challenge.status_code == 200 and "c-123" in challenge.text
    time.sleep(0.3)
    assert slack.posts() == [] and "chat.postMessage" not in slack.methods()


def test_a_mention_is_answered_in_its_thread_with_the_trace_and_the_plot(sender, slack):
    response, event = sender.mention(ALICE, "how similar are 'king' and 'queen' and 'apple'?")
    assert response.status_code == 200
    [message] = answers(slack, CHANNEL, event["ts"])
    blocks = message.current["blocks"]
    assert blocks[0]["type"] == "context" and "› _plan_" in blocks[0]["elements"][0]["text"]
    assert "embedding_distance" in blocks[0]["elements"][0]["text"]
    assert "cosine" in section_text(message) and "queen" in section_text(message)
    [plot] = wait_for(lambda: slack.files_in(CHANNEL, event["ts"]), what="the PCA plot")
    assert plot["name"].endswith(".png") and plot["data"].startswith(b"\x89PNG") and "PCA" in plot["title"]
    methods = slack.methods()
    assert methods.index("files.getUploadURLExternal") < methods.index("files.completeUploadExternal")


def test_a_dm_thread_is_one_conversation(sender, slack, agent):
    _, first = sender.dm(ALICE, "hi")
    [hello] = answers(slack, DM, first["ts"])
    assert "fine-tune" in section_text(hello)
    _, second = sender.dm(ALICE, "how similar are 'cat' and 'dog'?", thread_ts=first["ts"])
    answers(slack, DM, first["ts"], 2)
    said = [m["content"] for m in agent.history(thread(DM, first["ts"], ALICE), user_id=f"slack:{TEAM}:{ALICE}")
            if m["role"] == "user"]
    assert said == ["hi", "how similar are 'cat' and 'dog'?"]


def test_hostile_text_cannot_ping_link_or_break_the_markup(sender, slack):
    # What Slack delivers when someone types: how similar are '<!channel> & @here' and '<https://evil.example|x>'?
    raw = "how similar are '&lt;!channel&gt; &amp; <!here>' and '&lt;https://evil.example|click&gt; *bold*'?"
    _, event = sender.dm(BOB, raw)
    [message] = answers(slack, DM, event["ts"])
    everything = shown(message)
    assert "<!" not in everything and "<http" not in everything and "<@" not in everything
    assert "&lt;!channel&gt;" in everything and "&amp;" in everything
    assert "@\u2060here" in everything and "@here" not in everything.replace("@\u2060here", "")
    route = message.current["blocks"][0]["elements"][0]["text"]      # the trace echoes the texts too: escaped
    assert "&lt;https://evil.example|click&gt;" in route


def test_a_repeated_delivery_is_answered_once(sender, slack):
    event = {"type": "message", "channel_type": "im", "user": ALICE, "text": "hi", "channel": DM,
             "ts": sender.next_ts()}
    assert sender.event(event, envelope={"event_id": "EvSAME"}).status_code == 200
    assert sender.event(event, envelope={"event_id": "EvSAME"}, retry_num=1).status_code == 200
    mention = dict(event, type="app_mention", text=f"<@{BOT_USER}> hi")        # the same DM, as a mention too
    assert sender.event(mention).status_code == 200
    answers(slack, DM, event["ts"])
    time.sleep(0.5)
    assert len(slack.posts(DM, event["ts"])) == 1


# --- commands ---------------------------------------------------------------------------------------

def test_commands_help_new_jobs_memory(sender, slack, agent):
    _, root = sender.dm(ALICE, "help")
    [help_] = answers(slack, DM, root["ts"])
    assert "`cancel ft-3`" in section_text(help_) and "*Commands*" in section_text(help_)

    sender.dm(ALICE, "how similar are 'a b' and 'c d'?", thread_ts=root["ts"])
    answers(slack, DM, root["ts"], 2)
    key, uid = thread(DM, root["ts"], ALICE), f"slack:{TEAM}:{ALICE}"
    assert len(agent.history(key, user_id=uid)) == 2
    sender.dm(ALICE, "new", thread_ts=root["ts"])
    [*_, fresh] = answers(slack, DM, root["ts"], 3)
    assert "fresh conversation" in section_text(fresh)
    sender.dm(ALICE, "hi", thread_ts=root["ts"])
    answers(slack, DM, root["ts"], 4)
    renewed = C.ThreadBook(Path(agent.settings.home) / "slack" / "threads.json").get(key)
    assert renewed.startswith(key + "~")
    assert [m["content"] for m in agent.history(renewed, user_id=uid) if m["role"] == "user"] == ["hi"]
    assert len(agent.history(key, user_id=uid)) == 2                  # the old conversation is kept

    sender.dm(ALICE, "jobs", thread_ts=root["ts"])
    assert "no fine-tune jobs yet" in section_text(answers(slack, DM, root["ts"], 5)[-1])
    _, admin = sender.dm(ADMIN, "cancel ft-999")
    assert "ft-999" in section_text(answers(slack, DM, admin["ts"])[0])      # no such job: said, not crashed


def test_memory_is_per_user(sender, slack, agent):
    if C.memory_action(agent, "show") is None:           # the memory feature is not in this Agent yet: say so
        _, event = sender.dm(ALICE, "memory")
        assert section_text(answers(slack, DM, event["ts"])[0]) == R.escape(C.MEMORY_NOT_YET["en"])
        return
    _, event = sender.dm(ALICE, "my GPU has 24 GB")
    answers(slack, DM, event["ts"])
    sender.dm(BOB, "memory", channel="D0BOB", thread_ts=event["ts"])
    sender.dm(ALICE, "memory", thread_ts=event["ts"])
    assert "24" in section_text(answers(slack, DM, event["ts"], 2)[1])
    assert "don't remember anything" in section_text(answers(slack, "D0BOB", event["ts"])[0])
    sender.dm(ALICE, "forget", thread_ts=event["ts"])
    assert "Forgotten: 1" in section_text(answers(slack, DM, event["ts"], 3)[2])
    assert agent.memory_show(f"slack:{TEAM}:{ALICE}") == []


# --- files in ---------------------------------------------------------------------------------------

def test_uploads_are_saved_per_user_and_size_and_kind_limited(sender, slack, agent):
    csv = b"age,income,churn\n" + b"".join(f"{20 + i % 50},{(i * 37) % 100},{int(i % 50 > 25)}\n".encode()
                                            for i in range(120))
    shared = slack.add_private_file("churn.csv", csv, user=ALICE)
    _, event = sender.dm(ALICE, "", files=[shared])
    [saved] = answers(slack, DM, event["ts"])
    assert "Saved `churn.csv`" in section_text(saved)
    alice_dir = C.uploads_dir(agent, f"slack:{TEAM}:{ALICE}")
    assert (alice_dir / "churn.csv").read_bytes() == csv
    assert slack.downloads and all(d["authorized"] for d in slack.downloads)

    slack.downloads.clear()
    big = slack.add_private_file("big.jsonl", b"x" * (UPLOAD_LIMIT + 1), "application/json", user=ALICE)
    lying = dict(slack.add_private_file("lying.jsonl", b"y" * (UPLOAD_LIMIT + 10), user=ALICE), size=10)
    binary = slack.add_private_file("tool.exe", b"MZ...", "application/octet-stream", user=ALICE)
    elsewhere = dict(slack.add_private_file("notes.md", b"# hi", user=ALICE),
                     url_private_download=f"http://127.0.0.2:{slack.port}/files-pri/x/notes.md")
    login_page = slack.add_private_file("page.md", b"<html>Sign in</html>", "text/html", user=ALICE)
    _, event = sender.dm(ALICE, "", files=[big, lying, binary, elsewhere, login_page])
    refusals = [section_text(m) for m in answers(slack, DM, event["ts"], 5)]
    assert "big.jsonl" in refusals[0] and "limit" in refusals[0]
    assert "lying.jsonl" in refusals[1] and "larger than the limit" in refusals[1]
    assert "tool.exe" in refusals[2] and "CSV" in refusals[2]
    assert "notes.md" in refusals[3] and "not one of Slack's" in refusals[3]       # the token goes to Slack only
    assert "page.md" in refusals[4] and "files:read" in refusals[4]
    fetched = [d["path"].rsplit("/", 1)[1] for d in slack.downloads]
    assert fetched == ["lying.jsonl", "page.md"]                                    # the others never fetched
    assert sorted(p.name for p in alice_dir.iterdir()) == ["churn.csv"]

    # Later, Alice refers to it by name: a SHAP report, its plots and report file come back into the thread.
    _, event = sender.dm(ALICE, "which features drive churn in churn.csv?")
    [report] = answers(slack, DM, event["ts"])
    assert "income" in section_text(report) and "age" in section_text(report)
    files = wait_for(lambda: slack.files_in(DM, event["ts"]), what="the SHAP plots")
    assert any(f["data"].startswith(b"\x89PNG") for f in files)
    # For Bob the name means nothing: the file is Alice's.
    _, event = sender.dm(BOB, "which features drive churn in churn.csv?")
    [reply] = answers(slack, DM, event["ts"])
    assert not C.uploads_dir(agent, f"slack:{TEAM}:{BOB}").exists()
    assert "can't find 'churn.csv'" in section_text(reply)


# --- confirmations and notifications -------------------------------------------------------------------

def confirmation(slack: FakeSlack, channel: str, ts: str):
    return wait_for(lambda: next((m for m in slack.posts(channel, ts)
                                  if any(b["type"] == "actions" for b in m.current["blocks"])), None),
                    what="the confirmation buttons")


def test_launch_by_button_only_by_its_asker_then_announced_in_its_thread(sender, slack, agent):
    _, event = sender.mention(ADMIN, LAUNCH)
    question = confirmation(slack, CHANNEL, event["ts"])
    buttons = next(b for b in question.current["blocks"] if b["type"] == "actions")["elements"]
    assert [b["text"]["text"] for b in buttons] == ["🚀 Launch", "✖ Cancel"]
    assert "data.jsonl" in section_text(question)

    assert sender.action(BOB, question, R.APPROVE).status_code == 200        # not Bob's to press
    refusal = wait_for(lambda: slack.ephemerals, what="the refusal")[0]
    assert refusal["user"] == BOB and f"<@{ADMIN}>" in refusal["text"]
    assert agent.jobs().list(f"slack:{TEAM}:{ADMIN}") == []

    assert sender.action(ADMIN, question, R.APPROVE).status_code == 200
    wait_for(lambda: question.edits, what="the buttons to go")
    assert not any(b["type"] == "actions" for b in question.current["blocks"])
    assert f"approved by <@{ADMIN}>" in shown(question)
    launched = answers(slack, CHANNEL, event["ts"], 2)[1]
    [job] = agent.jobs().list(f"slack:{TEAM}:{ADMIN}")
    assert job["id"] in section_text(launched) and job["status"] == "queued"
    origin = agent.jobs().store.get(job["id"], owner=f"slack:{TEAM}:{ADMIN}").origin
    assert slack_thread_of(origin["thread_id"]) == (CHANNEL, event["ts"])

    sender.action(ADMIN, question, R.APPROVE)                                 # pressed twice: nothing more
    wait_for(lambda: len(slack.ephemerals) == 2, what="the second refusal")
    assert "no longer waiting" in slack.ephemerals[1]["text"]

    # From a DM, the admin lists and cancels the job; its end is announced in the launching thread.
    _, dm = sender.dm(ADMIN, "jobs")
    assert f"`{job['id']}` *queued*" in section_text(answers(slack, DM, dm["ts"])[0])
    sender.dm(ADMIN, f"cancel {job['id']}", thread_ts=dm["ts"])
    assert "*cancelled*" in section_text(answers(slack, DM, dm["ts"], 2)[1])
    notice = answers(slack, CHANNEL, event["ts"], 3)[2]
    assert section_text(notice).startswith("🔔 Fine-tune cancelled") and job["id"] in section_text(notice)
    assert len(slack.posts(DM, dm["ts"])) == 2                                # announced once, and only there


def test_a_confirmation_answered_in_words_loses_its_buttons(sender, slack, agent):
    before = agent.jobs().list(f"slack:{TEAM}:{ADMIN}")
    _, event = sender.dm(ADMIN, LAUNCH)
    question = confirmation(slack, DM, event["ts"])
    sender.dm(ADMIN, "no", thread_ts=event["ts"])
    declined = answers(slack, DM, event["ts"], 2)[1]
    assert "I did not run launch_finetune" in section_text(declined)
    assert not any(b["type"] == "actions" for b in question.current["blocks"])
    assert "answered in this thread" in shown(question)
    assert agent.jobs().list(f"slack:{TEAM}:{ADMIN}") == before
    sender.action(ADMIN, question, R.APPROVE)                                 # a stale button does nothing
    assert "no longer waiting" in wait_for(lambda: slack.ephemerals, what="the refusal")[0]["text"]


def test_a_non_admin_cannot_launch_or_cancel(sender, slack, agent):
    _, event = sender.mention(BOB, LAUNCH)
    [reply] = answers(slack, CHANNEL, event["ts"])
    assert "Only this bot's admins" in section_text(reply)
    assert not any(b["type"] == "actions" for b in reply.current["blocks"])
    assert agent.jobs().list(f"slack:{TEAM}:{BOB}") == []
    sender.mention(BOB, "cancel ft-1", thread_ts=event["ts"])
    assert "Only this bot's admins" in section_text(answers(slack, CHANNEL, event["ts"], 2)[1])


def test_a_bare_mention_gets_the_help(sender, slack):
    response, event = sender.mention(BOB, "")
    assert "`jobs`" in section_text(answers(slack, CHANNEL, event["ts"])[0])


def test_strangers_are_refused_quietly(sender, slack, agent):
    _, event = sender.mention(EVE, "hi")
    [refusal] = wait_for(lambda: slack.ephemerals, what="the refusal")
    assert refusal["user"] == EVE and "private" in refusal["text"]
    time.sleep(0.3)
    assert slack.posts() == []
    assert agent.history(thread(CHANNEL, event["ts"], EVE), user_id=f"slack:{TEAM}:{EVE}") == []


# --- two users, one thread at a time, speed, failures ---------------------------------------------------

def test_two_users_interleaved_stay_apart(sender, slack, agent):
    _, root = sender.mention(ALICE, "how similar are 'alpha' and 'beta'?")
    sender.mention(BOB, "how similar are 'gamma' and 'delta'?", thread_ts=root["ts"])   # same Slack thread
    sender.mention(ALICE, "hi", thread_ts=root["ts"])
    sender.dm(BOB, "hi", channel="D0BOB")
    answers(slack, CHANNEL, root["ts"], 3)
    said = {user: [m["content"] for m in agent.history(thread(CHANNEL, root["ts"], user),
                                                       user_id=f"slack:{TEAM}:{user}") if m["role"] == "user"]
            for user in (ALICE, BOB)}
    assert said == {ALICE: ["how similar are 'alpha' and 'beta'?", "hi"],
                    BOB: ["how similar are 'gamma' and 'delta'?"]}
    # Bob cannot read Alice's thread by its id: for him it is empty.
    assert agent.history(thread(CHANNEL, root["ts"], ALICE), user_id=f"slack:{TEAM}:{BOB}") == []
    texts = [section_text(m) for m in slack.posts(CHANNEL, root["ts"])]
    assert "alpha" in texts[0] and "gamma" in texts[1] and "alpha" not in texts[1]


def everything_shown_to(slack: FakeSlack, user: str, channel: str) -> str:
    """All the bot showed ``user`` in ``channel`` (their DM): every post with its edits (progress messages and
    deleted ones included), the files uploaded there, and every ephemeral message to ``user`` anywhere."""
    posts = [{"text": m.text, "blocks": m.blocks, "edits": m.edits} for m in slack.posts(channel, deleted=True)]
    files = [{k: f[k] for k in ("name", "title")} | {"data": (f["data"] or b"").decode("utf-8", "replace")}
             for f in list(slack.uploads.values()) if f["channel"] == channel]
    whispers = [e for e in slack.ephemerals if e["user"] == user]
    return json.dumps([posts, files, whispers], ensure_ascii=False)


def test_isolation_two_users_share_nothing(sender, slack, bot, agent):
    """Issue 9 on Slack: nothing of alice's — fact, upload, report, job, confirmation — reaches bob, through a
    command, a button or the agent ("what did the other user ask?"); the same commands do show alice her own."""
    alice, bob, alice_dm, bob_dm = "UALICE2", "UBOB2", "D0ALICE2", "D0BOB2"
    uid = f"slack:{TEAM}:{alice}"
    secrets = ("SLACK-ALICE-6629", "support_calls", "tenure", f"{TEAM}:{alice}", f"{TEAM}%3A{alice}")

    def leaks(text: str, *more: str) -> list[str]:
        return [s for s in (*secrets, *more) if s.lower() in text.lower()]

    def dm(user: str, channel: str, text: str, **kw) -> tuple[str, str]:
        """``user`` DMs ``text`` (a new DM thread); the bot's answer and the thread's ts."""
        _, event = sender.dm(user, text, channel=channel, **kw)
        return section_text(answers(slack, channel, event["ts"])[0]), event["ts"]

    # No admins: every allowed user may launch and cancel fine-tunes, so only ownership keeps bob from hers.
    saved_access, bot.access = bot.access, C.AccessList(frozenset({alice, bob}), frozenset())
    try:
        # --- alice: a fact, an upload, a SHAP report on it, a launched fine-tune -----------------------------
        dm(alice, alice_dm, "remember that my locker code is SLACK-ALICE-6629")
        assert "my locker code is SLACK-ALICE-6629" in {f["said"] for f in agent.memory_show(uid)}
        shared = slack.add_private_file("alice_churn.csv", churn_csv().encode(), user=alice)
        assert "Saved `alice_churn.csv`" in dm(alice, alice_dm, "", files=[shared])[0]
        report, ts = dm(alice, alice_dm, "explain churn in alice_churn.csv")
        assert "support_calls" in report
        wait_for(lambda: [f for f in slack.files_in(alice_dm, ts) if f["name"].endswith((".md", ".html"))],
                 what="alice's SHAP report file")
        _, launch = sender.mention(alice, LAUNCH)                       # in a channel bob is in: he sees the buttons
        question = confirmation(slack, CHANNEL, launch["ts"])

        def bob_presses(action: str) -> dict:
            seen = len(slack.ephemerals)
            assert sender.action(bob, question, action).status_code == 200
            return wait_for(lambda: slack.ephemerals[seen:], what="bob's refusal")[0]

        for action in (R.DECLINE, R.APPROVE):                            # her current confirmation
            refusal = bob_presses(action)
            assert refusal["user"] == bob and f"Only <@{alice}> can answer" in refusal["text"]
        time.sleep(0.3)
        assert agent.jobs().list(uid) == [] and not question.edits       # still hers to answer
        sender.action(alice, question, R.APPROVE)
        launched = section_text(answers(slack, CHANNEL, launch["ts"], 2)[1])
        [job] = agent.jobs().list(uid)
        assert job["id"] in launched and job["status"] == "queued"
        assert f"Only <@{alice}> can answer" in bob_presses(R.APPROVE)["text"]     # her answered (stale) one
        time.sleep(0.3)
        assert len(agent.jobs().list(uid)) == 1 and agent.jobs().list(f"slack:{TEAM}:{bob}") == []

        # --- bob, in his DM: commands, the agent, her file ------------------------------------------------
        memory = dm(bob, bob_dm, "memory")[0]
        assert "don't remember anything" in memory and not leaks(memory)
        jobs = dm(bob, bob_dm, "jobs")[0]
        assert "no fine-tune jobs" in jobs and job["id"] not in jobs
        cancel, missing = dm(bob, bob_dm, f"cancel {job['id']}")[0], dm(bob, bob_dm, "cancel ft-999999")[0]
        assert cancel == missing.replace("ft-999999", job["id"])          # hers reads exactly like no job at all
        assert "no job" in cancel.lower() and agent.jobs().list(uid)[0]["status"] == "queued"
        for text in ("what did the other user ask?", "what do you remember about me?"):
            answer = dm(bob, bob_dm, text)[0]
            assert not leaks(answer, "alice_churn", "locker", job["id"]), (text, answer)
        theirs, ts = dm(bob, bob_dm, "explain churn in alice_churn.csv")
        assert "can't find 'alice_churn.csv'" in theirs and not leaks(theirs)      # not found, no columns
        time.sleep(0.3)
        assert slack.files_in(bob_dm) == []
        assert not (C.uploads_dir(agent, f"slack:{TEAM}:{bob}") / "alice_churn.csv").exists()

        # --- alice, on the same channel, still has all of hers --------------------------------------------
        assert "SLACK-ALICE-6629" in dm(alice, alice_dm, "memory")[0]
        assert f"`{job['id']}` *queued*" in dm(alice, alice_dm, "jobs")[0]
        assert "*cancelled*" in dm(alice, alice_dm, f"cancel {job['id']}")[0]
        notice = section_text(answers(slack, CHANNEL, launch["ts"], 3)[2])   # announced where she launched it
        assert notice.startswith("🔔") and job["id"] in notice
    finally:
        bot.access = saved_access
    shown_to_bob = everything_shown_to(slack, bob, bob_dm)
    assert shown_to_bob and not leaks(shown_to_bob), leaks(shown_to_bob)
    assert "🔔" not in shown_to_bob                                      # her job's end is announced to her only


class Gated:
    """The real Agent, but a turn whose text says "slow" waits for ``release``, and "explode" raises."""

    def __init__(self, agent: Agent):
        self.agent, self.release, self.started, self.running, self.most = agent, threading.Event(), [], 0, 0

    def __getattr__(self, name: str):
        return getattr(self.agent, name)

    def stream(self, text: str, **kw):
        self.started.append(text)
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            if "explode" in text:
                raise RuntimeError("the brain fell over")
            if "slow" in text:
                assert self.release.wait(30)
            yield from self.agent.stream(text, **kw)
        finally:
            self.running -= 1


@pytest.fixture
def gated(bot):
    real = bot.agent
    bot.agent = Gated(real)
    yield bot.agent
    bot.agent.release.set()
    bot.agent = real


def test_acks_are_fast_and_a_thread_runs_one_turn_at_a_time(sender, slack, gated):
    _, first = sender.dm(ALICE, "how similar are 'slow' and 'fast'?")
    wait_for(lambda: gated.started, what="the slow turn to start")
    t0 = time.monotonic()
    response, _ = sender.dm(ALICE, "hi", thread_ts=first["ts"])              # same thread: must wait
    other, _ = sender.dm(BOB, "hi")                                          # another thread
    assert response.status_code == other.status_code == 200 and time.monotonic() - t0 < 3
    progress = wait_for(lambda: slack.posts(DM, first["ts"]), what="the progress message")[0]
    assert "working on it" in progress.current["text"]
    time.sleep(0.3)
    assert gated.started == ["how similar are 'slow' and 'fast'?"]           # nothing overtook the slow turn
    gated.release.set()
    first_answer, second_answer = answers(slack, DM, first["ts"], 2)
    assert "slow" in section_text(first_answer) and "fine-tune" in section_text(second_answer)
    assert progress.deleted and gated.most == 1
    assert gated.started[1] == "hi"


def test_a_failing_turn_is_apologised_for_and_the_bot_goes_on(sender, slack, gated):
    _, event = sender.dm(ALICE, "explode please")
    [sorry] = answers(slack, DM, event["ts"])
    assert section_text(sorry) == R.escape(C.APOLOGY["en"])
    sender.dm(ALICE, "hi", thread_ts=event["ts"])
    assert "fine-tune" in section_text(answers(slack, DM, event["ts"], 2)[1])


def test_a_rate_limited_post_still_arrives(sender, slack):
    slack.rate_limit("chat.postMessage", times=1, retry_after=1)
    _, event = sender.dm(ALICE, "hi")
    [hello] = answers(slack, DM, event["ts"], 1)
    assert "fine-tune" in section_text(hello)
    posts = [c.status for c in slack.calls if c.method == "chat.postMessage"]
    assert posts[:2] == [429, 200]

    # Longer than the client's own retries (3): the bot waits the Retry-After again and still delivers.
    slack.calls.clear()
    slack.rate_limit("chat.postMessage", times=5, retry_after=0)
    _, event = sender.dm(ALICE, "hi")
    answers(slack, DM, event["ts"], 1)
    assert [c.status for c in slack.calls if c.method == "chat.postMessage"] == [429] * 5 + [200]


# --- rendering and configuration (no server) --------------------------------------------------------------

def test_long_answers_split_into_sections_with_code_blocks_kept_whole():
    code = "```\n" + "\n".join(f"line {i} <tag> & more" for i in range(400)) + "\n```"
    text = "Intro **bold** & <b>.\n\n" + code + "\n\nThe end."
    chunks = R.answer_chunks(text)
    assert len(chunks) > 1 and all(len(c) <= R.SECTION_LIMIT for c in chunks)
    assert all(c.count("```") % 2 == 0 for c in chunks)
    assert chunks[0].startswith("Intro *bold* &amp; &lt;b&gt;.") and chunks[-1].endswith("The end.")
    joined = "\n".join(chunks)
    assert all(f"line {i} &lt;tag&gt; &amp; more" in joined for i in range(400))


def test_a_reply_renders_trace_sources_and_buttons():
    reply = Reply.model_validate({
        "thread_id": "t", "answer": "# LoRA\n**Low-rank** adapters",
        "steps": [{"kind": "plan", "text": "Understand <it>"}, {"kind": "answer", "text": "Write."}],
        "citations": [{"id": "kb:lora#1", "title": "LoRA", "source": "<!channel> cards/lora.yaml"}],
        "pending": {"id": "p1", "tool": "launch_finetune", "args": {}, "preview": "Launch"}})
    [message] = R.render_reply(C.reply_parts(reply), user=ALICE, root_ts="1.2", buttons=True)
    kinds = [b["type"] for b in message.blocks]
    assert kinds == ["context", "section", "context", "actions"]
    assert message.blocks[1]["text"]["text"] == "*LoRA*\n*Low-rank* adapters"
    assert "&lt;it&gt;" in message.blocks[0]["elements"][0]["text"]
    assert "`kb:lora#1`" in message.blocks[2]["elements"][0]["text"] and "<!" not in json.dumps(message.blocks)
    assert json.loads(message.blocks[3]["elements"][0]["value"]) == {"u": ALICE, "p": "p1", "r": "1.2"}
    assert R.from_slack(f"<@{BOT_USER}> read <http://notes.md|notes.md> &lt;3") == f"@{BOT_USER} read notes.md <3"


def test_configuration_comes_from_the_environment():
    from agent.settings import SettingsError

    with pytest.raises(SettingsError, match="SLACK_BOT_TOKEN"):
        SlackConfig.from_env({"SLACK_SIGNING_SECRET": "s"})
    with pytest.raises(SettingsError, match="SLACK_SIGNING_SECRET"):
        SlackConfig.from_env({"SLACK_BOT_TOKEN": "xoxb-1"})
    with pytest.raises(SettingsError, match="xapp"):
        SlackConfig.from_env({"SLACK_BOT_TOKEN": "xoxb-1", "SLACK_APP_TOKEN": "xoxb-2"})
    with pytest.raises(SettingsError, match="STACKWISE_SLACK_ADMINS"):
        SlackConfig.from_env({"SLACK_BOT_TOKEN": "xoxb-1", "SLACK_SIGNING_SECRET": "s",
                              "STACKWISE_SLACK_ADMINS": "a;b"})
    socket_mode = SlackConfig.from_env({"SLACK_BOT_TOKEN": "xoxb-secret", "SLACK_APP_TOKEN": "xapp-secret"})
    assert socket_mode.socket_mode and "secret" not in repr(socket_mode)
    http = SlackConfig.from_env({"SLACK_BOT_TOKEN": "xoxb-1", "SLACK_SIGNING_SECRET": "s",
                                 "STACKWISE_SLACK_API_URL": "http://127.0.0.1:9/api"})
    assert not http.socket_mode and http.api_url == "http://127.0.0.1:9/api/" and http.access.allows("anyone")


def test_the_command_line_names_a_missing_setting(monkeypatch, capsys):
    from bots.cli import main

    for name in ("SLACK_BOT_TOKEN", "SLACK_SIGNING_SECRET", "SLACK_APP_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    assert main(["slack"]) == 1
    assert "SLACK_BOT_TOKEN" in capsys.readouterr().err
