"""``SlackBot``: what the Slack bot does with a mention, a DM, a button press or an ended fine-tune.

The transport (Bolt over HTTP or Socket Mode, ``bots/slack.py``) only acknowledges and hands each request to
:meth:`SlackBot.submit`; the work runs as a coroutine on the bot's own event loop (a thread), so Slack gets its
ack within milliseconds however long a turn takes. Turns of one thread run one after another (``TurnQueue``);
the Agent works in a worker thread; Web API calls run in threads too (``slack_sdk`` is blocking and sleeps
through a 429's ``Retry-After``).

One agent thread per Slack thread and user: ``slack:<team>:<channel>:<thread ts>:<user>`` (``new`` starts a fresh
one, kept in ``$STACKWISE_HOME/slack/threads.json``); users are ``slack:<team>:<user>``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Coroutine
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from bots import channel as C
from bots import slack_render as R
from bots.slack_commands import HELP, NEEDS_ADMIN, CommandsMixin, lang_of, say_text

log = logging.getLogger("stackwise.slack")
_THREAD = re.compile(r"^slack:([^:]+):([^:]+):([^:]+):([^:~]+)(?:~[0-9a-f]+)?$")


@dataclass(frozen=True)
class Where:
    """Where a request came from and its answer goes: a Slack thread, the user, their agent thread."""

    channel: str
    root_ts: str          # the thread's first message (answers go into its thread)
    user: str             # the Slack user id
    thread_id: str        # the agent thread
    lang: str = "en"


@dataclass(frozen=True)
class Waiting:
    """A confirmation shown with buttons: the pending id and tool, and the message that shows them."""

    id: str
    tool: str
    ts: str
    message: dict


def slack_thread_of(thread_id: str) -> tuple[str, str] | None:
    """(channel, thread ts) of an agent thread id: ``slack:T1:C1:1700.1:U1~ab12cd34`` → ``("C1", "1700.1")``."""
    m = _THREAD.match(thread_id or "")
    return (m.group(2), m.group(3)) if m else None


class SlackBot(CommandsMixin):
    """Mentions, DMs, buttons and job announcements on one ``Agent`` through one ``WebClient``."""

    def __init__(self, agent: Any, config: Any, client: Any, *, retry_delay: Any):
        self.agent, self.config, self.client, self.access = agent, config, client, config.access
        self.retry_delay = retry_delay
        self.turns = C.TurnQueue(1)
        self.book = C.ThreadBook(Path(agent.settings.home) / "slack" / "threads.json")
        self.throttle = C.EditThrottle(config.edit_interval)
        self.pending: dict[str, Waiting] = {}            # agent thread → the confirmation its buttons answer
        self.seen: OrderedDict[str, None] = OrderedDict()  # "channel:ts" of the messages already taken
        self._seen_lock = threading.Lock()                 # Bolt's listener threads take events concurrently
        self.team_id, self.bot_user = "", ""
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="stackwise-slack", daemon=True)
        self.watcher: Any = None

    # --- life cycle ------------------------------------------------------------------------------
    def start(self) -> None:
        """Learn who the bot is (``auth.test``), start the loop and the job announcements."""
        me = self.client.auth_test()
        self.team_id, self.bot_user = me["team_id"], me["user_id"]
        self._thread.start()
        self.watcher = C.announce_jobs(self.agent, self.loop, self.announce, poll_s=self.config.job_poll_s)

    def stop(self) -> None:
        """Stop announcing, cancel the work in flight, and close the loop."""
        if self.watcher is not None:
            self.watcher.stop()
            self.watcher = None
        if self._thread.is_alive():
            async def cancel_all() -> None:
                tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

            try:
                asyncio.run_coroutine_threadsafe(cancel_all(), self.loop).result(10)
            finally:
                self.loop.call_soon_threadsafe(self.loop.stop)
                self._thread.join(10)
        if not self._thread.is_alive() and not self.loop.is_closed():
            self.loop.close()
        self.turns.close()

    def submit(self, coro: Coroutine, where: str) -> Any:
        """Run ``coro`` on the bot's loop (from Bolt's listener threads); a failure is logged, never raised."""
        def done(future: Any) -> None:
            if not future.cancelled() and future.exception() is not None:
                log.error("%s failed", where, exc_info=future.exception())

        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        future.add_done_callback(done)
        return future

    def first_time(self, message: str) -> bool:
        """False for a message taken before."""
        with self._seen_lock:
            if message in self.seen:
                return False
            self.seen[message] = None
            while len(self.seen) > 2048:
                self.seen.popitem(last=False)
            return True

    # --- who and where ---------------------------------------------------------------------------
    def user_id(self, user: str) -> str:
        return f"slack:{self.team_id}:{user}"

    def thread_key(self, channel: str, root_ts: str, user: str) -> str:
        return f"slack:{self.team_id}:{channel}:{root_ts}:{user}"

    def may_finetune(self, user: str) -> bool:
        return not self.access.admins or self.access.is_admin(user)

    # --- Slack calls (blocking client, in a thread; flood control retried) ------------------------
    async def api(self, method: str, **kwargs: Any) -> Any:
        call = partial(getattr(self.client, method), **kwargs)
        return await C.deliver(lambda: asyncio.to_thread(call), self.retry_delay)

    async def post(self, where: Where, message: R.SlackMessage) -> str:
        """Post ``message`` into ``where``'s thread; its ts."""
        answer = await self.api("chat_postMessage", channel=where.channel, thread_ts=where.root_ts,
                                text=message.text, blocks=message.blocks, unfurl_links=False, unfurl_media=False)
        return answer["ts"]

    async def say(self, where: Where, text: str) -> None:
        await self.post(where, R.plain_message(text))

    async def whisper(self, channel: str, user: str, text: str, root_ts: str | None = None, *,
                      owner: str = "") -> None:
        """An ephemeral message only ``user`` sees (``{owner}`` in ``text``: a mention of that user id)."""
        mention = f"<@{owner}>" if re.fullmatch(r"[UW][A-Z0-9]{1,20}", owner) else R.escape(owner)
        await self.api("chat_postEphemeral", channel=channel, user=user, thread_ts=root_ts,
                       text=R.escape(text).replace("{owner}", mention))

    async def send_files(self, where: Where, attachments: list[Any]) -> None:
        """Images (SHAP, PCA, loss curves) and reports into the thread, with ``files_upload_v2``."""
        for att in attachments:
            path = Path(att.path)
            await self.api("files_upload_v2", channel=where.channel, thread_ts=where.root_ts, file=str(path),
                           filename=path.name, title=att.caption[:250] or path.name,
                           **({"alt_txt": att.caption[:1000]} if att.kind == "image" and att.caption else {}))

    # --- events ----------------------------------------------------------------------------------
    def on_event(self, body: dict) -> None:
        """An ``app_mention`` or a DM (``message`` in an ``im``); anything else (edits, joins, bots) is ignored."""
        event = body.get("event") or {}
        kind, subtype = event.get("type"), event.get("subtype")
        if kind == "message" and event.get("channel_type") != "im":
            return                      # channel messages reach us as app_mention when they are meant for us
        if event.get("bot_id") or subtype not in (None, "file_share") or not event.get("user"):
            return
        # One message, one answer: Slack retries a delivery it thinks timed out (same event), and a DM that
        # mentions the bot may come both as ``message`` and as ``app_mention`` (two events, one message ts).
        if not self.first_time(f"{event.get('channel')}:{event.get('ts')}"):
            return
        self.submit(self.handle(event), f"Slack {kind} from {event.get('user')}")

    async def handle(self, event: dict) -> None:
        user, channel = event["user"], event["channel"]
        root = event.get("thread_ts") or event["ts"]
        raw = re.sub(rf"<@{re.escape(self.bot_user)}(?:\|[^>]*)?>", " ", event.get("text") or "")
        text = R.from_slack(raw).strip()
        lang = lang_of(text)
        if not self.access.allows(user):
            log.info("refused Slack user %s", user)
            await self.whisper(channel, user, say_text("refused", lang), root)
            return
        key = self.thread_key(channel, root, user)
        async with self.turns.turn(key):      # taken before any await: a thread's turns keep their order
            where = Where(channel, root, user, self.book.get(key), lang)
            try:
                if event.get("files"):
                    await self.take_files(where, event["files"])
                if not text and not event.get("files"):      # a bare mention: say what the bot can do
                    await self.say(where, HELP[where.lang])
                elif text and not await self.command(where, key, text):
                    await self.converse(where, text)
            except Exception as exc:
                await self.apologise(where, exc)

    async def apologise(self, where: Where, exc: Exception) -> None:
        text = C.error_text(exc, lang=where.lang, where=f"a Slack message in {where.channel}")
        try:
            await self.say(where, text)
        except Exception as again:
            log.warning("could not tell %s about a failure: %s", where.channel, again)

    # --- turns -----------------------------------------------------------------------------------
    async def converse(self, where: Where, text: str) -> None:
        """One agent turn, with a progress message while it runs; call it holding the thread's turn."""
        lines: list[str] = []
        progress = self.progress(where)

        async def on_event(event: dict) -> None:
            if event["type"] == "step":
                lines.append(f"{event['kind']}: {event['text']}")
            elif event["type"] == "tool":
                lines.append(f"{event['record']['tool']} → {'ok' if event['record']['ok'] else 'failed'}")
            progress.update(R.progress_text(lines))

        progress.update(R.progress_text(lines))   # shown only if the turn is still running after the grace period
        try:
            reply = await self.turns.stream(self.agent, text, thread_id=where.thread_id,
                                            user_id=self.user_id(where.user), on_event=on_event, hold=False)
        finally:
            await progress.close()
        await self.answer(where, reply)

    def progress(self, where: Where) -> C.ProgressMessage:
        async def send(text: str) -> str:
            answer = await asyncio.to_thread(self.client.chat_postMessage, channel=where.channel,
                                             thread_ts=where.root_ts, text=text)
            return answer["ts"]

        async def edit(ts: str, text: str) -> None:
            await asyncio.to_thread(self.client.chat_update, channel=where.channel, ts=ts, text=text)

        async def delete(ts: str) -> None:
            await asyncio.to_thread(self.client.chat_delete, channel=where.channel, ts=ts)

        return C.ProgressMessage(where.channel, self.throttle, send=send, edit=edit, delete=delete,
                                 retry_delay=self.retry_delay, grace=self.config.progress_grace)

    async def answer(self, where: Where, reply: Any) -> None:
        """Post a ``Reply``: trace, answer, sources, buttons for a confirmation, then its images and files.
        Call it holding the thread's turn."""
        parts = C.reply_parts(reply)
        earlier = self.pending.pop(where.thread_id, None)
        if earlier is not None and (parts.pending is None or parts.pending.id != earlier.id):
            await self.mark_answered(where.channel, earlier.ts, earlier.message, None, None)  # answered in words
        buttons = False
        if parts.pending is not None and (self.may_finetune(where.user) or parts.pending.tool not in NEEDS_ADMIN):
            buttons = True
        elif parts.pending is not None:   # not theirs to approve: decline at once, so the thread is not left waiting
            declined = await self.turns.call(None, self.agent.resume, where.thread_id, False,
                                             user_id=self.user_id(where.user))
            parts = C.reply_parts(declined.model_copy(update={
                "answer": f"{say_text('admins_only', where.lang)}\n\n{declined.answer}", "steps": reply.steps}))
        for message in R.render_reply(parts, user=where.user, root_ts=where.root_ts, buttons=buttons):
            ts = await self.post(where, message)
        if buttons:
            self.pending[where.thread_id] = Waiting(parts.pending.id, parts.pending.tool, ts,
                                                    {"text": message.text, "blocks": message.blocks})
        await self.send_files(where, [*parts.images, *parts.documents])

    # --- confirmations ---------------------------------------------------------------------------
    def on_action(self, body: dict) -> None:
        """A Launch / Cancel button under a confirmation."""
        self.submit(self.press(body), f"Slack button from {(body.get('user') or {}).get('id')}")

    async def press(self, body: dict) -> None:
        user = body["user"]["id"]
        action = body["actions"][0]
        container = body.get("container") or {}
        channel = container.get("channel_id") or (body.get("channel") or {}).get("id")
        value = json.loads(action.get("value") or "{}")
        approve = action["action_id"] == R.APPROVE
        lang = lang_of((body.get("message") or {}).get("text") or "")
        if not self.access.allows(user):
            await self.whisper(channel, user, say_text("refused", lang), value.get("r"))
            return
        if user != value.get("u"):
            await self.whisper(channel, user, say_text("not_yours", lang), value.get("r"), owner=str(value.get("u")))
            return
        key = self.thread_key(channel, value["r"], user)
        async with self.turns.turn(key):
            where = Where(channel, value["r"], user, self.book.get(key), lang)
            try:
                # The thread's checkpoint says what it waits for, so buttons from before a restart still work.
                current = await self.turns.call(None, self.agent.pending, where.thread_id,
                                                user_id=self.user_id(user))
                if current is None or current["id"] != value.get("p"):
                    await self.whisper(channel, user, say_text("expired", lang), where.root_ts)
                    return
                if approve and current["tool"] in NEEDS_ADMIN and not self.may_finetune(user):
                    await self.whisper(channel, user, say_text("admins_only", lang), where.root_ts)
                    return
                self.pending.pop(where.thread_id, None)
                await self.mark_answered(channel, container.get("message_ts"), body.get("message") or {}, user,
                                         approve)
                reply = await self.turns.call(None, self.agent.resume, where.thread_id, approve,
                                              user_id=self.user_id(user))
                await self.answer(where, reply)
            except Exception as exc:
                await self.apologise(where, exc)

    async def mark_answered(self, channel: str, ts: str | None, message: dict, user: str | None,
                            approve: bool | None) -> None:
        """Replace the buttons with who chose what, or with "answered in the thread" (``approve`` None); cosmetic,
        so a failure is only logged."""
        if not ts:
            return
        try:
            blocks = R.answered_blocks(message.get("blocks") or [], user, approve)
            await asyncio.to_thread(self.client.chat_update, channel=channel, ts=ts,
                                    text=message.get("text") or "…", blocks=blocks)
        except Exception as exc:
            log.info("could not remove the buttons in %s: %s", channel, exc)

    # --- job announcements -----------------------------------------------------------------------
    async def announce(self, notice: dict) -> None:
        """A finished / failed fine-tune, told in the thread that launched it (with its loss curve)."""
        thread_id = (notice.get("origin") or {}).get("thread_id", "")
        found = slack_thread_of(thread_id)
        if found is None:
            log.warning("job %s has no Slack thread to announce to (%r)", notice.get("job_id"), thread_id)
            return
        from agent.reply import Attachment

        where = Where(found[0], found[1], "", thread_id)
        await self.post(where, R.plain_message(notice["text"]))
        atts = [a for a in (Attachment(**a) for a in notice.get("attachments") or []) if Path(a.path).is_file()]
        await self.send_files(where, atts)
