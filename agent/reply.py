"""The ``Reply`` of one turn — the public contract of ``ask --json``, ``Agent.ask`` and the HTTP API."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

StepKind = Literal["plan", "route", "tool", "observe", "reflect", "answer"]


class Step(BaseModel):
    kind: StepKind
    text: str


class ToolCall(BaseModel):
    tool: str
    args: Any = None
    ok: bool
    result: Any = None
    error: dict[str, str] | None = None


class Citation(BaseModel):
    id: str
    title: str
    source: str = ""


class Attachment(BaseModel):
    kind: Literal["image", "file"]
    path: str
    caption: str = ""


class Pending(BaseModel):
    id: str
    tool: str
    args: dict[str, Any]
    preview: str


class Reply(BaseModel):
    thread_id: str
    answer: str
    steps: list[Step] = Field(default_factory=list)
    tool_calls: list[ToolCall] = Field(default_factory=list)
    citations: list[Citation] = Field(default_factory=list)
    attachments: list[Attachment] = Field(default_factory=list)
    pending: Pending | None = None

    @property
    def ok(self) -> bool:
        """False when a tool failed or the turn was refused (the CLI exits 1)."""
        return all(c.ok for c in self.tool_calls)
