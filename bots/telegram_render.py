"""A ``Reply`` as Telegram HTML messages: the answer (its ``**bold**``, `` `code` ``, tables and ``>`` quotes kept),
the sources as a short list, the reasoning trace in an expandable blockquote — packed into messages of at most
4,096 UTF-16 code units of visible text, cut at paragraph/line boundaries, with every tag closed and reopened
across a cut and escaping done after cutting (so no tag or entity is ever split).

Example:
    >>> render_messages("a < b **and** c", limit=4096)
    ['a &lt; b <b>and</b> c']
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from typing import Any

from bots.channel import split_text, utf16_len

LIMIT = 4096
CAPTION_LIMIT = 1024
_INLINE = re.compile(r"\*\*(?P<b>[^*\n]+?)\*\*|`(?P<code>[^`\n]+)`")
_TABLE_LINE = re.compile(r"^\s{2,}\S|\S {3,}\S")


@dataclass(frozen=True)
class Run:
    """Visible text with at most one style: None, ``b``, ``i``, ``code`` or ``a`` (with ``href``)."""

    text: str
    tag: str | None = None
    href: str | None = None

    def html(self) -> str:
        body = html.escape(self.text, quote=False)
        if self.tag == "a":
            return f'<a href="{html.escape(self.href or "", quote=True)}">{body}</a>'
        return f"<{self.tag}>{body}</{self.tag}>" if self.tag else body


@dataclass(frozen=True)
class Block:
    """A paragraph-like unit: runs inside an optional wrapper (``pre``, ``blockquote``, ``blockquote expandable``)."""

    runs: tuple[Run, ...]
    wrap: str | None = None

    @property
    def text(self) -> str:
        return "".join(r.text for r in self.runs)

    def html(self) -> str:
        inner = "".join(r.html() for r in self.runs)
        if not self.wrap:
            return inner
        return f"<{self.wrap}>{inner}</{self.wrap.split()[0]}>"

    def cut(self, start: int, end: int) -> Block:
        """The part of this block between two offsets of its visible text, styles kept."""
        runs, pos = [], 0
        for run in self.runs:
            lo, hi = max(start, pos), min(end, pos + len(run.text))
            if lo < hi:
                runs.append(Run(run.text[lo - pos:hi - pos], run.tag, run.href))
            pos += len(run.text)
        return Block(tuple(runs), self.wrap)


def inline_runs(text: str) -> list[Run]:
    """``**bold**`` and `` `code` `` as styled runs; everything else plain."""
    runs, pos = [], 0
    for m in _INLINE.finditer(text):
        if m.start() > pos:
            runs.append(Run(text[pos:m.start()]))
        runs.append(Run(m.group("b"), "b") if m.group("b") is not None else Run(m.group("code"), "code"))
        pos = m.end()
    if pos < len(text):
        runs.append(Run(text[pos:]))
    return runs


def answer_blocks(answer: str) -> list[Block]:
    """Paragraphs of an answer: aligned tables as ``pre``, ``>`` quotes as blockquotes, the rest with inline styles."""
    blocks = []
    for para in re.split(r"\n\s*\n", answer.strip("\n")):
        if not para.strip():
            continue
        lines = para.split("\n")
        if len(lines) > 1 and sum(bool(_TABLE_LINE.search(line)) for line in lines) * 2 > len(lines):
            blocks.append(Block((Run(para),), "pre"))
        elif all(line.startswith(">") for line in lines):
            quoted = "\n".join(line[1:].removeprefix(" ") for line in lines)
            blocks.append(Block(tuple(inline_runs(quoted)), "blockquote"))
        else:
            blocks.append(Block(tuple(inline_runs(para.strip()))))
    return blocks


def citation_block(citations: list[Any], *, lang: str = "en", most: int = 8) -> Block | None:
    """A short "Sources" list: linked titles where the source is a URL."""
    if not citations:
        return None
    runs = [Run("来源" if lang == "zh" else "Sources", "b")]
    for c in citations[:most]:
        runs.append(Run("\n• "))
        if re.match(r"^https?://\S+$", c.source or ""):
            runs.append(Run(c.title, "a", c.source))
        else:
            runs.append(Run(c.title))
            if c.source:
                runs.append(Run(f" — {c.source}"))
    if len(citations) > most:
        runs.append(Run(f"\n… +{len(citations) - most}"))
    return Block(tuple(runs))


def steps_block(steps: list[Any], *, lang: str = "en") -> Block | None:
    """The reasoning trace, collapsed: one line per step."""
    if not steps:
        return None
    head = "思考过程" if lang == "zh" else "How I got there"
    lines = "\n".join(f"{s.kind}: {s.text}" for s in steps)
    return Block((Run(head, "b"), Run("\n" + lines)), "blockquote expandable")


def pack(blocks: list[Block], limit: int = LIMIT, sep: str = "\n\n") -> list[str]:
    """Blocks into HTML messages of at most ``limit`` visible UTF-16 code units; a block too long for one message
    is cut at paragraph/line boundaries (``split_text``) and each part keeps its styles and wrapper."""
    messages: list[str] = []
    parts: list[str] = []
    used = 0
    gap = utf16_len(sep)

    def flush() -> None:
        nonlocal parts, used
        if parts:
            messages.append(sep.join(parts))
        parts, used = [], 0

    for block in blocks:
        text = block.text
        size = utf16_len(text)
        if not text.strip():
            continue
        if size <= limit:
            if parts and used + gap + size > limit:
                flush()
            used += (gap if parts else 0) + size
            parts.append(block.html())
            continue
        pos = 0      # too long for any message: fill the room left, then whole messages, keep the tail open
        while text[pos:].strip():
            room = limit - used - gap if parts else limit
            if room < limit // 4:
                flush()
                room = limit
            chunk = split_text(text[pos:], room, utf16_len)[0]
            start = text.index(chunk, pos)
            pos = start + len(chunk)
            used += (gap if parts else 0) + utf16_len(chunk)
            parts.append(block.cut(start, pos).html())
            if text[pos:].strip():
                flush()
    flush()
    return messages


def render_messages(answer: str, *, steps: list[Any] = (), citations: list[Any] = (), lang: str = "en",
                    limit: int = LIMIT) -> list[str]:
    """The whole reply as HTML messages: answer, sources, then the collapsed trace."""
    blocks = answer_blocks(answer)
    for extra in (citation_block(list(citations), lang=lang), steps_block(list(steps), lang=lang)):
        if extra is not None:
            blocks.append(extra)
    return pack(blocks, limit) or [html.escape(answer.strip() or "…", quote=False)]


def plain_caption(text: str, limit: int = CAPTION_LIMIT) -> str:
    """A caption (sent without parse mode) cut to Telegram's caption limit."""
    parts = split_text(text, limit - 1, utf16_len)
    return parts[0] + ("…" if len(parts) > 1 else "") if parts else ""


