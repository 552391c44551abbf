"""The channel-neutral core the chat bots (Telegram, Slack) share: who may talk, which agent thread a chat is,
one turn at a time per thread, uploads, a ``Reply`` in pieces, splitting long text, throttled progress
messages whose final text is always delivered, job announcements into the bot's loop, and the apology.

Nothing here knows a chat service: each bot passes its own calls (send, edit, delete) and its own
``retry_delay(exc)`` (how long a flood-control error asks to wait; None: do not retry).

Example:
    >>> split_text("one\\n\\ntwo three", 9)
    ['one', 'two three']
    >>> AccessList.from_strings("42, 7", "7").allows("9"), AccessList.from_strings("", "").allows("9")
    (False, True)
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger("stackwise.channel")
T = TypeVar("T")
RetryDelay = Callable[[BaseException], "float | None"]

APOLOGY = {"en": "Sorry — something went wrong while handling that. It has been logged; please try again.",
           "zh": "抱歉，处理这条消息时出了问题，已记录下来，请再试一次。"}
MEMORY_NOT_YET = {"en": "Long-term memory is not available in this version yet — it arrives with a later update.",
                  "zh": "长期记忆功能在这个版本中尚不可用，会在后续版本中提供。"}
UPLOAD_SUFFIXES = (".csv", ".parquet", ".jsonl", ".md", ".pdf")
INGESTABLE_SUFFIXES = (".md", ".pdf")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".webp")
_ID = re.compile(r"^[A-Za-z0-9_.@:+-]{1,64}$")


# --- who may talk -------------------------------------------------------------------------------
def parse_ids(raw: str | None, *, name: str = "the user list") -> frozenset[str]:
    """User ids from an environment string (commas and/or spaces between them); bad tokens raise ``SettingsError``.

    Example:
        >>> sorted(parse_ids(" 42,7  99 "))
        ['42', '7', '99']
    """
    from agent.settings import SettingsError

    ids = [t for t in re.split(r"[,\s]+", raw or "") if t]
    for token in ids:
        if not _ID.match(token):
            raise SettingsError(f"{name}: {token!r} is not a user id (use ids separated by commas).")
    return frozenset(ids)


@dataclass(frozen=True)
class AccessList:
    """The allow-list (empty: everyone may talk) and the admins (always allowed; may launch/cancel fine-tunes)."""

    allowed: frozenset[str] = frozenset()
    admins: frozenset[str] = frozenset()

    @classmethod
    def from_strings(cls, allowed: str | None, admins: str | None, *, names: tuple[str, str] = ("allowed users",
                                                                                             "admins")) -> AccessList:
        return cls(parse_ids(allowed, name=names[0]), parse_ids(admins, name=names[1]))

    @classmethod
    def from_env(cls, allowed_var: str, admins_var: str, env: dict[str, str] | None = None) -> AccessList:
        env = dict(os.environ if env is None else env)
        return cls.from_strings(env.get(allowed_var), env.get(admins_var), names=(allowed_var, admins_var))

    def allows(self, user: str) -> bool:
        return not self.allowed or str(user) in self.allowed or str(user) in self.admins

    def is_admin(self, user: str) -> bool:
        return str(user) in self.admins


# --- which agent thread a chat is -----------------------------------------------------------------
class ThreadBook:
    """Maps a conversation key (``tg:<chat>``, ``tg:<chat>:<user>``) to its current agent thread id, in a small
    JSON file so ``/new`` survives a restart. A key never renewed is its own thread id."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._map: dict[str, str] = {}
        if self.path.exists():
            try:
                self._map = dict(json.loads(self.path.read_text(encoding="utf-8")))
            except (OSError, ValueError) as exc:
                log.warning("%s is unreadable (%s); starting with default threads", self.path, exc)

    def get(self, key: str) -> str:
        with self._lock:
            return self._map.get(key, key)

    def renew(self, key: str) -> str:
        """Start a fresh thread for ``key``; its new thread id (the old thread stays stored, just not current)."""
        with self._lock:
            self._map[key] = f"{key}~{uuid.uuid4().hex[:8]}"
            self.path.parent.mkdir(parents=True, exist_ok=True)
            part = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex}.part")
            part.write_text(json.dumps(self._map, ensure_ascii=False, indent=0), encoding="utf-8")
            os.replace(part, self.path)
            return self._map[key]


