"""The graph's state: what one turn carries, and what a thread remembers between turns."""

from __future__ import annotations

import operator
from typing import Annotated, Any, TypedDict


class PlannedCall(TypedDict, total=False):
    step: str                 # the part of the message this call answers
    tool: str | None          # None: chit-chat / help / nothing to run
    args: dict[str, Any]
    score: float
    status: str               # planned | approved | declined | failed | done
    record: dict[str, Any] | None   # the tool-call record once known


class TurnState(TypedDict, total=False):
    # Thread-long: the conversation and what later turns may refer to.
    messages: Annotated[list[dict[str, str]], operator.add]
    memo: dict[str, Any]      # last_job_id, last_file, last_texts, last_tool
    # This turn (the facade resets these with every new message).
    text: str
    user_id: str
    thread_id: str            # the thread as its channel names it (where a job's end is announced)
    channel: str              # cli, http, mcp, telegram, slack, python
    lang: str
    steps_text: list[str]
    plan: list[PlannedCall]
    trace: list[dict[str, str]]
    answer: str
    citations: list[dict[str, Any]]
    attachments: list[dict[str, Any]]
    pending: dict[str, Any] | None
    notice: str | None


def new_turn(text: str, user_id: str, notice: str | None = None, *, thread_id: str = "",
             channel: str = "python") -> dict[str, Any]:
    """The graph input for a fresh message: every per-turn field reset."""
    return {
        "text": text, "user_id": user_id, "thread_id": thread_id, "channel": channel, "steps_text": [], "plan": [],
        "trace": [],
        "answer": "", "citations": [], "attachments": [], "pending": None, "notice": notice,
    }