def progress_text(lines: list[str], *, lang: str = "en", most: int = 8, width: int = 300) -> str:
    """The progress message (plain text): a header and the latest steps."""
    head = "⏳ 处理中…" if lang == "zh" else "⏳ Working…"
    shown = [line if len(line) <= width else line[:width - 1] + "…" for line in lines[-most:]]
    return "\n".join([head, *(f"· {line}" for line in shown)])


def job_line(row: dict, *, with_owner: bool = False) -> str:
    """One ``/jobs`` row as HTML."""
    bits = [f"<code>{html.escape(row['id'])}</code> <b>{html.escape(row['status'])}</b>"]
    model = " ".join(str(row[k]) for k in ("base_model", "method") if row.get(k))
    if model:
        bits.append(html.escape(model))
    if row.get("dataset"):
        bits.append(html.escape(str(row["dataset"])))
    if row.get("step") is not None and row.get("total"):
        bits.append(f"step {row['step']}/{row['total']}")
    if row.get("loss") is not None:
        bits.append(f"loss {float(row['loss']):.3f}")
    if with_owner:
        bits.append(f"owner {html.escape(str(row.get('owner')))}")
    if row.get("error"):
        bits.append(html.escape(str(row["error"])[:200]))
    return " · ".join(bits)


__all__ = ["CAPTION_LIMIT", "LIMIT", "Block", "Run", "answer_blocks", "citation_block", "inline_runs", "job_line",
           "pack", "plain_caption", "progress_text", "render_messages", "steps_block"]
