"""The Telegram bot's commands (``/start``, ``/help``, ``/new``, ``/memory``, ``/forget``, ``/jobs``, ``/cancel``),
uploads, and the words it says itself (English, or Chinese for users whose Telegram speaks it)."""

from __future__ import annotations

import asyncio
import functools
import html
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from bots import channel as C
from bots import telegram_render as R

log = logging.getLogger("stackwise.telegram")
COMMANDS = [("start", "what I can do"), ("help", "commands and examples"), ("new", "start a fresh conversation"),
            ("memory", "what I remember about you"), ("forget", "forget what I remember about you"),
            ("jobs", "your fine-tune jobs"), ("cancel", "cancel a fine-tune job: /cancel ft-3")]
TEXTS = {
    "refused": {"en": "Sorry — this is a private stackwise bot and you are not on its list of users. "
                      "Ask its owner to add your Telegram id if you need access.",
                "zh": "抱歉，这是一个私有的 stackwise 机器人，你不在它的用户名单里。"
                      "如需使用，请让管理员添加你的 Telegram id。"},
    "not_yours": {"en": "Only the person who asked can answer this confirmation.",
                  "zh": "只有提出请求的人可以确认或取消。"},
    "expired": {"en": "This confirmation is no longer waiting (answered, replaced or from before a restart). "
                      "Ask again if you still want it.",
                "zh": "这个确认已失效（已回答、被替换，或来自重启之前）。如仍需要，请重新发起。"},
    "admins_only": {"en": "Only this bot's admins may launch or cancel fine-tunes, so I did not do it.",
                    "zh": "只有管理员可以启动或取消微调任务，所以我没有执行。"},
    "new": {"en": "Started a fresh conversation. (Your files and fine-tune jobs are still here.)",
            "zh": "已开始新的对话（你的文件和微调任务仍然保留）。"},
    "no_jobs": {"en": "You have no fine-tune jobs yet. Try: fine-tune Qwen2.5-0.5B on data.jsonl",
                "zh": "你还没有微调任务。试试：用 data.jsonl 微调 Qwen2.5-0.5B"},
    "cancel_usage": {"en": "Which job? Send /cancel ft-3 (see /jobs for the ids).",
                     "zh": "要取消哪个任务？发送 /cancel ft-3（任务 id 见 /jobs）。"},
    "photo": {"en": "I read files, not pictures: send a CSV, Parquet, JSONL, Markdown or PDF as a document "
                    "(📎 → File).",
              "zh": "我只读取文件，不读取图片：请把 CSV、Parquet、JSONL、Markdown 或 PDF 作为文件发送（📎 → 文件）。"},
    "forgot": {"en": "Forgotten: {n} fact(s).", "zh": "已忘记 {n} 条信息。"},
    "unknown": {"en": "I don't know that command — /help lists mine.", "zh": "没有这个命令，/help 列出了我的命令。"},
    "memory_empty": {"en": "I don't remember anything about you yet.", "zh": "我还没有记住关于你的任何事。"},
}
HELP = {
    "en": ("<b>Commands</b>\n/new — start a fresh conversation\n/memory — what I remember about you · /forget — "
           "forget it\n/jobs — your fine-tune jobs · /cancel ft-3 — cancel one\n/help — this message\n\n"
           "<b>Files</b>: send a CSV, Parquet, JSONL, Markdown or PDF as a document; I save it under its name, then "
           "use that name: <i>which features drive churn in churn.csv?</i>, <i>fine-tune Qwen2.5-0.5B on "
           "data.jsonl</i>. Markdown and PDF also go into your private knowledge base.\n\n"
           "In groups, mention me or reply to my message."),
    "zh": ("<b>命令</b>\n/new — 开始新的对话\n/memory — 我记住的关于你的信息 · /forget — 忘掉它们\n"
           "/jobs — 你的微调任务 · /cancel ft-3 — 取消任务\n/help — 显示本帮助\n\n"
           "<b>文件</b>：把 CSV、Parquet、JSONL、Markdown 或 PDF 作为文件发送，"
           "我按文件名保存，之后直接用文件名提问：<i>churn.csv 里哪些特征影响流失？</i>、<i>用 data.jsonl 微调 "
           "Qwen2.5-0.5B</i>。Markdown 和 PDF 还会加入你的私有知识库。\n\n在群组里，请 @ 我或回复我的消息。"),
}


def lang_of(user: Any) -> str:
    return "zh" if (getattr(user, "language_code", "") or "").startswith("zh") else "en"


def text_for(key: str, user: Any) -> str:
    return TEXTS[key][lang_of(user)]


def guarded(handler: Callable[[Any, Any], Awaitable[None]]) -> Callable[[Any, Any], Awaitable[None]]:
    """A handler whose failure is logged (with its traceback, when it is a bug) and answered with a short message
    — never left to kill the bot."""
    bot = handler.__self__

    @functools.wraps(handler)
    async def run(update: Any, context: Any) -> None:
        try:
            await handler(update, context)
        except Exception as exc:
            text = C.error_text(exc, lang=lang_of(update.effective_user), where=f"Telegram {handler.__name__}")
            chat = update.effective_chat
            if chat is not None:
                try:
                    await bot.say(chat.id, text)
                except Exception as again:
                    log.warning("could not tell chat %s about a failure: %s", chat.id, again)

    return run


