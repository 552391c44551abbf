"""The terminal REPL (`stackwise chat`), used as a person would: through a pseudo-terminal, plus fast checks
of ``run_repl`` with a scripted fake agent and a captured console."""

from __future__ import annotations

import io
import os
import re
import time
from pathlib import Path
from types import SimpleNamespace

import pexpect
import pytest
from rich.console import Console

from agent import InputError
from agent.reply import Reply
from bots.repl import run_repl

# Fine-tune requests in these conversations name a local model and data set (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("ft_workdir")

PROMPT = "you › "
START_TIMEOUT = 120  # the first start loads the router's embedder
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


# --- through a pseudo-terminal, against the real agent ------------------------------------------

@pytest.fixture
def chat(tmp_path, stackwise_home, stackwise_bin):
    """Start ``stackwise chat --user alice`` in a pty; returns a function so a test can start it again."""
    home = stackwise_home
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), "STACKWISE_HOME": str(home),
        "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false", "TERM": "xterm", "NO_COLOR": "1", "COLUMNS": "120", "LANG": "C.UTF-8",
    }
    children = []

    def start(user: str = "alice") -> pexpect.spawn:
        child = pexpect.spawn(stackwise_bin, ["chat", "--user", user], env=env, encoding="utf-8", timeout=60,
                              dimensions=(40, 120))
        children.append(child)
        child.expect(PROMPT, timeout=START_TIMEOUT)
        return child

    start.home = home
    yield start
    for child in children:
        if child.isalive():
            child.terminate(force=True)


def say(child: pexpect.spawn, line: str) -> str:
    """Send one line and return what the REPL printed before the next prompt."""
    child.sendline(line)
    child.expect(PROMPT)
    return plain(child.before)


def plain(text: str) -> str:
    """What the user reads: no colour codes, no carriage returns."""
    return ANSI.sub("", text).replace("\r", "")


def ends(child: pexpect.spawn) -> int:
    child.expect(pexpect.EOF)
    child.close()
    return child.exitstatus


@pytest.mark.slow
def test_banner_help_tools_and_quit(chat):
    child = chat()
    banner = plain(child.before)
    assert "stackwise" in banner and "cli:alice" in banner and "/help" in banner
    shown = say(child, "/help")
    for command in ("/new", "/tools", "/history", "/quit"):
        assert command in shown
    assert "QLoRA" in shown  # an example question
    tools = say(child, "/tools")
    assert "embedding_distance" in tools
    finetune = next(line for line in tools.splitlines() if "launch_finetune" in line)
    assert finetune.rstrip().endswith("[asks first]")
    assert "[asks first]" not in next(line for line in tools.splitlines() if "embedding_distance" in line)
    child.sendline("/quit")
    assert ends(child) == 0
    assert "Goodbye" in plain(child.before)


@pytest.mark.slow
def test_chit_chat_streams_steps_before_the_answer(chat):
    child = chat()
    shown = say(child, "hi")
    assert "explain" in shown and "fine-tune" in shown
    assert shown.index("route:") < shown.index("explain a concept")
    child.sendeof()
    assert ends(child) == 0


@pytest.mark.slow
def test_side_effect_turn_asks_first_and_no_declines(chat):
    child = chat()
    shown = say(child, "fine-tune Qwen2.5-0.5B on data.jsonl with lora rank 8")
    assert "Fine-tune Qwen2.5-0.5B on data.jsonl" in shown
    assert "(yes / no)" in shown
    shown = say(child, "no")
    assert "did not run launch_finetune" in shown
    assert "failed" not in shown  # declining is the user's choice, not an error
    child.sendline("/quit")
    assert ends(child) == 0


@pytest.mark.slow
def test_thread_and_line_history_survive_a_restart(chat):
    child = chat()
    say(child, "hi")
    child.sendline("/quit")
    assert ends(child) == 0
    history_file = chat.home / "repl_history"
    assert "hi" in history_file.read_text(encoding="utf-8").splitlines()

    child = chat()
    shown = say(child, "/history")
    assert "you: hi" in shown
    assert "stackwise: Hi! I'm stackwise" in shown
    new = say(child, "/new")
    assert "cli:alice:" in new
    assert "no messages" in say(child, "/history")
    child.sendline("/exit")
    assert ends(child) == 0


@pytest.mark.slow
def test_bad_input_is_one_clear_line_and_the_repl_goes_on(chat):
    child = chat()
    # Ctrl-V Ctrl-A makes readline insert a literal \x01 instead of jumping to the line start.
    shown = say(child, "abc\x16\x01def")
    assert "control character" in shown
    assert "Traceback" not in shown
    assert "/help" in say(child, "/frobnicate")
    assert "I keep no facts about you" in say(child, "/memory")
    assert "no fine-tune jobs yet" in say(child, "/jobs")
    assert say(child, "   ").strip() == ""  # a blank line is no turn
    child.send("half a thought")
    child.expect("thought")  # echoed: readline has the line
    # A person pauses before Ctrl-C. Without the pause, on a loaded machine the signal can land while
    # CPython's readline is still redrawing (not waiting in select), and readline only notices it at
    # the next key press — a CPython race, not ours.
    time.sleep(0.5)
    child.sendintr()  # Ctrl-C at the prompt throws the line away
    child.expect(PROMPT)
    assert "line cleared" in plain(child.before) and "plan:" not in plain(child.before)
    shown = say(child, "hi")
    assert "explain a concept" in shown and "half a thought" not in shown
    child.sendline("/quit")
    assert ends(child) == 0


@pytest.mark.slow
def test_ctrl_d_exits_zero(chat):
    child = chat()
    child.sendeof()
    assert ends(child) == 0
    assert "Goodbye" in plain(child.before)
    assert (chat.home / "repl_history").exists()