# --- one turn at a time ---------------------------------------------------------------------------
class TurnQueue:
    """At most one turn in flight per thread (FIFO: a second message waits for the first), and at most
    ``concurrency`` Agent calls overall (the Agent computes one at a time anyway). Waiting happens in the event
    loop; the calls run in worker threads of the queue's own, so the loop never blocks."""

    def __init__(self, concurrency: int = 1):
        self._executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="stackwise-turn")
        self._gate: asyncio.Semaphore | None = None
        self._concurrency = concurrency
        self._slots: dict[str, list] = {}   # key -> [asyncio.Lock, users]

    def waiting(self, key: str) -> int:
        """Turns of ``key`` running or queued."""
        return self._slots[key][1] if key in self._slots else 0

    @contextlib.asynccontextmanager
    async def turn(self, key: str | None) -> AsyncIterator[None]:
        """Hold ``key``'s turn while the block runs (None: nothing to hold). Enter it before the handler's first
        await, so turns of one thread start in the order their messages arrived."""
        if key is None:
            yield
            return
        slot = self._slots.setdefault(key, [asyncio.Lock(), 0])
        slot[1] += 1
        try:
            async with slot[0]:
                yield
        finally:
            slot[1] -= 1
            if slot[1] == 0:
                self._slots.pop(key, None)

    @contextlib.asynccontextmanager
    async def _computing(self) -> AsyncIterator[None]:
        if self._gate is None:
            self._gate = asyncio.Semaphore(self._concurrency)
        async with self._gate:
            yield

    async def call(self, key: str | None, fn: Callable[..., T], /, *args: Any, hold: bool = True,
                   **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` (blocking) in a worker thread, in ``key``'s turn (``hold=False``: the caller
        already holds it)."""
        async with self.turn(key if hold else None), self._computing():
            return await asyncio.get_running_loop().run_in_executor(self._executor, partial(fn, *args, **kwargs))

    async def stream(self, agent: Any, text: str, *, thread_id: str, user_id: str, approve: bool | None = None,
                     on_event: Callable[[dict], Awaitable[None]] | None = None, key: str | None = None,
                     hold: bool = True) -> Any:
        """Run ``agent.stream`` in ``key``'s turn (default: the thread id; ``hold=False``: the caller already holds
        it); ``on_event`` gets every step/tool/pending event in the loop as it happens (its failures are logged,
        never fatal). Returns the ``Reply``; raises what the turn raised."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def pump() -> None:
            try:
                for event in agent.stream(text, thread_id=thread_id, user_id=user_id, approve=approve):
                    loop.call_soon_threadsafe(queue.put_nowait, ("event", event))
            except BaseException as exc:  # handed to the loop, re-raised there
                loop.call_soon_threadsafe(queue.put_nowait, ("error", exc))
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, ("done", None))

        reply = None
        async with self.turn((key or thread_id) if hold else None), self._computing():
            worker = loop.run_in_executor(self._executor, pump)
            while True:
                kind, item = await queue.get()
                if kind == "done":
                    break
                if kind == "error":
                    await worker
                    raise item
                if item.get("type") == "reply":
                    reply = item["reply"]
                elif on_event is not None:
                    try:
                        await on_event(item)
                    except Exception:
                        log.exception("showing progress of %s failed", thread_id)
            await worker
        if reply is None:
            raise RuntimeError(f"the turn of {thread_id} ended without a reply")
        return reply

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


# --- uploads --------------------------------------------------------------------------------------
class UploadError(Exception):
    """An upload we refuse (kind, size, empty): ``message`` is for the user."""

    def __init__(self, type: str, message: str):  # noqa: A002
        super().__init__(message)
        self.type, self.message = type, message


@dataclass(frozen=True)
class SavedUpload:
    name: str        # what the user types to refer to it ("explain churn in churn.csv")
    path: Path
    bytes: int

    @property
    def ingestable(self) -> bool:
        return self.path.suffix.lower() in INGESTABLE_SUFFIXES


def uploads_dir(agent: Any, user_id: str) -> Path:
    """The folder the tools resolve ``user_id``'s relative file names in."""
    return agent.toolbox.context(user_id).uploads_dir


def upload_name(filename: str | None, suffixes: tuple[str, ...] = UPLOAD_SUFFIXES) -> str:
    """The sanitised name an upload is saved under; ``UploadError`` when it is not a kind we take."""
    from bots.http_guard import safe_filename

    name = safe_filename(filename)
    if not name.lower().endswith(suffixes):
        raise UploadError("unsupported_file", f"I can take {', '.join(s.lstrip('.').upper() for s in suffixes)} "
                          f"files; {name!r} is not one of them.")
    return name


def save_user_upload(agent: Any, user_id: str, filename: str | None, source: Any, *, limit: int,
                     suffixes: tuple[str, ...] = UPLOAD_SUFFIXES) -> SavedUpload:
    """Save ``source`` (bytes or a binary file object) as ``filename`` (sanitised) in ``user_id``'s uploads folder,
    replacing an earlier file of that name; ``UploadError`` for a refused kind, an empty or too large file."""
    from bots.http_guard import save_upload
    from bots.http_schemas import ApiError

    name = upload_name(filename, suffixes)
    folder = uploads_dir(agent, user_id)
    try:
        size = save_upload(io.BytesIO(source) if isinstance(source, bytes | bytearray) else source, folder, name, limit)
    except ApiError as exc:
        raise UploadError(exc.kind, exc.message) from None
    return SavedUpload(name=name, path=folder / name, bytes=size)


# --- a reply in pieces ----------------------------------------------------------------------------
@dataclass(frozen=True)
class ReplyParts:
    """What a chat shows of a ``Reply``: the answer, the trace, sources, pictures, files, a confirmation."""

    thread_id: str
    answer: str
    steps: list = field(default_factory=list)        # agent.reply.Step
    citations: list = field(default_factory=list)    # agent.reply.Citation
    images: list = field(default_factory=list)       # agent.reply.Attachment (kind image, an image file)
    documents: list = field(default_factory=list)    # agent.reply.Attachment (reports, other files)
    pending: Any = None                              # agent.reply.Pending


def reply_parts(reply: Any) -> ReplyParts:
    """Split ``reply``'s attachments into images and documents; files that no longer exist are left out (logged)."""
    images, documents = [], []
    for att in reply.attachments:
        if not Path(att.path).is_file():
            log.warning("attachment %s of %s is missing; not sent", att.path, reply.thread_id)
        elif att.kind == "image" and att.path.lower().endswith(IMAGE_SUFFIXES):
            images.append(att)
        else:
            documents.append(att)
    return ReplyParts(thread_id=reply.thread_id, answer=reply.answer, steps=list(reply.steps),
                      citations=list(reply.citations), images=images, documents=documents, pending=reply.pending)


# --- splitting ------------------------------------------------------------------------------------
def utf16_len(text: str) -> int:
    """Length in UTF-16 code units (how Telegram counts): ``utf16_len("😀") == 2``."""
    return len(text.encode("utf-16-le")) // 2


_BREAKS = ("\n\n", "\n", "。", "! ", "? ", ". ", "；", "，", "; ", ", ", " ")


def split_text(text: str, limit: int, measure: Callable[[str], int] = len) -> list[str]:
    """``text`` in chunks of at most ``limit`` (by ``measure``), cut at the last paragraph break, else line
    break (that keeps a chunk at least a quarter full), else sentence end, else space (half full) — else
    wherever it must.
    Whitespace at the cuts is dropped; nothing else is."""
    if limit < 1:
        raise ValueError("limit must be at least 1")
    chunks, rest = [], text.strip()
    while rest:
        if measure(rest) <= limit:
            chunks.append(rest)
            break
        lo, hi = 1, len(rest)          # the longest prefix that fits: rest[:lo]
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if measure(rest[:mid]) <= limit else (lo, mid - 1)
        cut, skip = lo, 0
        for sep in _BREAKS:
            at = rest.rfind(sep, 0, lo)
            keep = sep.rstrip() if sep not in ("\n\n", "\n", " ") else ""
            share = 4 if sep.startswith("\n") else 2   # a line break may leave a chunk a quarter full
            if at > 0 and measure(rest[:at + len(keep)]) * share >= limit:
                cut, skip = at + len(keep), len(sep) - len(keep)
                break
        head = rest[:cut].rstrip()
        chunks.append(head or rest[:lo])
        rest = rest[cut + skip if head else lo:].lstrip()
    return chunks


# --- progress, throttled; the final text always arrives ---------------------------------------------
class EditThrottle:
    """Per chat: at most one edit every ``interval`` seconds, and none before a flood-control wait ends."""

    def __init__(self, interval: float = 1.0, *, clock: Callable[[], float] = time.monotonic):
        self.interval, self.clock = interval, clock
        self._next: dict[str, float] = {}

    def wait_s(self, chat: str) -> float:
        return max(0.0, self._next.get(chat, 0.0) - self.clock())

    def note_edit(self, chat: str) -> None:
        """An edit (or the post it edits) is going out now, or has just been answered."""
        now = self.clock()
        self._next[chat] = max(self._next.get(chat, 0.0), now + self.interval)
        if len(self._next) > 4096:   # forget chats that have been quiet for a while
            self._next = {c: t for c, t in self._next.items() if t > now}

    def note_retry_after(self, chat: str, seconds: float) -> None:
        self._next[chat] = max(self._next.get(chat, 0.0), self.clock() + seconds)


async def deliver(call: Callable[[], Awaitable[T]], retry_delay: RetryDelay, *, attempts: int = 6,
                  max_wait: float = 120.0) -> T:
    """Await ``call()``; on an error ``retry_delay`` gives a wait for (flood control), wait and try again."""
    for attempt in range(attempts):
        try:
            return await call()
        except Exception as exc:
            wait = retry_delay(exc)
            if wait is None or attempt == attempts - 1 or wait > max_wait:
                raise
            log.info("flood control: retrying in %.1f s (%s)", wait, exc)
            await asyncio.sleep(wait)
    raise AssertionError("unreachable")


class ProgressMessage:
    """One message showing a running turn, edited through an ``EditThrottle``: posted only when the turn is still
    running after ``grace`` seconds, then edited to the latest text at most once per interval (an edit refused
    by flood control is skipped and the latest text shown when the wait is over). ``close()`` removes it: the
    answer itself is sent as a new message with ``deliver`` (so the user is notified, and a dropped edit can
    never lose it)."""

    def __init__(self, chat: str, throttle: EditThrottle, *, send: Callable[[str], Awaitable[Any]],
                 edit: Callable[[Any, str], Awaitable[Any]], delete: Callable[[Any], Awaitable[Any]] | None,
                 retry_delay: RetryDelay, grace: float = 1.0):
        self.chat, self.throttle = chat, throttle
        self._send, self._edit, self._delete, self._retry_delay = send, edit, delete, retry_delay
        self.grace, self.handle, self.edits = grace, None, 0
        self._latest = self._shown = ""
        self._task: asyncio.Task | None = None
        self._closed = self._busy = False

    def update(self, text: str) -> None:
        """Show ``text`` when the throttle allows (never blocks)."""
        if self._closed or text == self._latest:
            return
        self._latest = text
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        if self.handle is None:
            await asyncio.sleep(self.grace)
            if self._closed:
                return
            try:
                self._busy = True
                self.handle = await self._send(self._latest)
                self._shown = self._latest
                self.throttle.note_edit(self.chat)
            except Exception as exc:
                self._skip(exc, "posting progress")
                return
            finally:
                self._busy = False
        while not self._closed and self._latest != self._shown:
            await asyncio.sleep(self.throttle.wait_s(self.chat))
            if self._closed or self.throttle.wait_s(self.chat) > 0:
                continue
            text = self._latest
            self.throttle.note_edit(self.chat)
            try:
                self._busy = True
                await self._edit(self.handle, text)
                self.throttle.note_edit(self.chat)   # counted from the answer too: a slow call never bunches edits
                self._shown, self.edits = text, self.edits + 1
            except Exception as exc:
                if not self._skip(exc, "editing progress"):
                    return
            finally:
                self._busy = False

    def _skip(self, exc: Exception, what: str) -> bool:
        """Note a failed progress call; True when it was flood control (try again after the wait)."""
        wait = self._retry_delay(exc)
        if wait is not None:
            self.throttle.note_retry_after(self.chat, wait)
            log.info("%s in %s: flood control, next try in %.1f s", what, self.chat, wait)
            return True
        log.warning("%s in %s failed: %s", what, self.chat, exc)
        return False

    async def close(self) -> None:
        """Stop showing progress and delete the message, if one was posted (best effort)."""
        self._closed = True
        if self._task is not None:
            if not self._busy:   # waiting: stop now; mid-call: let it finish, or a posted message would be orphaned
                self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.handle is not None and self._delete is not None:
            try:
                await deliver(partial(self._delete, self.handle), self._retry_delay, attempts=3, max_wait=10)
            except Exception as exc:
                log.info("could not delete the progress message in %s: %s", self.chat, exc)


# --- job announcements ----------------------------------------------------------------------------
def announce_jobs(agent: Any, loop: asyncio.AbstractEventLoop, announce: Callable[[dict], Awaitable[Any]], *,
                  user_id: str | None = None, poll_s: float = 5.0, timeout_s: float = 120.0) -> Any:
    """Watch the agent's channel for ended jobs (``Agent.watch_jobs``) and run ``announce(notice)`` on ``loop``
    for each — thread-safely, waiting for it so a failure is logged by the watcher. ``stop()`` the result."""
    def on_notice(notice: dict) -> None:
        asyncio.run_coroutine_threadsafe(announce(notice), loop).result(timeout_s)

    return agent.watch_jobs(on_notice, user_id=user_id, poll_s=poll_s)


# --- when things go wrong -------------------------------------------------------------------------
def error_text(exc: BaseException, *, lang: str = "en", where: str = "a message") -> str:
    """What to tell the user about ``exc``: its message when it is one they can act on (bad input, a store or
    jobs error, a refused upload), else a short apology — and the traceback goes to the log."""
    from bots.commands import known_error

    if isinstance(exc, UploadError):
        return exc.message
    known = known_error(exc) if isinstance(exc, Exception) else None
    if known is not None:
        log.info("%s: %s (%s)", where, known[1], known[0])
        return known[1]
    log.error("handling %s failed", where, exc_info=exc)
    return APOLOGY.get(lang, APOLOGY["en"])


def memory_action(agent: Any, action: str) -> Callable[..., Any] | None:
    """``Agent.memory_show`` / ``memory_forget`` once the memory feature has landed, else None."""
    fn = getattr(agent, f"memory_{action}", None)
    return fn if callable(fn) else None


__all__ = ["APOLOGY", "IMAGE_SUFFIXES", "INGESTABLE_SUFFIXES", "MEMORY_NOT_YET", "UPLOAD_SUFFIXES", "AccessList",
           "EditThrottle", "ProgressMessage", "ReplyParts", "SavedUpload", "ThreadBook", "TurnQueue", "UploadError",
           "announce_jobs", "deliver", "error_text", "memory_action", "parse_ids", "reply_parts", "save_user_upload",
           "split_text", "upload_name", "uploads_dir", "utf16_len"]


# --- small texts both bots show ------------------------------------------------------------------------


def size_text(n: int) -> str:
    """``1536`` → ``1.5 KB`` (uploads, limits)."""
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 1024:.1f} KB" if n >= 1024 else f"{n} bytes"


def upload_example(name: str) -> str:
    """A request that uses an uploaded file, to show after saving it."""
    low = name.lower()
    if low.endswith((".csv", ".parquet")):
        return f"which features drive the target in {name}?"
    if low.endswith(".jsonl"):
        return f"fine-tune Qwen2.5-0.5B on {name}"
    return f"what does {name} say about …?"


def describe_facts(facts: Any, line: Callable[[str, str], str] = lambda key, shown: f"• {key}: {shown}") -> str:
    """A memory listing (``Agent.memory_show``: one dict per fact — key, kind, data, said…) as lines;
    ``line(key, shown)`` formats one in the channel's markup."""
    if isinstance(facts, str) or not facts:
        return facts or ""
    lines = []
    for fact in facts:
        if not isinstance(fact, dict):
            lines.append(f"• {fact}")
            continue
        shown = fact.get("said") or fact.get("text") or fact.get("data")
        if isinstance(shown, dict):
            shown = ", ".join(f"{k} {v}" for k, v in shown.items())
        lines.append(line(str(fact.get("key") or fact.get("kind")), str(shown)))
    return "\n".join(lines)
