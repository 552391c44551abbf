"""``Agent``: the one Python surface every channel talks to (ask, stream, resume, tools, call_tool)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any

from langgraph.types import Command

from agent import templates as T
from agent.brain_switch import BrainSwitch
from agent.graph import build_graph
from agent.language import detect_language
from agent.reply import Reply
from agent.settings import Settings
from agent.state import new_turn
from agent.toolbox import Toolbox
from memory.checkpoints import (
    StoreError,  # noqa: F401 - re-exported: channels catch agent.facade.StoreError
    as_store_error,
    close_checkpointer,
    open_checkpointer,
    thread_key,
)
from memory.retention import Retention
from tools.registry import ToolRegistry

if TYPE_CHECKING:
    from agent.jobs import JobsService, JobWatcher

_YES = re.compile(r"^(?:y|yes|yep|yeah|sure|ok|okay|confirm|confirmed|approve|go|go ahead|do it|launch|run it|"
                  r"是|是的|好|好的|确认|确定|可以|执行|同意|开始吧?)[.!。！\s]*$", re.IGNORECASE)
_NO = re.compile(r"^(?:n|no|nope|cancel|stop|abort|don'?t|do not|decline|reject|"
                 r"不|否|不要|不用|取消|算了|拒绝)[.!。！\s]*$", re.IGNORECASE)
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
log = logging.getLogger(__name__)


class InputError(ValueError):
    """A message we refuse before the turn starts (empty, too long, control characters)."""

    def __init__(self, type: str, message: str):  # noqa: A002
        super().__init__(message)
        self.type = type
        self.message = message


def approval_of(text: str) -> bool | None:
    """True for a bare yes, False for a bare no, None for anything else."""
    t = text.strip()
    if _YES.match(t):
        return True
    if _NO.match(t):
        return False
    return None


class Agent(BrainSwitch):
    """The brain behind every channel. Threads persist in ``$STACKWISE_HOME``."""

    def __init__(self, settings: Settings, *, registry: ToolRegistry | None = None,
                 checkpointer: Any = None, router_embedder: Any = None, channel: str = "python"):
        from agent.brains.local import make_local_brain

        if settings.brain == "llm":
            from agent.brains.llm import check_llm_settings, make_llm_brain

            check_llm_settings(settings)   # before anything opens: a clear message of what to set
        self.settings = settings
        self.channel = channel      # recorded with launched jobs: the channel that announces their end
        settings.home.mkdir(parents=True, exist_ok=True)
        self.toolbox = Toolbox(settings, registry)
        self.registry = self.toolbox.registry
        make_brain = make_llm_brain if settings.brain == "llm" else make_local_brain
        self.brain = make_brain(self.toolbox, router_embedder)
        self.checkpointer = checkpointer if checkpointer is not None else open_checkpointer(
            settings.threads_db, settings.database_url)
        # Bounded history: the last keep_checkpoints per thread; threads idle past thread_max_idle_days dropped.
        self.retention = Retention(self.checkpointer, keep=settings.keep_checkpoints,
                                   max_idle_days=settings.thread_max_idle_days)
        self.user_memory = self.toolbox.user_memory()
        self.graph = build_graph(self.brain, self.registry, self.toolbox.context_for_turn).compile(
            checkpointer=self.checkpointer, store=self.user_memory.store)
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings | None = None, **overrides: Any) -> Agent:
        return cls(settings or Settings.from_env(**overrides))

    # --- turns -------------------------------------------------------------------------------
    def check_input(self, text: Any) -> str:
        if not isinstance(text, str):
            raise InputError("invalid_message", "The message must be text.")
        bad = _CONTROL.search(text)
        if bad:
            raise InputError("invalid_message", f"The message contains a control character (code {ord(bad.group())}"
                             f" at position {bad.start()}); remove it and send again.")
        if not text.strip():
            raise InputError("empty_message", "The message is empty — ask me something, or type /help.")
        limit = self.settings.max_message_chars
        if len(text) > limit:
            raise InputError("message_too_long", f"The message has {len(text):,} characters; the limit is "
                             f"{limit:,}. Send a shorter message, or put long text in a file.")
        return text

    def _config(self, thread_id: str, user_id: str) -> dict:
        # Threads are keyed by user, so no user can open another's thread by guessing its id; the
        # length prefix keeps the key unambiguous whatever characters the two ids contain.
        # recursion_limit: the llm brain's call → observe → call again loop takes several graph steps per call.
        return {"configurable": {"thread_id": thread_key(user_id, thread_id)}, "recursion_limit": 250}

    def _pending_interrupts(self, config: dict, snap: Any = None) -> list:
        snap = snap if snap is not None else self.graph.get_state(config)
        return list(getattr(snap, "interrupts", ()) or ())

    def stream(self, text: str, *, thread_id: str | None = None, user_id: str = "local",
               approve: bool | None = None) -> Iterator[dict]:
        """Events of one turn as they happen: ``step`` (kind, text), ``tool`` (a call record, as soon as
        the tool returns), ``token`` (``text``: a piece of the llm brain's reply as the model writes it —
        reasoning excluded; the ``reply``'s answer is the checked, final text), ``pending`` (a confirmation
        request), and last ``reply`` (the ``Reply``). Consumers ignore event types they do not know.

        ``approve=True`` (``--yes``) answers every confirmation of this turn with yes.
        """
        text = self.check_input(text)
        thread_id = thread_id or f"t-{uuid.uuid4().hex[:12]}"
        config = self._config(thread_id, user_id)
        with self._lock, self._store_errors():
            yield from self._run_turn(text, thread_id, user_id, config, approve)

    @contextlib.contextmanager
    def _store_errors(self) -> Iterator[None]:
        """A database failure (SQLite or Postgres) surfaces as a clear :class:`StoreError`; others pass."""
        try:
            yield
        except Exception as exc:
            error = as_store_error(exc, self.settings.database_url or self.settings.threads_db)
            if error is None:
                raise
            raise error from None

    def _run_turn(self, text: str, thread_id: str, user_id: str, config: dict, approve: bool | None):
        before = self.graph.get_state(config)
        pending = self._pending_interrupts(config, before)
        decision = approval_of(text)
        seen = 0
        if pending and decision is not None:
            payload: Any = Command(resume={"approve": decision})
            seen = len(before.values.get("trace", []))  # these steps were streamed with the question
        else:
            notice = None
            lang = detect_language(text)
            if pending:
                notice = T.DROPPED[lang]
            elif decision is not None:
                notice = T.NOTHING_PENDING[lang]
            payload = new_turn(text, user_id, notice, thread_id=thread_id, channel=self.channel)
        shown: set[int] = set()
        # durability="exit": one checkpoint write per turn (or per interrupt) instead of one per node;
        # a crash mid-turn loses only that turn, never earlier history.
        while True:
            for mode, update in self.graph.stream(payload, config, stream_mode=["updates", "custom"],
                                                  durability="exit"):
                if mode == "custom":         # the brain's own events: tokens of the model's reply
                    if isinstance(update, dict) and update.get("type") == "token":
                        yield update
                    continue
                for node, part in update.items():
                    if node == "__interrupt__" or not isinstance(part, dict):
                        continue
                    trace = part.get("trace") or []
                    for step in trace[seen:]:
                        yield {"type": "step", **step}
                    seen = max(seen, len(trace))
                    if node == "advance":
                        for call in part.get("plan") or []:
                            record = call.get("record")
                            if record and call.get("status") in ("done", "failed") and id(record) not in shown:
                                shown.add(id(record))
                                yield {"type": "tool", "record": record}
            snap = self.graph.get_state(config)
            interrupts = self._pending_interrupts(config, snap)
            if interrupts and approve is not None:
                payload = Command(resume={"approve": approve})
                continue
            break
        self._retain(config["configurable"]["thread_id"])
        reply = self._reply(snap.values, thread_id, interrupts)
        if reply.pending:
            yield {"type": "pending", "pending": reply.pending.model_dump()}
        yield {"type": "reply", "reply": reply}

    def _retain(self, key: str) -> None:
        """Prune this thread's old checkpoints (the turn is saved already; a failure here only delays the pruning)."""
        try:
            self.retention.after_turn(key)
        except Exception as exc:
            if as_store_error(exc, self.settings.database_url or self.settings.threads_db) is None:
                raise
            log.warning("could not prune old checkpoints of a thread: %s", exc)

    def _reply(self, values: dict, thread_id: str, interrupts: list) -> Reply:
        lang = values.get("lang", "en")
        calls = [c["record"] for c in values.get("plan", []) if c.get("record")]
        pending = None
        answer = values.get("answer", "")
        if interrupts:
            request = interrupts[0].value
            pending = {"id": request["id"], "tool": request["tool"], "args": request["args"],
                       "preview": request["preview"]}
            settled = self.brain.compose_settled(values.get("plan", []), lang)
            parts = [request.get("notice"), settled, T.PENDING[lang].format(preview=request["preview"])]
            if request.get("held"):
                parts.append(T.HELD[lang] + "\n" + "\n".join(f"- {h}" for h in request["held"]))
            answer = "\n\n".join(p for p in parts if p)
        return Reply(thread_id=thread_id, answer=answer, steps=values.get("trace", []), tool_calls=calls,
                     citations=values.get("citations", []), attachments=values.get("attachments", []),
                     pending=pending)

    def ask(self, text: str, *, thread_id: str | None = None, user_id: str = "local",
            approve: bool | None = None) -> Reply:
        """Run one turn and return its ``Reply``."""
        reply = None
        for event in self.stream(text, thread_id=thread_id, user_id=user_id, approve=approve):
            if event["type"] == "reply":
                reply = event["reply"]
        assert reply is not None
        return reply

    async def astream(self, text: str, *, thread_id: str | None = None, user_id: str = "local",
                      approve: bool | None = None) -> AsyncIterator[dict]:
        """``stream`` for asyncio code: the turn runs in a worker thread, events arrive as they happen."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        def pump() -> None:
            try:
                for event in self.stream(text, thread_id=thread_id, user_id=user_id, approve=approve):
                    loop.call_soon_threadsafe(queue.put_nowait, event)
            except Exception as exc:  # handed to the consumer, re-raised there
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, done)

        worker = asyncio.create_task(asyncio.to_thread(pump))
        while True:
            item = await queue.get()
            if item is done:
                break
            if isinstance(item, Exception):
                raise item
            yield item
        await worker

    def resume(self, thread_id: str, approve: bool, *, user_id: str = "local") -> Reply:
        """Answer the thread's pending confirmation."""
        config = self._config(thread_id, user_id)
        with self._store_errors():
            if not self._pending_interrupts(config):
                lang = detect_language(self.graph.get_state(config).values.get("text", "") or "")
                return Reply(thread_id=thread_id, answer=T.NOTHING_PENDING[lang])
        return self.ask("yes" if approve else "no", thread_id=thread_id, user_id=user_id)

    def pending(self, thread_id: str, *, user_id: str = "local") -> dict | None:
        """The confirmation the thread waits for (``{"id", "tool", "args", "preview"}``, as in ``Reply.pending``),
        or None. It lives in the thread's checkpoint, so a channel can check a button against it after a restart."""
        with self._store_errors():
            interrupts = self._pending_interrupts(self._config(thread_id, user_id))
        if not interrupts:
            return None
        request = interrupts[0].value
        return {"id": request["id"], "tool": request["tool"], "args": request["args"], "preview": request["preview"]}

    def history(self, thread_id: str, *, user_id: str = "local") -> list[dict[str, str]]:
        with self._store_errors():
            return list(self.graph.get_state(self._config(thread_id, user_id)).values.get("messages", []))

    # --- tools -------------------------------------------------------------------------------
    def jobs(self) -> JobsService:
        """Fine-tune jobs (list, show, logs, cancel, resume) for channel commands such as ``/jobs``."""
        return self.toolbox.jobs()

    def watch_jobs(self, callback: Callable[[dict], None], *, user_id: str | None = None,
                   poll_s: float = 5.0) -> JobWatcher:
        """Announce the end of every job launched from this agent's channel (``user_id``'s only, or everyone's):
        ``callback(notice)`` runs in a daemon thread for each (see ``JobsService.notice``); ``stop()`` it."""
        return self.toolbox.jobs().watch(self.channel, callback, user=user_id, poll_s=poll_s)

    def tools(self) -> list[dict]:
        return self.toolbox.tools()

    def call_tool(self, name: str, args: Any, *, user_id: str = "local") -> dict:
        """Run one tool directly (no routing, no confirmation) and return its call record."""
        return self.toolbox.call_tool(name, args, user_id=user_id)

    def ingest(self, paths: list[str], *, user_id: str | None = None) -> dict:
        """Add documents to the knowledge base: a user's private part, or the shared one (``user_id=None``)."""
        return self.toolbox.ingest(paths, user_id=user_id)

    # --- user memory and threads (``/memory``, ``/forget``, ``stackwise memory``) ------------------
    def memory_show(self, user_id: str) -> list[dict]:
        """Everything kept about ``user_id``: one dict per fact (``key``, ``kind``, ``data``, ``said``, …)."""
        return self.user_memory.show(user_id)

    def memory_forget(self, user_id: str, key: str | None = None) -> int:
        """Delete one fact (``key``) or all of ``user_id``'s facts, from disk too; the number deleted."""
        return self.user_memory.forget(user_id, key)

    def remember(self, user_id: str, text: str) -> list[dict]:
        """Keep ``text`` (its facts, else a note) for ``user_id``; returns what was kept."""
        return self.user_memory.remember(user_id, text)

    def threads(self, user_id: str) -> list[dict]:
        """``user_id``'s threads: ``thread_id``, ``checkpoints``, ``last_active`` (unix time), newest first."""
        return [{k: t[k] for k in ("thread_id", "checkpoints", "last_active")}
                for t in self.retention.threads(user_id)]

    def forget_threads(self, user_id: str) -> int:
        """Delete all of ``user_id``'s threads (the conversations, from disk too); the number deleted."""
        with self._lock:
            return self.retention.delete_threads([t["key"] for t in self.retention.threads(user_id)])

    def close(self) -> None:
        self.toolbox.close()
        close_checkpointer(self.checkpointer)
