"""The REPL's commands about the user's account with the bot: what it keeps about them (``/memory``,
``/forget``) and which brain answers (``/model``). A mixin of :class:`bots.repl.Repl` (it uses the REPL's
``agent``, ``user_id``, ``console``, ``input``, ``say`` and ``error``)."""

from __future__ import annotations

from pathlib import Path

from rich.markup import escape as _escape
from rich.text import Text


class AccountCommands:
    """``/memory``, ``/forget``, ``/model``."""

    def cmd_memory(self) -> None:
        """Everything kept about this user: each fact with its key and the words it came from, and the threads."""
        show = getattr(self.agent, "memory_show", None)
        if show is None:
            self.say("[yellow]This agent keeps no user memory.[/yellow]")
            return
        try:
            facts = show(self.user_id)
            threads = getattr(self.agent, "threads", lambda user: [])(self.user_id)
        except Exception as exc:
            self.error(exc)
            return
        if not facts:
            self.say("[dim](I keep no facts about you — tell me, e.g. \"my GPU is an RTX 4090 with 24 GB\")[/dim]")
        for fact in facts:
            self.console.print(Text.assemble((f"  [{fact['key']}] ", "bold"), _fact_text(fact)), emoji=False)
            self.console.print(Text(f"      you said: {fact.get('said', '')}", style="dim"), emoji=False)
        if threads:
            self.console.print(Text(f"  threads: {', '.join(t['thread_id'] for t in threads)}", style="dim"),
                               emoji=False)
        self.say("[dim]/forget KEY deletes one fact, /forget all facts, /forget all also the threads[/dim]")

    def cmd_forget(self, arg: str = "") -> None:
        """Delete one fact (``/forget KEY``), all facts (``/forget``), or facts, threads and line history
        (``/forget all``) — from disk, not just from view."""
        forget = getattr(self.agent, "memory_forget", None)
        if forget is None:
            self.say("[yellow]This agent keeps no user memory.[/yellow]")
            return
        everything = arg.lower() in ("all", "everything")
        try:
            if arg and not everything:
                if not forget(self.user_id, arg):
                    self.say(f"[yellow]No fact {_escape(arg)} — /memory lists the keys.[/yellow]")
                    return
                self.say(f"Forgot [bold]{_escape(arg)}[/bold] (deleted from disk).")
                return
            facts = forget(self.user_id)
            threads = self.agent.forget_threads(self.user_id) if everything else 0
        except Exception as exc:
            self.error(exc)
            return
        if everything:
            self.forget_line_history()
            self.say(f"Deleted {facts} fact(s), {threads} thread(s) and this terminal's line history (from disk).")
        else:
            self.say(f"Deleted {facts} fact(s) (from disk). Your threads are kept; /forget all deletes them too.")

    def forget_line_history(self) -> None:
        """The REPL's own record of what was typed (readline history and its file)."""
        if self.input is input:
            try:
                import readline

                readline.clear_history()
            except ImportError:
                pass
        history = Path(self.agent.settings.home) / "repl_history"
        history.unlink(missing_ok=True)

    def cmd_model(self, arg: str = "") -> None:
        """Which brain answers: ``/model URL NAME`` (an OpenAI-compatible endpoint, e.g. a fine-tune served by vLLM),
        ``/model local``, or ``/model`` to see the current one."""
        use = getattr(self.agent, "use_model", None)
        if use is None:
            self.say("[yellow]This agent cannot switch models.[/yellow]")
            return
        parts = arg.split()
        try:
            if not parts:
                self.say(f"Answering with [bold]{_escape(self.agent.brain_label)}[/bold]. "
                         "[dim]/model URL NAME switches (e.g. /model http://127.0.0.1:8000/v1 ft-12), "
                         "/model local goes back.[/dim]")
                return
            if parts == ["local"]:
                label = self.agent.use_local_brain()
                self.say(f"Back to the [bold]{_escape(label)}[/bold] brain (offline).")
                return
            if len(parts) != 2:
                self.say("[yellow]Usage: /model URL NAME (e.g. /model http://127.0.0.1:8000/v1 ft-12), "
                         "or /model local.[/yellow]")
                return
            label = use(parts[0], parts[1])
        except Exception as exc:
            self.error(exc)
            return
        self.say(f"Now answering with [bold]{_escape(label)}[/bold] at {_escape(parts[0])}. When it fails, the local "
                 "brain answers that turn and says so; /model local goes back.")


def _fact_text(fact: dict) -> str:
    from memory.fact_text import describe

    return describe(fact.get("kind", "note"), fact.get("data") or {}, "en")
