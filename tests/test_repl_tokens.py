"""The REPL prints the llm brain's answer tokens as they arrive, and the final answer only when it differs."""

from __future__ import annotations

import io
from types import SimpleNamespace

from rich.console import Console

from agent.reply import Reply
from bots.repl import run_repl


class TokenAgent:
    def __init__(self, home, turns):
        self.settings = SimpleNamespace(home=home)
        self.turns = turns

    def stream(self, text, *, thread_id=None, user_id="local"):
        return iter(self.turns[text])


def run(agent, *lines) -> str:
    out, pending = io.StringIO(), list(lines)

    def read(prompt: str) -> str:
        if not pending:
            raise EOFError
        return pending.pop(0)

    assert run_repl(agent, user_id="alice", input_fn=read, console=Console(file=out, width=100)) == 0
    return out.getvalue()


def test_tokens_stream_and_the_same_answer_is_not_printed_twice(tmp_path):
    same = [{"type": "step", "kind": "plan", "text": "one step"},
            {"type": "token", "text": "LoRA adds "}, {"type": "token", "text": "low-rank adapters."},
            {"type": "step", "kind": "answer", "text": "done"},
            {"type": "reply", "reply": Reply(thread_id="t", answer="LoRA adds low-rank adapters.")}]
    checked = [{"type": "token", "text": "The distance is 0.93"},
               {"type": "reply", "reply": Reply(thread_id="t", answer="cosine similarity 0.68")}]
    shown = run(TokenAgent(tmp_path, {"a": same, "b": checked}), "a", "b")
    assert shown.count("LoRA adds low-rank adapters.") == 1
    assert "LoRA adds low-rank adapters.\n  · answer: done" in shown     # the step starts on its own line
    assert "The distance is 0.93" in shown and "cosine similarity 0.68" in shown   # the checked answer wins
