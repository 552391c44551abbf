"""Slack rendering: text in and out of Slack's mrkdwn, and a ``Reply`` as Block Kit messages.

Everything shown is escaped (``&``, ``<``, ``>`` — so neither a user nor a tool can make a link, a mention or an
``<!channel>`` out of its text) and ``@channel`` / ``@here`` / ``@everyone`` get a word joiner, so they never
notify anyone. The answer's light Markdown (``**bold**``, headings) becomes mrkdwn; code blocks are kept whole.

Example:
    >>> escape("<!channel> a & b @here")
    '&lt;!channel&gt; a &amp; b @\\u2060here'
    >>> from_slack("<@U0BOT> explain <http://notes.md|notes.md> &amp; more")
    '@U0BOT explain notes.md & more'
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from bots import channel as C

SECTION_LIMIT = 3000        # Slack: a section's text
CONTEXT_LIMIT = 2000        # ours: a context element (Slack allows 3,000) — the trace stays a footnote
SECTIONS_PER_MESSAGE = 40   # Slack: 50 blocks a message; room for the trace, sources and buttons
FALLBACK_LIMIT = 3000       # the notification text of a message with blocks
APPROVE, DECLINE = "stackwise_approve", "stackwise_decline"
_BROADCAST = re.compile(r"@(channel|here|everyone)\b", re.IGNORECASE)
_SLACK_LINK = re.compile(r"<([^<>|]*)(?:\|([^<>]*))?>")
_FENCE = "```"
_COLUMN_GAP = re.compile(r"\S {2,}\S")


@dataclass
class SlackMessage:
    """One ``chat.postMessage``: the notification text and the blocks."""

    text: str
    blocks: list[dict] = field(default_factory=list)


# --- text ----------------------------------------------------------------------------------------
def escape(text: str) -> str:
    """Text shown verbatim in mrkdwn: entities escaped, broadcast words defused."""
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _BROADCAST.sub("@\u2060\\1", text)


def from_slack(text: str) -> str:
    """A Slack message's text as the user typed it: ``<url|label>`` → label (Slack links ``notes.md`` by itself),
    ``<url>`` → url, ``<@U1>`` → ``@U1``, ``<#C1|general>`` → ``#general``, ``<!here>`` → ``@here``; entities
    unescaped."""
    def plain(m: re.Match) -> str:
        target, label = m.group(1), m.group(2)
        if target.startswith(("@", "#")):
            return target[0] + label if label else target
        if target.startswith("!"):
            return label or "@" + target[1:].split("^")[0]
        return label if label else target.removeprefix("mailto:")

    text = _SLACK_LINK.sub(plain, text)
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


def mrkdwn(text: str) -> str:
    """The agent's answer (plain text with light Markdown) as escaped mrkdwn; code blocks untouched but escaped."""
    parts = text.split(_FENCE)
    for i in range(0, len(parts), 2):       # even parts are outside code blocks
        part = escape(parts[i])
        part = re.sub(r"\*\*(.+?)\*\*", r"*\1*", part)
        part = re.sub(r"(?m)^#{1,6}\s+(.+?)\s*#*$", r"*\1*", part)
        parts[i] = part
    for i in range(1, len(parts), 2):
        parts[i] = escape(parts[i])
    return _FENCE.join(parts)


def fence_tables(text: str) -> str:
    """Put runs of space-aligned lines (the agent's tables) in code blocks, so Slack's proportional font keeps
    their columns.

    Example:
        >>> fence_tables("pairs:\\n a   cos   dot\\n 1   0.5   0.5\\nend")
        'pairs:\\n```\\n a   cos   dot\\n 1   0.5   0.5\\n```\\nend'
    """
    out: list[str] = []
    run: list[str] = []
    in_code = False

    def flush() -> None:
        out.extend([_FENCE, *run, _FENCE] if len(run) >= 2 else run)
        run.clear()

    for line in text.split("\n"):
        if line.lstrip().startswith(_FENCE):
            flush()
            in_code = not in_code
            out.append(line)
        elif not in_code and len(_COLUMN_GAP.findall(line)) >= 2:
            run.append(line)
        else:
            flush()
            out.append(line)
    flush()
    return "\n".join(out)


def clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def answer_chunks(answer: str, limit: int = SECTION_LIMIT) -> list[str]:
    """The answer as mrkdwn sections of at most ``limit`` characters; a code block cut in two is closed at the
    end of one chunk and reopened at the start of the next."""
    budget = limit - 2 * (len(_FENCE) + 1)  # room to close and reopen a fence
    raw = C.split_text(fence_tables(answer), budget, measure=lambda s: len(mrkdwn(s)))
    chunks, open_fence = [], False
    for piece in raw:
        text = (_FENCE + "\n" if open_fence else "") + piece
        if text.count(_FENCE) % 2:
            text, open_fence = text + "\n" + _FENCE, True
        else:
            open_fence = False
        chunks.append(mrkdwn(text))
    return chunks or [mrkdwn(answer)]


# --- blocks --------------------------------------------------------------------------------------
def section(text: str) -> dict:
    return {"type": "section", "text": {"type": "mrkdwn", "text": text}}


