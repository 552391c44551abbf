"""``stackwise telegram``: the Telegram bot (python-telegram-bot), long polling by default, webhook optional.

Configuration (environment): ``STACKWISE_TELEGRAM_TOKEN`` (required); ``STACKWISE_TELEGRAM_BASE_URL`` and
``STACKWISE_TELEGRAM_FILE_URL`` for a self-hosted Bot API server (e.g. ``http://127.0.0.1:8081/bot``);
``STACKWISE_TELEGRAM_ALLOWED_USERS`` (ids; empty: everyone) and ``STACKWISE_TELEGRAM_ADMINS`` (ids that may launch
and cancel fine-tunes; when empty, every allowed user may); ``STACKWISE_TELEGRAM_MAX_UPLOAD_MB`` (20);
``STACKWISE_TELEGRAM_WEBHOOK_URL`` (public URL: webhook mode), ``…_WEBHOOK_LISTEN`` (127.0.0.1),
``…_WEBHOOK_PORT`` (8443), ``…_WEBHOOK_SECRET``.

One agent thread per chat (``tg:<chat>``), per user in groups (``tg:<chat>:<user>``); ``/new`` starts a fresh one
(kept in ``$STACKWISE_HOME/telegram/threads.json``). Turns of one thread run one after another; the Agent works
in a worker thread, progress is one message edited at most once a second per chat, and the answer is sent as
new message(s) (HTML, split under 4,096 characters), with images as photos and reports as documents.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from pathlib import Path
from typing import Any

os.environ.setdefault("PTB_TIMEDELTA", "1")   # python-telegram-bot's future time periods (no deprecation warnings)

from telegram import (  # noqa: E402
    BotCommand,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    InputFile,
    LinkPreviewOptions,
    ReplyParameters,
    Update,
)
from telegram.constants import ChatAction, ChatType, ParseMode  # noqa: E402
from telegram.ext import (  # noqa: E402
    Application,
    CallbackQueryHandler,
    CommandHandler,
    ContextTypes,
    MessageHandler,
    filters,
)

from bots import channel as C  # noqa: E402
from bots import telegram_render as R  # noqa: E402
from bots.telegram_commands import COMMANDS, CommandsMixin, guarded, text_for  # noqa: E402
from bots.telegram_config import TelegramConfig, chat_of_thread, retry_delay  # noqa: E402

log = logging.getLogger("stackwise.telegram")
NEEDS_ADMIN = ("launch_finetune", "cancel_finetune", "export_finetune")   # GPU time, disk space


class TelegramBot(CommandsMixin):
    """The bot: handlers, the turn queue, progress, replies, confirmations, job announcements."""

    def __init__(self, agent: Any, config: TelegramConfig, *, turns: C.TurnQueue | None = None):
        self.agent, self.config, self.access = agent, config, config.access
        self.turns = turns or C.TurnQueue(1)
        self.book = C.ThreadBook(Path(agent.settings.home) / "telegram" / "threads.json")
        self.throttle = C.EditThrottle(config.edit_interval)
        self.refused: set[str] = set()         # users told once that the bot is not theirs
        self.watcher: Any = None
        self.app = self._build()

    def _build(self) -> Application:
        builder = (Application.builder().token(self.config.token).concurrent_updates(512)
                   .post_init(self.on_start).post_stop(self.on_stop))
        if self.config.base_url:
            builder = builder.base_url(self.config.base_url).base_file_url(self.config.base_file_url)
        if self.config.webhook_url:
            builder = builder.updater(None)
        app = builder.build()
        for name, _ in COMMANDS:
            app.add_handler(CommandHandler(name, guarded(getattr(self, f"cmd_{name}"))))
        app.add_handler(CallbackQueryHandler(guarded(self.on_button), pattern=r"^cf:"))
        app.add_handler(MessageHandler(filters.Document.ALL, guarded(self.on_document)))
        app.add_handler(MessageHandler(filters.PHOTO, guarded(self.on_photo)))
        app.add_handler(MessageHandler(filters.TEXT & ~filters.COMMAND, guarded(self.on_text)))
        app.add_handler(MessageHandler(filters.COMMAND, guarded(self.on_unknown_command)))
        app.add_error_handler(self.on_error)
        return app

    # --- life cycle ------------------------------------------------------------------------------
    async def on_start(self, app: Application) -> None:
        try:
            await app.bot.set_my_commands([BotCommand(name, about) for name, about in COMMANDS])
        except Exception as exc:   # a bot without its command menu still works
            log.warning("setMyCommands failed: %s", exc)
        self.watcher = C.announce_jobs(self.agent, asyncio.get_running_loop(), self.announce,
                                       poll_s=self.config.job_poll_s)

    async def on_stop(self, app: Application) -> None:
        if self.watcher is not None:
            await asyncio.to_thread(self.watcher.stop)
            self.watcher = None

    async def run(self, stop: asyncio.Event) -> None:
        """Poll until ``stop`` is set (what ``run_polling`` does, for embedding the bot in another loop)."""
        async with self.app:
            await self.on_start(self.app)
            await self.app.start()
            await self.app.updater.start_polling(poll_interval=0.0, timeout=self.config.poll_timeout,
                                                 allowed_updates=["message", "callback_query"])
            try:
                await stop.wait()
            finally:
                await self.app.updater.stop()
                await self.app.stop()
                await self.on_stop(self.app)

    # --- who and where ---------------------------------------------------------------------------
    @staticmethod
    def user_id(user: Any) -> str:
        return f"tg:{user.id}"

    @staticmethod
    def thread_key(chat: Any, user: Any) -> str:
        return f"tg:{chat.id}" if chat.type == "private" else f"tg:{chat.id}:{user.id}"

    def may_finetune(self, user: Any) -> bool:
        return not self.access.admins or self.access.is_admin(str(user.id))

    async def admit(self, update: Update) -> bool:
        """Allowed users pass; anyone else gets one polite refusal (per run) and nothing more."""
        user = update.effective_user
        if user is None or self.access.allows(str(user.id)):
            return user is not None
        if str(user.id) not in self.refused:
            self.refused.add(str(user.id))
            log.info("refused Telegram user %s", user.id)
            if update.callback_query:
                await update.callback_query.answer(text_for("refused", user), show_alert=True)
            elif update.effective_chat:
                await self.say(update.effective_chat.id, text_for("refused", user))
        elif update.callback_query:
            await update.callback_query.answer()
        return False

    def addressed(self, message: Any, text: str | None) -> str | None:
        """The text meant for the bot: all of it in a private chat; in a group only a mention or a reply to us."""
        if text is None or message.chat.type == "private":
            return text
        me = self.app.bot
        replied = message.reply_to_message
        if replied is not None and replied.from_user is not None and replied.from_user.id == me.id:
            return text
        mention = re.compile(rf"@{re.escape(me.username or '')}\b", re.IGNORECASE)
        return mention.sub("", text).strip() if me.username and mention.search(text) else None

    # --- turns -----------------------------------------------------------------------------------
    async def on_text(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Free text (private chats; mentions and replies in groups): one agent turn."""
        message = update.effective_message
        text = self.addressed(message, message.text)
        if text is None or not await self.admit(update):
            return
        await self.converse(update, text)

    async def converse(self, update: Update, text: str) -> None:
        chat, user, message = update.effective_chat, update.effective_user, update.effective_message
        key = self.thread_key(chat, user)
        async with self.turns.turn(key):       # taken before any await: turns of a thread keep their order
            thread_id, uid = self.book.get(key), self.user_id(user)
            lines: list[str] = []
            progress = self.progress(chat.id, user)

            async def on_event(event: dict) -> None:
                if event["type"] == "step":
                    lines.append(f"{event['kind']}: {event['text']}")
                elif event["type"] == "tool":
                    lines.append(f"{event['record']['tool']} → {'ok' if event['record']['ok'] else 'failed'}")
                progress.update(R.progress_text(lines, lang=_lang(user)))

            self.background(self.app.bot.send_chat_action(chat.id, ChatAction.TYPING))
            try:
                reply = await self.turns.stream(self.agent, text, thread_id=thread_id, user_id=uid,
                                                on_event=on_event, hold=False)
                await self.answer(chat.id, reply, user, reply_to=message.message_id)
            finally:
                await progress.close()

    def progress(self, chat_id: int, user: Any) -> C.ProgressMessage:
        bot = self.app.bot

        async def send(text: str) -> int:
            return (await bot.send_message(chat_id, text)).message_id

        async def edit(message_id: int, text: str) -> None:
            await bot.edit_message_text(text, chat_id=chat_id, message_id=message_id)

        async def delete(message_id: int) -> None:
            await bot.delete_message(chat_id, message_id)

        return C.ProgressMessage(str(chat_id), self.throttle, send=send, edit=edit, delete=delete,
                                 retry_delay=retry_delay, grace=self.config.progress_grace)

    async def answer(self, chat_id: int, reply: Any, user: Any, *, reply_to: int | None = None) -> None:
        """Send a ``Reply``: its text (buttons on the last part when it waits for a confirmation), images, files.
        Call it holding the thread's turn."""
        parts = C.reply_parts(reply)
        markup = None
        if parts.pending is not None and (self.may_finetune(user) or parts.pending.tool not in NEEDS_ADMIN):
            markup = confirm_keyboard(parts.pending, user)
        elif parts.pending is not None:   # not theirs to approve: decline at once, so the thread is not left waiting
            declined = await self.turns.call(None, self.agent.resume, reply.thread_id, False,
                                             user_id=self.user_id(user))
            parts = C.reply_parts(declined.model_copy(update={
                "answer": f"{text_for('admins_only', user)}\n\n{declined.answer}", "steps": reply.steps}))
        lang = _lang(user, reply.answer)
        texts = R.render_messages(parts.answer, steps=parts.steps, citations=parts.citations, lang=lang)
        for i, html in enumerate(texts):
            await self.send_html(chat_id, html, markup=markup if i == len(texts) - 1 else None,
                                 reply_to=reply_to if i == 0 else None)
        await self.send_files(chat_id, parts.images, parts.documents)

    async def send_html(self, chat_id: int, html: str, *, markup: Any = None, reply_to: int | None = None) -> Any:
        reply = ReplyParameters(reply_to, allow_sending_without_reply=True) if reply_to else None
        return await C.deliver(lambda: self.app.bot.send_message(
            chat_id, html, parse_mode=ParseMode.HTML, reply_markup=markup, reply_parameters=reply,
            link_preview_options=LinkPreviewOptions(is_disabled=True)), retry_delay)

    async def send_files(self, chat_id: int, images: list, documents: list) -> None:
        bot = self.app.bot
        for att in images:
            data, name = Path(att.path).read_bytes(), Path(att.path).name
            await C.deliver(lambda d=data, n=name, a=att: bot.send_photo(
                chat_id, InputFile(d, filename=n), caption=R.plain_caption(a.caption) or None), retry_delay)
        for att in documents:
            data, name = Path(att.path).read_bytes(), Path(att.path).name
            await C.deliver(lambda d=data, n=name, a=att: bot.send_document(
                chat_id, InputFile(d, filename=n), caption=R.plain_caption(a.caption) or None), retry_delay)

    async def say(self, chat_id: int, text: str) -> None:
        """A short plain-text message (refusals, apologies, command answers)."""
        await C.deliver(lambda: self.app.bot.send_message(chat_id, text), retry_delay)

    # --- confirmations ---------------------------------------------------------------------------
    async def on_button(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Launch / Cancel under a confirmation: only the user who asked may press it."""
        query = update.callback_query
        if not await self.admit(update):
            return
        _, approve, owner, pending_id = query.data.split(":", 3)
        user, chat = query.from_user, update.effective_chat
        # In a private chat the chat is the user's own: a press claiming another chat is never theirs.
        if str(user.id) != owner or (chat.type == ChatType.PRIVATE and chat.id != user.id):
            await query.answer(text_for("not_yours", user), show_alert=True)
            return
        key = self.thread_key(chat, user)
        async with self.turns.turn(key):
            thread_id = self.book.get(key)
            # The thread's checkpoint says what it waits for, so buttons from before a restart still work.
            current = await self.turns.call(None, self.agent.pending, thread_id, user_id=self.user_id(user))
            if current is None or current["id"] != pending_id:
                await query.answer(text_for("expired", user), show_alert=True)
                return
            await query.answer()
            try:
                await query.edit_message_reply_markup(reply_markup=None)
            except Exception as exc:   # the buttons staying is cosmetic; the answer below still comes
                log.info("could not remove the buttons in %s: %s", chat.id, exc)
            reply = await self.turns.call(None, self.agent.resume, thread_id, approve == "1",
                                          user_id=self.user_id(user))
            await self.answer(chat.id, reply, user)

    # --- job announcements -----------------------------------------------------------------------
    async def announce(self, notice: dict) -> None:
        """A finished/failed fine-tune, told in the chat that launched it (with its loss curve)."""
        chat_id = chat_of_thread((notice.get("origin") or {}).get("thread_id", ""))
        if chat_id is None:
            log.warning("job %s has no Telegram chat to announce to", notice.get("job_id"))
            return
        for html in R.render_messages(notice["text"]):
            await self.send_html(chat_id, html)
        atts = C.reply_parts(_Notice(notice)).images
        await self.send_files(chat_id, atts, [])

    # --- errors ----------------------------------------------------------------------------------
    async def on_error(self, update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Errors outside the handlers' own guard (polling, the network): logged; the chat gets an apology."""
        log.error("Telegram update failed", exc_info=context.error)
        chat = getattr(update, "effective_chat", None)
        if chat is not None:
            try:
                await self.say(chat.id, C.APOLOGY["en"])
            except Exception as exc:
                log.warning("could not apologise in %s: %s", chat.id, exc)

    def background(self, coro: Any) -> None:
        """Fire and forget (typing indicators): a failure is logged, never raised."""
        task = asyncio.get_running_loop().create_task(coro)
        task.add_done_callback(lambda t: t.cancelled() or t.exception() is None
                               or log.info("background call failed: %s", t.exception()))


class _Notice:
    """A job notice looked at as a reply (for ``reply_parts``)."""

    def __init__(self, notice: dict):
        from agent.reply import Attachment

        self.thread_id = (notice.get("origin") or {}).get("thread_id", "")
        self.answer, self.steps, self.citations, self.pending = notice["text"], [], [], None
        self.attachments = [Attachment(**a) for a in notice.get("attachments") or []]


def confirm_keyboard(pending: Any, user: Any) -> InlineKeyboardMarkup:
    yes = "🚀 Launch" if pending.tool == "launch_finetune" else "✅ Confirm"
    return InlineKeyboardMarkup([[InlineKeyboardButton(yes, callback_data=f"cf:1:{user.id}:{pending.id}"),
                                  InlineKeyboardButton("✖ Cancel", callback_data=f"cf:0:{user.id}:{pending.id}")]])


def _lang(user: Any, text: str = "") -> str:
    from agent.language import detect_language

    if text:
        return "zh" if detect_language(text) == "zh" else "en"
    return "zh" if (getattr(user, "language_code", "") or "").startswith("zh") else "en"


def serve(settings: Any, *, env: dict[str, str] | None = None) -> int:
    """``stackwise telegram``: run until interrupted (polling, or a webhook when its URL is set)."""
    from agent import Agent

    config = TelegramConfig.from_env(env)
    agent = Agent(settings, channel="telegram")
    try:
        bot = TelegramBot(agent, config)
        if config.webhook_url:
            from bots.telegram_webhook import run_webhook

            asyncio.run(run_webhook(bot))
        else:
            bot.app.run_polling(allowed_updates=["message", "callback_query"], timeout=config.poll_timeout)
    finally:
        agent.close()
    return 0


__all__ = ["TelegramBot", "TelegramConfig", "chat_of_thread", "confirm_keyboard", "retry_delay", "serve"]
