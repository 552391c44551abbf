"""The Slack bot's text commands (``help``, ``new``, ``jobs``, ``cancel ft-3``, ``memory``, ``forget`` — alone in a
message), files shared with it, and the words it says itself (English, or Chinese when the user writes Chinese)."""

from __future__ import annotations

import re
import urllib.parse
from typing import Any

import httpx

from bots import channel as C
from bots import slack_render as R

NEEDS_ADMIN = ("launch_finetune", "cancel_finetune", "export_finetune")   # GPU time, disk space
TEXTS = {
    "refused": {"en": "Sorry — this stackwise bot is private and you are not on its list of users. Ask its owner to "
                      "add your Slack member id if you need access.",
                "zh": "抱歉，这是一个私有的 stackwise 机器人，你不在它的用户名单里。"
                      "如需使用，请让管理员添加你的 Slack 成员 ID。"},
    "not_yours": {"en": "Only {owner} can answer this confirmation — it is their request.",
                  "zh": "只有 {owner} 可以回答这个确认——这是 Ta 的请求。"},
    "expired": {"en": "This confirmation is no longer waiting (answered, replaced, or from before a restart). "
                      "Ask again if you still want it.",
                "zh": "这个确认已失效（已回答、被替换，或来自重启之前）。如仍需要，请重新发起。"},
    "admins_only": {"en": "Only this bot's admins may launch or cancel fine-tunes, so I did not do it.",
                    "zh": "只有管理员可以启动或取消微调任务，所以我没有执行。"},
    "new": {"en": "Started a fresh conversation in this thread — I won't use its earlier messages. (Your files and "
                  "fine-tune jobs are still here.)",
            "zh": "已在这个话题里开始新的对话，之前的消息不再使用（你的文件和微调任务仍然保留）。"},
    "no_jobs": {"en": "You have no fine-tune jobs yet. Try: fine-tune Qwen2.5-0.5B on data.jsonl",
                "zh": "你还没有微调任务。试试：用 data.jsonl 微调 Qwen2.5-0.5B"},
    "memory_empty": {"en": "I don't remember anything about you yet.", "zh": "我还没有记住关于你的任何事。"},
    "memory_head": {"en": "**What I remember about you** (`forget` deletes it all, `forget KEY` one fact)",
                    "zh": "**我记住的关于你的信息**（`forget` 全部删除，`forget KEY` 删除一条）"},
    "forgot": {"en": "Forgotten: {n} fact(s).", "zh": "已忘记 {n} 条信息。"},
}
HELP = {
    "en": ("**Talk to me** in a DM, or mention me in a channel; each Slack thread is one conversation.\n\n"
           "**Commands** (alone in a message)\n• `new` — start a fresh conversation in this thread\n"
           "• `jobs` — your fine-tune jobs · `cancel ft-3` — cancel one\n"
           "• `memory` — what I remember about you · `forget` — forget it\n• `help` — this message\n\n"
           "**Files**: share a CSV, Parquet, JSONL, Markdown or PDF with me; I save it under its name, then use that "
           "name: _which features drive churn in churn.csv?_, _fine-tune Qwen2.5-0.5B on data.jsonl_. Markdown and "
           "PDF also go into your private knowledge base.\n\n"
           "**Try**: _what is QLoRA?_ · _how similar are 'king' and 'queen'?_ · "
           "_fine-tune Qwen2.5-0.5B on data.jsonl with lora rank 8_ (I ask before launching anything)."),
    "zh": ("**使用方式**：私信我，或在频道里 @ 我；每个 Slack 话题就是一段对话。\n\n"
           "**命令**（单独发送）\n• `new` / `新对话` — 在这个话题里开始新的对话\n"
           "• `jobs` / `任务` — 你的微调任务 · `cancel ft-3` / `取消 ft-3` — 取消任务\n"
           "• `memory` / `记忆` — 我记住的关于你的信息 · `forget` / `忘记` — 忘掉它们\n• `help` / `帮助` — 本帮助\n\n"
           "**文件**：发给我 CSV、Parquet、JSONL、Markdown 或 PDF，我按文件名保存，之后直接用文件名提问："
           "_churn.csv 里哪些特征影响流失？_、_用 data.jsonl 微调 Qwen2.5-0.5B_。"
           "Markdown 和 PDF 还会加入你的私有知识库。"),
}
_WORDS = {"help": "help", "帮助": "help", "new": "new", "新对话": "new", "jobs": "jobs", "任务": "jobs",
          "memory": "memory", "记忆": "memory", "forget": "forget", "忘记": "forget"}
_CANCEL = re.compile(r"^(?:cancel|取消)\s+(ft-\d+)[.!。！]?$", re.IGNORECASE)
_FORGET = re.compile(r"^(?:forget|忘记)\s+([A-Za-z0-9_.:-]{1,64})$", re.IGNORECASE)


def lang_of(text: str) -> str:
    from agent.language import detect_language

    return "zh" if text and detect_language(text) == "zh" else "en"


def say_text(key: str, lang: str) -> str:
    return TEXTS[key].get(lang, TEXTS[key]["en"])