def context(text: str) -> dict:
    return {"type": "context", "elements": [{"type": "mrkdwn", "text": text}]}


def trace_block(steps: list[Any]) -> dict | None:
    """The reasoning trace (``Reply.steps``) as a small grey context block."""
    if not steps:
        return None
    lines, used = [], 0
    for n, step in enumerate(steps):
        line = f"› _{escape(step.kind)}_ {escape(clip(' '.join(step.text.split()), 280))}"
        if used + len(line) + 40 > CONTEXT_LIMIT:
            lines.append(f"… {len(steps) - n} more step(s)")
            break
        lines.append(line)
        used += len(line) + 1
    return context("\n".join(lines))


def citations_block(citations: list[Any]) -> dict | None:
    if not citations:
        return None
    items = []
    for n, c in enumerate(citations[:10], 1):
        where = f" — {escape(clip(c.source, 160))}" if c.source else ""
        items.append(f"{n}. {escape(clip(c.title, 120))} `{escape(c.id)}`{where}")
    return context(clip("📚 *Sources*\n" + "\n".join(items), CONTEXT_LIMIT))


def confirm_block(pending: Any, user: str, root_ts: str) -> dict:
    """Launch / Cancel buttons answering ``pending``; the value names who asked (only they may press)."""
    value = json.dumps({"u": user, "p": pending.id, "r": root_ts})
    yes = "🚀 Launch" if pending.tool == "launch_finetune" else "✅ Confirm"
    button = {"type": "button", "value": value}
    return {"type": "actions", "block_id": f"confirm:{pending.id}"[:255], "elements": [
        {**button, "action_id": APPROVE, "style": "primary", "text": {"type": "plain_text", "text": yes}},
        {**button, "action_id": DECLINE, "style": "danger", "text": {"type": "plain_text", "text": "✖ Cancel"}}]}


def answered_blocks(blocks: list[dict], user: str | None, approved: bool | None) -> list[dict]:
    """A confirmation's message once answered: its buttons replaced by who chose what (``approved`` None: it was
    answered in words, or replaced by a newer request)."""
    kept = [b for b in blocks if b.get("type") != "actions"]
    if approved is None:
        return [*kept, context("↪ answered in this thread")]
    what = "✅ approved" if approved else "✖ declined"
    return [*kept, context(f"{what} by <@{user}>")]


def render_reply(parts: C.ReplyParts, *, user: str, root_ts: str, buttons: bool) -> list[SlackMessage]:
    """A reply as one message (or more, for a very long answer): trace on top, the answer, sources, buttons."""
    sections = [section(chunk) for chunk in answer_chunks(parts.answer or "…")]
    groups = [sections[i:i + SECTIONS_PER_MESSAGE] for i in range(0, len(sections), SECTIONS_PER_MESSAGE)]
    messages = []
    for n, group in enumerate(groups):
        blocks = list(group)
        if n == 0 and (trace := trace_block(parts.steps)):
            blocks.insert(0, trace)
        if n == len(groups) - 1:
            if cites := citations_block(parts.citations):
                blocks.append(cites)
            if buttons and parts.pending is not None:
                blocks.append(confirm_block(parts.pending, user, root_ts))
        messages.append(SlackMessage(text=clip(group[0]["text"]["text"], FALLBACK_LIMIT), blocks=blocks))
    return messages


def plain_message(text: str) -> SlackMessage:
    """A short bot message (command answers, refusals, notices): escaped mrkdwn sections."""
    sections = [section(chunk) for chunk in answer_chunks(text)]
    return SlackMessage(text=clip(sections[0]["text"]["text"], FALLBACK_LIMIT), blocks=sections[:SECTIONS_PER_MESSAGE])


def mrkdwn_message(text: str) -> SlackMessage:
    """A message whose text is mrkdwn already (escaped where it must be): sections of at most 3,000 characters."""
    sections = [section(chunk) for chunk in C.split_text(text, SECTION_LIMIT)]
    return SlackMessage(text=clip(text, FALLBACK_LIMIT), blocks=sections[:SECTIONS_PER_MESSAGE])


def progress_text(lines: list[str]) -> str:
    """The text of the progress message while a turn runs: the last few steps."""
    shown = [f"› {escape(clip(line, 200))}" for line in lines[-6:]]
    return "\n".join(["⏳ _working on it…_", *shown])


def job_line(row: dict, *, with_owner: bool = False) -> str:
    """One fine-tune job as a line of mrkdwn."""
    step = f"{row['step']}/{row['total']}" if row.get("total") else "–"
    loss = f" · loss {row['loss']:.3g}" if isinstance(row.get("loss"), int | float) else ""
    owner = f" · {escape(str(row.get('owner')))}" if with_owner else ""
    what = " · ".join(escape(str(row.get(k))) for k in ("method", "base_model", "dataset") if row.get(k))
    line = f"`{escape(row['id'])}` *{escape(row['status'])}* {step}{loss} · {what}{owner}"
    return line + (f"\n      ⚠️ {escape(clip(row['error'], 300))}" if row.get("error") else "")