class CommandsMixin:
    """Command and upload handlers of ``TelegramBot`` (which provides ``admit``, ``say``, ``turns``, ``agent``…)."""

    async def cmd_start(self, update: Any, context: Any) -> None:
        """What the bot can do."""
        if not await self.admit(update):
            return
        user = update.effective_user
        hello = "你好" if lang_of(user) == "zh" else "Hi"
        await self.send_html(update.effective_chat.id, f"{hello} {html.escape(user.first_name or '')}! 👋\n\n"
                             + HELP[lang_of(user)])

    async def cmd_help(self, update: Any, context: Any) -> None:
        """Commands and examples."""
        if await self.admit(update):
            await self.send_html(update.effective_chat.id, HELP[lang_of(update.effective_user)])

    async def cmd_new(self, update: Any, context: Any) -> None:
        """A fresh agent thread for this chat (this user, in a group)."""
        if not await self.admit(update):
            return
        key = self.thread_key(update.effective_chat, update.effective_user)
        async with self.turns.turn(key):        # after the thread's running turn, before its next message
            await asyncio.to_thread(self.book.renew, key)
        await self.say(update.effective_chat.id, text_for("new", update.effective_user))

    async def cmd_memory(self, update: Any, context: Any) -> None:
        """What the agent remembers about this user."""
        if not await self.admit(update):
            return
        user, chat = update.effective_user, update.effective_chat
        show = C.memory_action(self.agent, "show")
        if show is None:
            await self.say(chat.id, C.MEMORY_NOT_YET[lang_of(user)])
            return
        facts = await self.turns.call(None, show, user_id=self.user_id(user))
        await self.say(chat.id, C.describe_facts(facts) or text_for("memory_empty", user))

    async def cmd_forget(self, update: Any, context: Any) -> None:
        """Forget what the agent remembers about this user (``/forget KEY``: one fact)."""
        if not await self.admit(update):
            return
        user, chat = update.effective_user, update.effective_chat
        forget = C.memory_action(self.agent, "forget")
        if forget is None:
            await self.say(chat.id, C.MEMORY_NOT_YET[lang_of(user)])
            return
        key = " ".join(context.args or []) or None
        count = await self.turns.call(None, forget, user_id=self.user_id(user), key=key)
        await self.say(chat.id, text_for("forgot", user).format(n=count if isinstance(count, int) else "?"))

    async def cmd_jobs(self, update: Any, context: Any) -> None:
        """The user's fine-tune jobs, newest first (everyone's for an admin)."""
        if not await self.admit(update):
            return
        user = update.effective_user
        admin = self.access.is_admin(str(user.id))
        rows = await self.turns.call(None, lambda: self.agent.jobs().list(self.user_id(user), admin, limit=15))
        if not rows:
            await self.say(update.effective_chat.id, text_for("no_jobs", user))
            return
        lines = [R.job_line(row, with_owner=admin) for row in rows]
        await self.send_html(update.effective_chat.id, "<b>Fine-tune jobs</b>\n" + "\n".join(lines))

    async def cmd_cancel(self, update: Any, context: Any) -> None:
        """Cancel a fine-tune job by id (the command itself is the confirmation)."""
        if not await self.admit(update):
            return
        user, chat = update.effective_user, update.effective_chat
        if not self.may_finetune(user):
            await self.say(chat.id, text_for("admins_only", user))
            return
        if len(context.args or []) != 1:
            await self.say(chat.id, text_for("cancel_usage", user))
            return
        admin = self.access.is_admin(str(user.id))
        row = await self.turns.call(None, lambda: self.agent.jobs().cancel(context.args[0], self.user_id(user),
                                                                           admin))
        await self.send_html(chat.id, R.job_line(row))

    async def on_unknown_command(self, update: Any, context: Any) -> None:
        """A command we do not have: point to /help."""
        message = update.effective_message
        if (message.chat.type == "private" or self.addressed(message, message.text) is not None) \
                and await self.admit(update):
            await self.say(update.effective_chat.id, text_for("unknown", update.effective_user))

    async def on_photo(self, update: Any, context: Any) -> None:
        """A picture: say how to send a file instead."""
        message = update.effective_message
        if self.addressed(message, message.caption or "") is not None and await self.admit(update):
            await self.say(update.effective_chat.id, text_for("photo", update.effective_user))

    async def on_document(self, update: Any, context: Any) -> None:
        """An uploaded file: saved in the user's uploads folder (md/pdf also into their knowledge base); a
        caption is then answered as a message about it."""
        message = update.effective_message
        caption = self.addressed(message, message.caption or "")
        if caption is None or not await self.admit(update):
            return
        user, chat, doc = update.effective_user, update.effective_chat, message.document
        key, uid = self.thread_key(chat, user), self.user_id(user)
        async with self.turns.turn(key):   # a message sent right after the file waits until it is saved
            limit = self.config.max_upload_bytes
            if doc.file_size and doc.file_size > limit:
                raise C.UploadError("too_large", f"The file is {doc.file_size / 2**20:.1f} MB; the limit is "
                                    f"{limit / 2**20:.0f} MB.")
            C.upload_name(doc.file_name)   # refuse a kind we do not take before downloading it
            data = bytes(await (await doc.get_file()).download_as_bytearray())
            saved = await asyncio.to_thread(C.save_user_upload, self.agent, uid, doc.file_name, data, limit=limit)
            lines = [f"📎 Saved <code>{html.escape(saved.name)}</code> ({C.size_text(saved.bytes)}). "
                     f"Refer to it by that name, e.g. <i>{html.escape(C.upload_example(saved.name))}</i>"]
            if saved.ingestable:
                done = await self.turns.call(None, self.agent.ingest, [str(saved.path)], user_id=uid)
                if done.get("failed"):
                    lines.append("⚠️ Not added to your knowledge base: " + html.escape(done["failed"][0]["error"]))
                else:
                    lines.append(f"📚 Added to your private knowledge base ({done.get('chunks', 0)} chunks).")
            await self.send_html(chat.id, "\n".join(lines), reply_to=message.message_id)
        if caption.strip() and not caption.startswith("/"):
            await self.converse(update, caption)