# --- run_repl with a fake agent: fast, no pty ----------------------------------------------------

class FakeAgent:
    """Just the surface the REPL uses; ``turns`` maps a message to a generator function of events."""

    def __init__(self, home: Path, turns: dict):
        self.settings = SimpleNamespace(home=home)
        self.turns = turns
        self.messages: list[dict] = []
        self.seen: list[tuple[str, str, str]] = []

    def stream(self, text, *, thread_id=None, user_id="local"):
        self.seen.append((text, thread_id, user_id))
        return self.turns[text]()

    def tools(self):
        return [{"name": "embedding_distance", "description": "Embed texts.\nAnd more.", "side_effects": False},
                {"name": "launch_finetune", "description": "Launch a job. Asks.", "side_effects": True}]

    def history(self, thread_id, *, user_id="local"):
        return self.messages


def session(agent: FakeAgent, *lines, thread_id=None, out: io.StringIO | None = None) -> tuple[int, str]:
    """Run the REPL over ``lines`` (a string, or an exception to raise at the prompt); then Ctrl-D."""
    out = out or io.StringIO()
    console = Console(file=out, width=100, highlight=False)
    pending = list(lines)

    def read(prompt: str) -> str:
        out.write(prompt)
        if not pending:
            raise EOFError
        item = pending.pop(0)
        if isinstance(item, type) and issubclass(item, BaseException):
            raise item
        out.write(item + "\n")
        return item

    code = run_repl(agent, user_id="alice", thread_id=thread_id, input_fn=read, console=console)
    return code, out.getvalue()


def reply(answer: str, **fields) -> dict:
    return {"type": "reply", "reply": Reply(thread_id="t", answer=answer, **fields)}


def test_steps_are_printed_as_they_arrive_before_the_answer(tmp_path):
    out = io.StringIO()
    printed_before_answer = []

    def turn():
        yield {"type": "step", "kind": "route", "text": 'embedding_distance {"texts": ["[a]", "b"]}'}
        printed_before_answer.append(out.getvalue())
        yield reply("cosine [bold]0.68[/bold]")

    agent = FakeAgent(tmp_path, {"compare": turn})
    code, shown = session(agent, "compare", out=out)
    assert code == 0
    assert 'route: embedding_distance {"texts": ["[a]", "b"]}' in printed_before_answer[0]
    assert "0.68" not in printed_before_answer[0]
    assert "cosine [bold]0.68[/bold]" in shown  # user text is printed as is, never as markup
    assert agent.seen == [("compare", "cli:alice", "alice")]


def test_attachments_failures_and_pending_are_shown(tmp_path):
    def turn():
        yield {"type": "pending", "pending": {"id": "c1", "tool": "launch_finetune", "args": {}, "preview": "Go?"}}
        yield reply("Here.", attachments=[{"kind": "image", "path": "/tmp/p.png", "caption": "PCA plot"}],
                    tool_calls=[{"tool": "shap_report", "ok": False, "error": {"type": "bad_csv", "message": "x"}}],
                    pending={"id": "c1", "tool": "launch_finetune", "args": {}, "preview": "Fine-tune X on d.jsonl"})

    code, shown = session(FakeAgent(tmp_path, {"plot": turn}), "plot")
    assert "📎 /tmp/p.png — PCA plot" in shown
    assert "shap_report failed (bad_csv)" in shown
    assert "Fine-tune X on d.jsonl" in shown and "(yes / no)" in shown


def test_user_errors_and_ctrl_c_keep_the_session_going(tmp_path):
    from memory.checkpoints import StoreError

    def refused():
        raise InputError("invalid_message", "The message contains a control character.")
        yield  # a generator, like Agent.stream

    def broken_db():
        raise StoreError("The thread database is damaged.")
        yield

    def slow():
        yield {"type": "step", "kind": "plan", "text": "thinking"}
        raise KeyboardInterrupt  # Ctrl-C while waiting for the turn

    def fine():
        yield reply("still here")

    turns = {"bad\x01": refused, "db": broken_db, "slow": slow, "ok": fine}
    code, shown = session(FakeAgent(tmp_path, turns), "bad\x01", "db", "slow", "", "   ", "ok")
    assert code == 0
    assert "✗ The message contains a control character." in shown
    assert "✗ The thread database is damaged." in shown
    assert "Stopped waiting" in shown
    assert "still here" in shown and "Goodbye" in shown
    assert "Traceback" not in shown


def test_commands(tmp_path):
    agent = FakeAgent(tmp_path, {})
    agent.messages = [{"role": "user", "content": "hi [there]"}, {"role": "assistant", "content": "hello"}]
    code, shown = session(agent, "/tools", "/history", "/memory", "/Frobnicate", "/new", "/quit", "never read")
    assert code == 0
    assert "Embed texts." in shown and "And more" not in shown
    assert next(line for line in shown.splitlines() if "launch_finetune" in line).endswith("[asks first]")
    assert "you: hi [there]" in shown and "stackwise: hello" in shown
    assert "keeps no user memory" in shown   # an agent without memory_show
    assert "Unknown command /frobnicate" in shown
    assert "New thread cli:alice:" in shown
    assert agent.seen == []  # commands never start a turn


def test_ctrl_c_twice_at_the_prompt_exits(tmp_path):
    code, shown = session(FakeAgent(tmp_path, {}), KeyboardInterrupt, KeyboardInterrupt, "never read")
    assert code == 0
    assert "line cleared" in shown and "Goodbye" in shown


def test_thread_given_on_the_command_line_is_used(tmp_path):
    agent = FakeAgent(tmp_path, {"q": lambda: iter([reply("a")])})
    code, shown = session(agent, "q", thread_id="project-x")
    assert "thread project-x" in shown
    assert agent.seen == [("q", "project-x", "alice")]
