"""The chat bots' shared core (``bots/channel.py``): access lists, the thread book, the turn queue, uploads,
replies in pieces, splitting, throttled progress and delivery, job announcements, apologies."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from types import SimpleNamespace

import pytest

from agent.reply import Reply
from agent.settings import SettingsError
from bots import channel as C


def run(coro):
    return asyncio.run(coro)


# --- access and threads ----------------------------------------------------------------------------
def test_access_lists_from_environment_strings():
    access = C.AccessList.from_env("ALLOWED", "ADMINS", {"ALLOWED": " 42,7\n 99 ", "ADMINS": "1"})
    assert access.allowed == {"42", "7", "99"} and access.allows("7") and access.allows(7)
    assert not access.allows("8") and access.allows("1") and access.is_admin("1") and not access.is_admin("42")
    assert C.AccessList.from_env("A", "B", {}).allows("anyone")
    with pytest.raises(SettingsError, match="ADMINS: '1;2'"):
        C.AccessList.from_env("ALLOWED", "ADMINS", {"ADMINS": "1;2"})


def test_the_thread_book_renews_threads_and_remembers_them_across_restarts(tmp_path):
    book = C.ThreadBook(tmp_path / "tg" / "threads.json")
    assert book.get("tg:1") == "tg:1"
    fresh = book.renew("tg:1")
    assert fresh.startswith("tg:1~") and book.get("tg:1") == fresh and book.get("tg:2") == "tg:2"
    assert C.ThreadBook(tmp_path / "tg" / "threads.json").get("tg:1") == fresh
    (tmp_path / "bad.json").write_text("{not json")
    assert C.ThreadBook(tmp_path / "bad.json").get("tg:1") == "tg:1"       # a damaged file: defaults, not a crash


# --- turns -----------------------------------------------------------------------------------------
class StubAgent:
    """Streams a few steps with pauses; records when each turn starts and ends."""

    def __init__(self, delay: float = 0.05, fail_on: str | None = None):
        self.delay, self.fail_on, self.log, self.lock = delay, fail_on, [], threading.Lock()

    def stream(self, text, *, thread_id, user_id, approve=None):
        with self.lock:
            self.log.append(("start", thread_id, text))
        for kind in ("plan", "route", "answer"):
            time.sleep(self.delay)
            if text == self.fail_on:
                raise ValueError("stub failure")
            yield {"type": "step", "kind": kind, "text": f"{kind} {text}"}
        with self.lock:
            self.log.append(("end", thread_id, text))
        yield {"type": "reply", "reply": Reply(thread_id=thread_id, answer=f"re: {text}")}


def test_turns_of_one_thread_never_interleave_and_keep_their_order():
    agent = StubAgent(0.02)
    queue = C.TurnQueue(concurrency=4)

    async def main():
        jobs = [queue.stream(agent, f"m{i}", thread_id="t1", user_id="u") for i in range(4)]
        jobs += [queue.stream(agent, f"n{i}", thread_id="t2", user_id="v") for i in range(2)]
        return await asyncio.gather(*jobs)

    replies = run(main())
    assert [r.answer for r in replies] == ["re: m0", "re: m1", "re: m2", "re: m3", "re: n0", "re: n1"]
    t1 = [(e, t) for e, th, t in agent.log if th == "t1"]
    assert t1 == [(e, f"m{i}") for i in range(4) for e in ("start", "end")]
    first_t2 = next(i for i, e in enumerate(agent.log) if e[1] == "t2")
    assert first_t2 < agent.log.index(("end", "t1", "m0")) + 2     # other threads run alongside
    queue.close()


def test_the_loop_keeps_running_while_the_agent_works_and_events_arrive_as_they_happen():
    agent, queue = StubAgent(0.1), C.TurnQueue()
    ticks, seen = [], []

    async def ticker(stop):
        while not stop.is_set():
            ticks.append(time.monotonic())
            await asyncio.sleep(0.01)

    async def on_event(event):
        seen.append((time.monotonic(), event["kind"]))
        if event["kind"] == "route":
            raise RuntimeError("a progress display failing")            # logged, never fatal

    async def main():
        stop = asyncio.Event()
        tick = asyncio.create_task(ticker(stop))
        t0 = time.monotonic()
        reply = await queue.stream(agent, "hi", thread_id="t", user_id="u", on_event=on_event)
        stop.set()
        await tick
        return t0, reply

    t0, reply = run(main())
    assert reply.answer == "re: hi" and [k for _, k in seen] == ["plan", "route", "answer"]
    assert seen[0][0] - t0 < 0.25                                       # streamed, not after the turn
    assert len(ticks) > 15                                              # 0.3 s of work, the loop never stalled
    queue.close()


def test_a_failing_turn_raises_in_the_loop_and_the_thread_is_free_again():
    agent, queue = StubAgent(0.01, fail_on="bad"), C.TurnQueue()

    async def main():
        with pytest.raises(ValueError, match="stub failure"):
            await queue.stream(agent, "bad", thread_id="t", user_id="u")
        assert queue.waiting("t") == 0
        assert await queue.call("t", lambda a, b=0: a + b, 2, b=3) == 5
        return await queue.stream(agent, "good", thread_id="t", user_id="u")

    assert run(main()).answer == "re: good"
    queue.close()


# --- uploads and replies ----------------------------------------------------------------------------
def test_uploads_are_saved_sanitised_and_size_limited(tmp_path):
    agent = SimpleNamespace(toolbox=SimpleNamespace(context=lambda user: SimpleNamespace(
        uploads_dir=tmp_path / "uploads" / user)))
    saved = C.save_user_upload(agent, "u1", "../../etc/churn.csv", b"a,b\n1,2\n", limit=100)
    assert saved.name == "churn.csv" and saved.path == tmp_path / "uploads" / "u1" / "churn.csv"
    assert saved.path.read_bytes() == b"a,b\n1,2\n" and saved.bytes == 8 and not saved.ingestable
    assert C.save_user_upload(agent, "u1", "Notes.MD", b"# hi", limit=100).ingestable
    with pytest.raises(C.UploadError, match="limit of 10 bytes") as too_big:
        C.save_user_upload(agent, "u1", "big.jsonl", b"x" * 11, limit=10)
    assert too_big.value.type == "too_large" and not (tmp_path / "uploads" / "u1" / "big.jsonl").exists()
    with pytest.raises(C.UploadError, match="'run.sh' is not one of them"):
        C.save_user_upload(agent, "u1", "run.sh", b"x", limit=10)
    with pytest.raises(C.UploadError, match="empty"):
        C.save_user_upload(agent, "u1", "empty.csv", b"", limit=10)
    assert sorted(p.name for p in (tmp_path / "uploads" / "u1").iterdir()) == ["Notes.MD", "churn.csv"]


def test_reply_parts_split_attachments_into_images_and_documents(tmp_path):
    (tmp_path / "bar.png").write_bytes(b"\x89PNG")
    (tmp_path / "report.html").write_text("<html>")
    reply = Reply(thread_id="t", answer="a", attachments=[
        {"kind": "image", "path": str(tmp_path / "bar.png"), "caption": "bar"},
        {"kind": "file", "path": str(tmp_path / "report.html")},
        {"kind": "image", "path": str(tmp_path / "gone.png")}],
        pending={"id": "confirm-1", "tool": "launch_finetune", "args": {}, "preview": "p"})
    parts = C.reply_parts(reply)
    assert [a.caption for a in parts.images] == ["bar"] and [a.path for a in parts.documents] == [
        str(tmp_path / "report.html")]
    assert parts.pending.id == "confirm-1" and parts.answer == "a"


# --- splitting -------------------------------------------------------------------------------------
@pytest.mark.parametrize("limit", [5, 40, 333, 4096])
def test_split_text_keeps_everything_under_the_limit_in_utf16(limit):
    text = "\n\n".join([
        "第一段：你好世界。这是一个测试，包含中文标点。" * 20,
        "😀 emoji 👩‍👩‍👧 family 🇨🇳 flag " * 30,
        "\n".join(f"line {i} — ünïcödé ✓" for i in range(60)),
        "x" * 5000])
    chunks = C.split_text(text, limit, C.utf16_len)
    assert all(0 < C.utf16_len(c) <= limit for c in chunks)
    squeeze = str.maketrans("", "", " \n")
    assert "".join(chunks).translate(squeeze) == text.translate(squeeze)   # only whitespace at cuts is dropped


def test_split_text_prefers_paragraphs_then_lines_then_sentences():
    assert C.split_text("one\n\ntwo three", 9) == ["one", "two three"]
    assert C.split_text("alpha\nbeta gamma\ndelta", 12) == ["alpha", "beta gamma", "delta"]
    assert C.split_text("这是第一句。这是第二句。", 8) == ["这是第一句。", "这是第二句。"]
    assert C.split_text("a" * 10, 4) == ["aaaa", "aaaa", "aa"]
    assert C.split_text("   ", 4) == [] and C.utf16_len("😀a") == 3
    with pytest.raises(ValueError):
        C.split_text("x", 0)


# --- progress and delivery -------------------------------------------------------------------------
class Flood(Exception):
    def __init__(self, wait: float):
        super().__init__(f"retry after {wait}")
        self.wait = wait


def flood_delay(exc):
    return exc.wait if isinstance(exc, Flood) else None


class Chat:
    """Records what a ProgressMessage does; can refuse edits with flood control."""

    def __init__(self, refuse_edits: int = 0, wait: float = 0.3):
        self.calls, self.refuse, self.wait = [], refuse_edits, wait

    async def send(self, text):
        self.calls.append(("send", time.monotonic(), text))
        return 17

    async def edit(self, handle, text):
        if self.refuse:
            self.refuse -= 1
            self.calls.append(("refused", time.monotonic(), text))
            raise Flood(self.wait)
        self.calls.append(("edit", time.monotonic(), text))

    async def delete(self, handle):
        self.calls.append(("delete", time.monotonic(), handle))


def progress_run(chat: Chat, updates: int, every: float, *, interval=0.2, grace=0.05):
    async def main():
        throttle = C.EditThrottle(interval)
        live = C.ProgressMessage("c1", throttle, send=chat.send, edit=chat.edit, delete=chat.delete,
                                 retry_delay=flood_delay, grace=grace)
        for i in range(updates):
            live.update(f"step {i}")
            await asyncio.sleep(every)
        await live.close()
        return live

    return run(main())


def test_a_quick_turn_posts_no_progress_message():
    chat = Chat()
    progress_run(chat, 3, 0.001, grace=0.2)
    assert chat.calls == []


def test_progress_edits_are_throttled_and_show_the_latest_text():
    chat = Chat()
    live = progress_run(chat, 30, 0.02, interval=0.2)
    kinds = [c[0] for c in chat.calls]
    assert kinds[0] == "send" and kinds[-1] == "delete" and 0 < live.edits == kinds.count("edit")
    times = [c[1] for c in chat.calls if c[0] in ("send", "edit")]
    assert all(b - a >= 0.19 for a, b in zip(times, times[1:], strict=False))
    assert kinds.count("edit") <= 4                                        # 0.6 s of updates, one per 0.2 s


def test_an_edit_refused_by_flood_control_waits_its_retry_after():
    chat = Chat(refuse_edits=1, wait=0.4)
    progress_run(chat, 40, 0.02, interval=0.1)
    refused = next(c[1] for c in chat.calls if c[0] == "refused")
    after = [c[1] for c in chat.calls if c[0] == "edit" and c[1] > refused]
    assert after and after[0] - refused >= 0.39


def test_a_turn_ending_while_progress_is_being_posted_leaves_no_message_behind():
    class SlowChat(Chat):
        async def send(self, text):
            await asyncio.sleep(0.2)
            return await super().send(text)

    async def main():
        chat = SlowChat()
        live = C.ProgressMessage("c", C.EditThrottle(1.0), send=chat.send, edit=chat.edit, delete=chat.delete,
                                 retry_delay=flood_delay, grace=0.05)
        live.update("step 0")
        await asyncio.sleep(0.1)          # the post is on its way
        await live.close()
        return chat

    assert [c[0] for c in run(main()).calls] == ["send", "delete"]


def test_deliver_retries_flood_control_and_gives_up_on_other_errors():
    tries = []

    async def flaky():
        tries.append(time.monotonic())
        if len(tries) < 3:
            raise Flood(0.05)
        return "sent"

    assert run(C.deliver(flaky, flood_delay)) == "sent" and len(tries) == 3

    async def broken():
        raise KeyError("no")

    with pytest.raises(KeyError):
        run(C.deliver(broken, flood_delay))
    tries.clear()
    with pytest.raises(Flood):
        run(C.deliver(flaky, flood_delay, attempts=2))


# --- jobs, errors, memory --------------------------------------------------------------------------
def test_job_notices_from_the_watcher_thread_run_on_the_bots_loop():
    class Watching:
        def watch_jobs(self, callback, *, user_id=None, poll_s=5.0):
            thread = threading.Thread(target=callback, args=({"job_id": "ft-1", "text": "done"},))
            thread.start()
            return SimpleNamespace(stop=thread.join)

    async def main():
        got = asyncio.Event()
        seen = []

        async def announce(notice):
            seen.append((notice["job_id"], threading.current_thread() is threading.main_thread()))
            got.set()

        watcher = C.announce_jobs(Watching(), asyncio.get_running_loop(), announce)
        await asyncio.wait_for(got.wait(), 5)
        await asyncio.to_thread(watcher.stop)
        return seen

    assert run(main()) == [("ft-1", True)]


def test_error_text_tells_user_errors_and_apologises_for_bugs(caplog):
    from agent.facade import InputError
    from agent.jobs import JobsError

    assert C.error_text(JobsError("not_found", "No job ft-9.")) == "No job ft-9."
    assert C.error_text(InputError("empty_message", "The message is empty.")) == "The message is empty."
    assert C.error_text(C.UploadError("too_large", "Too big.")) == "Too big."
    with caplog.at_level(logging.ERROR, logger="stackwise.channel"):
        try:
            raise ZeroDivisionError("a bug")
        except ZeroDivisionError as exc:
            assert C.error_text(exc, lang="zh") == C.APOLOGY["zh"]
    assert "ZeroDivisionError: a bug" in caplog.records[-1].exc_text


def test_memory_actions_light_up_when_the_agent_has_them():
    assert C.memory_action(SimpleNamespace(), "show") is None
    agent = SimpleNamespace(memory_show=lambda user_id: [], memory_forget="not callable")
    assert C.memory_action(agent, "show") is agent.memory_show and C.memory_action(agent, "forget") is None