class CommandsMixin:
    """Commands and files of ``SlackBot`` (which provides ``agent``, ``turns``, ``book``, ``say``, ``post``…)."""

    async def command(self, where: Any, key: str, text: str) -> bool:
        """Run ``text`` as a command when it is one (True); call it holding the thread's turn."""
        word = text.strip().rstrip(".!?。！？").lower()
        if m := _CANCEL.match(text.strip()):
            await self.cmd_cancel(where, m.group(1))
            return True
        if m := _FORGET.match(text.strip()):
            key = m.group(1)
            await self.cmd_forget(where, None if key.lower() in ("all", "everything", "全部") else key)
            return True
        name = _WORDS.get(word)
        if name is None:
            return False
        if name == "new":
            await self.turns.call(None, self.book.renew, key)
            await self.say(where, say_text("new", where.lang))
        elif name == "help":
            await self.say(where, HELP[where.lang])
        elif name == "jobs":
            await self.cmd_jobs(where)
        elif name == "memory":
            await self.cmd_memory(where)
        else:
            await self.cmd_forget(where, None)
        return True

    async def cmd_jobs(self, where: Any) -> None:
        """The user's fine-tune jobs, newest first (everyone's for an admin)."""
        admin = self.access.is_admin(where.user)
        uid = self.user_id(where.user)
        rows = await self.turns.call(None, lambda: self.agent.jobs().list(uid, admin, limit=15))
        if not rows:
            await self.say(where, say_text("no_jobs", where.lang))
            return
        lines = "\n".join(R.job_line(row, with_owner=admin) for row in rows)
        await self.post(where, R.mrkdwn_message("*Fine-tune jobs*\n" + lines))

    async def cmd_cancel(self, where: Any, job_id: str) -> None:
        """Cancel a fine-tune job (the command itself is the confirmation); admins only, when there are admins."""
        if not self.may_finetune(where.user):
            await self.say(where, say_text("admins_only", where.lang))
            return
        admin, uid = self.access.is_admin(where.user), self.user_id(where.user)
        row = await self.turns.call(None, lambda: self.agent.jobs().cancel(job_id, uid, admin))
        await self.post(where, R.mrkdwn_message(R.job_line(row)))

    async def cmd_memory(self, where: Any) -> None:
        """What the agent remembers about this user (``Agent.memory_show``, once that feature is there)."""
        show = C.memory_action(self.agent, "show")
        if show is None:
            await self.say(where, C.MEMORY_NOT_YET[where.lang])
            return
        facts = await self.turns.call(None, show, user_id=self.user_id(where.user))
        listing = C.describe_facts(facts, lambda key, shown: f"• `{key}` {shown}")
        await self.say(where, f"{say_text('memory_head', where.lang)}\n{listing}" if listing
                       else say_text("memory_empty", where.lang))

    async def cmd_forget(self, where: Any, key: str | None) -> None:
        """Forget all the user's facts, or the one under ``key``."""
        forget = C.memory_action(self.agent, "forget")
        if forget is None:
            await self.say(where, C.MEMORY_NOT_YET[where.lang])
            return
        count = await self.turns.call(None, forget, user_id=self.user_id(where.user), key=key)
        await self.say(where, say_text("forgot", where.lang).format(n=count if isinstance(count, int) else "?"))

    # --- files in --------------------------------------------------------------------------------
    async def take_files(self, where: Any, files: list[dict]) -> None:
        """Save each shared file in the user's uploads folder (md/pdf also into their knowledge base) and say so;
        a file refused or failing is explained and the others still go through."""
        uid, limit = self.user_id(where.user), self.config.max_upload_bytes
        for file in files:
            try:
                name = C.upload_name(file.get("name"))      # refuse a kind we do not take before downloading
                size = int(file.get("size") or 0)
                if size > limit:
                    raise C.UploadError("too_large",
                                        f"{name} is {C.size_text(size)}; the limit is {C.size_text(limit)}.")
                data = await self.download(file.get("url_private_download") or file.get("url_private") or "", limit)
                saved = await self.turns.call(None, C.save_user_upload, self.agent, uid, name, data, limit=limit)
                lines = [f"📎 Saved `{saved.name}` ({C.size_text(saved.bytes)}). Refer to it by that name, e.g. "
                         f"_{C.upload_example(saved.name)}_"]
                if saved.ingestable:
                    done = await self.turns.call(None, self.agent.ingest, [str(saved.path)], user_id=uid)
                    if done.get("failed"):
                        lines.append("⚠️ Not added to your knowledge base: " + done["failed"][0]["error"])
                    else:
                        lines.append(f"📚 Added to your private knowledge base ({done.get('chunks', 0)} chunks).")
                await self.say(where, "\n".join(lines))
            except C.UploadError as exc:
                await self.say(where, f"⚠️ {file.get('name') or 'That file'}: {exc.message}")

    async def download(self, url: str, limit: int) -> bytes:
        """A shared file's bytes (``url_private``, with the bot token — sent to Slack's own hosts only)."""
        if not self.trusted_file_host(urllib.parse.urlsplit(url).hostname or ""):
            raise C.UploadError("download_failed", "The file's address is not one of Slack's, so I did not fetch it.")
        headers = {"Authorization": f"Bearer {self.config.bot_token}"}
        data = bytearray()
        async with httpx.AsyncClient(timeout=60) as http, http.stream("GET", url, headers=headers) as resp:
            if resp.status_code != 200:
                raise C.UploadError("download_failed", f"Slack answered {resp.status_code} when I fetched the file.")
            if resp.headers.get("content-type", "").startswith("text/html"):
                raise C.UploadError("download_failed", "Slack sent a sign-in page instead of the file: the app "
                                    "needs the files:read scope.")
            async for block in resp.aiter_bytes():
                data += block
                if len(data) > limit:
                    raise C.UploadError("too_large", f"The file is larger than the limit of {C.size_text(limit)}.")
        return bytes(data)

    def trusted_file_host(self, host: str) -> bool:
        host = host.lower()
        api = urllib.parse.urlsplit(self.config.api_url or "").hostname
        return (host == "slack.com" or host.endswith((".slack.com", ".slack-edge.com"))
                or (api is not None and host == api.lower()))
