"""The terminal REPL behind ``stackwise chat``: read a line, stream the turn's steps, print the answer.

Line editing and history come from the stdlib :mod:`readline` (history kept in ``$STACKWISE_HOME/repl_history``);
everything else goes through one rich ``Console``. The REPL only talks to ``Agent`` (stream, tools, history),
and a user error in a turn is one red line — the session keeps going.

Example:
    >>> run_repl(agent, user_id="alice")                     # doctest: +SKIP
    stackwise · thread cli:alice · /help for commands
    you › what is QLoRA?
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape as _escape
from rich.text import Text

from bots.repl_account import AccountCommands

PROMPT = "you › "
JOB_POLL_S = 5.0
HISTORY_LENGTH = 1000
EXAMPLES = (
    "what is QLoRA?",
    "how similar are 'king' and 'queen'?",
    "fine-tune Qwen2.5-0.5B on data.jsonl with lora rank 8",
)
LATER: dict[str, str] = {}
HELP = (
    ("/help", "this list"),
    ("/new", "start a fresh thread"),
    ("/tools", "what I can do, and which tools ask before they act"),
    ("/history", "the messages of this thread"),
    ("/memory", "what I keep about you: facts you told me, and your threads"),
    ("/forget", "/forget KEY deletes one fact, /forget all facts, /forget all also your threads and line history"),
    ("/jobs", "your fine-tune jobs (their end is announced here as it happens)"),
    ("/model", "/model URL NAME chats with a served model (e.g. your fine-tune), /model local goes back"),
    ("/quit", "leave (also /exit or Ctrl-D)"),
)

log = logging.getLogger(__name__)


class _Quit(Exception):
    """Raised by a command (or Ctrl-D) to end the session."""


def _readline_input(history_file: Path) -> tuple[Callable[[str], str], Callable[[], None]]:
    """``input`` with line editing and a persistent history, plus the function that saves it."""
    try:
        import readline
    except ImportError:  # no readline on this platform: plain input, no history
        return input, lambda: None
    readline.set_history_length(HISTORY_LENGTH)
    try:
        readline.read_history_file(history_file)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("could not read the REPL history %s: %s", history_file, exc)

    def save() -> None:
        try:
            history_file.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(history_file)
        except OSError as exc:
            log.warning("could not save the REPL history %s: %s", history_file, exc)

    return input, save


class Repl(AccountCommands):
    """One terminal session: a thread, a console and the commands."""

    def __init__(self, agent: Any, *, user_id: str, thread_id: str | None, input_fn: Callable[[str], str],
                 console: Console):
        self.agent = agent
        self.user_id = user_id
        self.thread_id = thread_id or f"cli:{user_id}"
        self.input = input_fn
        self.console = console
        self.commands: dict[str, Callable[[], None]] = {
            "/help": self.cmd_help, "/new": self.cmd_new, "/tools": self.cmd_tools, "/history": self.cmd_history,
            "/quit": self.cmd_quit, "/exit": self.cmd_quit, "/jobs": self.cmd_jobs, "/memory": self.cmd_memory,
        }
        self.watcher: Any = None
        self.streamed = ""      # answer tokens printed so far this turn
        self.midline = False    # the last token left the cursor mid-line

    # --- the loop ----------------------------------------------------------------------------
    def run(self) -> int:
        self.say(f"[bold]stackwise[/bold] · thread [cyan]{_escape(self.thread_id)}[/cyan] · /help for commands")
        self.start_watching()
        try:
            return self.loop()
        finally:
            if self.watcher is not None:
                self.watcher.stop()

    def start_watching(self, poll_s: float = JOB_POLL_S) -> None:
        """Announce this user's fine-tunes launched from the terminal as they end (also those that ended
        while no REPL was open: the first look is at once)."""
        watch = getattr(self.agent, "watch_jobs", None)
        if watch is None:
            return
        try:
            self.watcher = watch(self.announce, user_id=self.user_id, poll_s=poll_s)
        except Exception as exc:   # a job store that cannot open must not keep anyone from chatting
            log.warning("not watching fine-tune jobs: %s", exc)

    def announce(self, notice: dict) -> None:
        self.console.print()
        self.console.print(Text(notice["text"], style="bold magenta"), emoji=False)
        for item in notice.get("attachments") or []:
            self.console.print(Text(f"  📎 {item.get('caption') or item['kind']}: {item['path']}", style="dim"),
                               emoji=False)

    def loop(self) -> int:
        interrupted = False
        while True:
            try:
                line = self.input(PROMPT)
            except KeyboardInterrupt:
                if interrupted:
                    return self.goodbye()
                interrupted = True
                self.say("\n[dim](line cleared — Ctrl-C again, Ctrl-D or /quit to leave)[/dim]")
                continue
            except EOFError:
                self.console.print()
                return self.goodbye()
            interrupted = False
            try:
                self.handle(line)
            except _Quit:
                return self.goodbye()

    def handle(self, line: str) -> None:
        """A command, a turn, or nothing (blank line)."""
        text = line.strip()
        if not text:
            return
        word = text.split()[0]
        if word.startswith("/") and "/" not in word[1:]:  # "/etc/passwd …" is a message, not a command
            if word.lower() == "/forget":
                self.cmd_forget(text[len(word):].strip())
                return
            if word.lower() == "/model":
                self.cmd_model(text[len(word):].strip())
                return
            self.command(word.lower())
        else:
            self.turn(line)

    def command(self, name: str) -> None:
        if name in self.commands:
            self.commands[name]()
        elif name in LATER:
            self.say(f"[yellow]{LATER[name]} arrives in a later version of stackwise.[/yellow]")
        else:
            self.say(f"[yellow]Unknown command {_escape(name)} — type /help for the list.[/yellow]")

    def goodbye(self) -> int:
        self.say("[dim]Goodbye![/dim]")
        return 0

    # --- one turn ----------------------------------------------------------------------------
    def turn(self, text: str) -> None:
        events = None
        try:
            events = self.agent.stream(text, thread_id=self.thread_id, user_id=self.user_id)
            for event in events:
                self.show(event)
        except KeyboardInterrupt:
            getattr(events, "close", lambda: None)()  # ends the turn's generator (and releases its lock)
            self.say("\n[yellow]Stopped waiting for this turn (Ctrl-C). Ask again when you are ready.[/yellow]")
        except Exception as exc:
            self.error(exc)

    def show(self, event: dict) -> None:
        kind = event.get("type")
        if kind == "token":          # the llm brain's answer as it is written
            if not self.midline:
                self.console.print()
            self.streamed += event["text"]
            self.midline = True
            self.console.print(event["text"], end="", markup=False, emoji=False, highlight=False)
            return
        if self.midline:
            self.console.print()
            self.midline = False
        if kind == "step":
            self.console.print(Text(f"  · {event['kind']}: {event['text']}", style="dim"), emoji=False)
        elif kind == "reply":
            self.show_reply(event["reply"])

    def show_reply(self, reply: Any) -> None:
        streamed, self.streamed = self.streamed, ""
        if streamed.strip() != reply.answer.strip():   # the checked answer differs from what streamed: show it
            self.console.print(reply.answer, markup=False, emoji=False)
        for att in reply.attachments:
            caption = f" — {att.caption}" if att.caption else ""
            self.console.print(f"📎 {att.path}{caption}", markup=False, emoji=False, soft_wrap=True)
        for call in reply.tool_calls:
            error = call.error or {}
            if not call.ok and error.get("type") != "declined":
                self.say(f"[red]✗ {_escape(call.tool)} failed ({_escape(error.get('type', 'error'))})[/red]")
        if reply.pending:
            if reply.pending.preview not in reply.answer:
                self.console.print(reply.pending.preview, markup=False, emoji=False)
            self.say("[bold yellow](yes / no)[/bold yellow] [dim]— answer in your next message (是 / 否)[/dim]")

    def error(self, exc: Exception) -> None:
        from bots.commands import known_error

        known = known_error(exc)
        if known is None:  # a bug: keep its traceback in the log, keep the session alive
            log.error("the turn failed with an unexpected error", exc_info=exc)
            self.say(f"[red]✗ internal error ({type(exc).__name__}): {_escape(str(exc))}[/red]")
        else:
            self.say(f"[red]✗ {_escape(known[1])}[/red]")

    # --- commands ----------------------------------------------------------------------------
    def cmd_help(self) -> None:
        """Commands and a few things to ask."""
        for name, what in HELP:
            self.say(f"  [bold]{name:<9}[/bold] {what}")
        self.say("Try asking:")
        for example in EXAMPLES:
            self.console.print(f"  {example}", markup=False, style="cyan")

    def cmd_new(self) -> None:
        """A fresh thread id; the old thread stays on disk."""
        self.thread_id = f"cli:{self.user_id}:{uuid.uuid4().hex[:8]}"
        self.say(f"New thread [cyan]{_escape(self.thread_id)}[/cyan] — earlier messages are not part of it.")

    def cmd_tools(self) -> None:
        """Each tool's name, what it does in one sentence (cut to the width), and whether it asks first."""
        for tool in self.agent.tools():
            name = f"  {tool['name']:<20} "
            mark = "  [asks first]" if tool.get("side_effects") else ""
            summary = Text(_first_sentence(tool.get("description") or ""))
            summary.truncate(max(12, self.console.width - len(name) - len(mark) - 1), overflow="ellipsis")
            self.console.print(Text.assemble((name, "bold"), summary, (mark, "yellow")), emoji=False)

    def cmd_history(self) -> None:
        """The messages of the current thread."""
        messages = self.agent.history(self.thread_id, user_id=self.user_id)
        if not messages:
            self.say(f"[dim](no messages in {_escape(self.thread_id)} yet)[/dim]")
        for message in messages:
            who = "you" if message.get("role") == "user" else "stackwise"
            self.console.print(Text.assemble((f"{who}: ", "bold"), str(message.get("content", ""))), emoji=False)

    def cmd_jobs(self) -> None:
        """This user's fine-tune jobs, newest first."""
        try:
            rows = self.agent.jobs().list(self.user_id, limit=20)
        except Exception as exc:
            self.error(exc)
            return
        if not rows:
            self.say("[dim](no fine-tune jobs yet — try: fine-tune Qwen2.5-0.5B on data.jsonl)[/dim]")
        for row in rows:
            step = f"{row['step']}/{row['total']}" if row.get("total") else "-"
            loss = f"loss {row['loss']:.3g}" if isinstance(row.get("loss"), int | float) else ""
            line = f"  {row['id']:<8} {row['status']:<11} {step:>9}  {loss:<11} {row.get('method') or ''} · " \
                   f"{row.get('base_model')} · {row.get('dataset')}"
            self.console.print(Text(line.rstrip()), emoji=False)
            if row.get("error"):
                self.console.print(Text(f"           {row['error']}", style="red"), emoji=False)

    def cmd_quit(self) -> None:
        """Leave the REPL."""
        raise _Quit

    def say(self, markup: str) -> None:
        self.console.print(markup, emoji=False)


def _first_sentence(description: str) -> str:
    """The first sentence of a docstring-style description, on one line.

    Example:
        >>> _first_sentence("Count the words in each text. Fast.")
        'Count the words in each text.'
    """
    paragraph = " ".join(description.strip().split("\n\n")[0].split())
    head, dot, _ = paragraph.partition(". ")
    return head + dot.strip()


def run_repl(agent: Any, *, user_id: str, thread_id: str | None = None,
             input_fn: Callable[[str], str] | None = None, console: Console | None = None) -> int:
    """Run the REPL until /quit, Ctrl-D or two Ctrl-C; returns the exit code (0).

    ``input_fn`` replaces the line reader (tests); without it, readline edits lines and keeps history.
    """
    console = console or Console(highlight=False)
    save = None
    if input_fn is None:
        input_fn, save = _readline_input(Path(agent.settings.home) / "repl_history")
    try:
        return Repl(agent, user_id=user_id, thread_id=thread_id, input_fn=input_fn, console=console).run()
    finally:
        if save is not None:
            save()
