"""The brain's graph: understand → route → confirm → act → reflect → respond.

Nodes are verbs that return partial state. ``build_graph`` returns the uncompiled builder, so
tests and LangGraph Studio (``langgraph.json``) compile it with the checkpointer they want.
The brain (``agent.brains``) fills *route* and *respond*; everything else is shared.
"""

from __future__ import annotations

import uuid
from typing import Any, Literal

from langgraph.graph import END, START, StateGraph
from langgraph.types import interrupt

from agent.language import clean_text, detect_language, split_steps
from agent.state import PlannedCall, TurnState
from tools.base import ToolContext, ToolError
from tools.registry import ToolRegistry, call_record


def _step(kind: str, text: str) -> dict[str, str]:
    return {"kind": kind, "text": text}


class TurnNodes:
    """The six nodes, bound to a brain, a registry and a way to build a tool context."""

    def __init__(self, brain: Any, registry: ToolRegistry, make_context: Any):
        self.brain = brain
        self.registry = registry
        self.make_context = make_context

    def understand(self, state: TurnState) -> dict:
        text = clean_text(state.get("text", ""))
        lang = detect_language(text)
        steps = split_steps(text)
        trace = [_step("plan", self.brain.plan_text(steps, lang))]
        return {"text": text, "lang": lang, "steps_text": steps, "trace": trace,
                "messages": [{"role": "user", "content": text}]}

    def route(self, state: TurnState) -> dict:
        memo = state.get("memo") or {}
        plan: list[PlannedCall] = []
        trace = list(state["trace"])
        for step in state["steps_text"]:
            call = self.brain.route_step(step, state["lang"], memo)
            plan.append(call)
            trace.append(_step("route", self.brain.route_text(call, state["lang"])))
        return {"plan": plan, "trace": trace}

    def confirm(self, state: TurnState) -> dict:
        """Validate and preflight side-effect calls, then stop for an explicit yes."""
        plan = [dict(c) for c in state["plan"]]
        trace = list(state["trace"])
        ctx = self.make_context(state)
        for call in plan:
            if not call.get("tool") or call.get("status") != "planned":
                continue
            tool = self.registry.get(call["tool"])
            if not tool.side_effects:
                continue
            try:
                preflight = self.registry.preflight(tool.name, call["args"], ctx)
            except ToolError as exc:
                call["status"] = "failed"
                call["record"] = call_record(tool.name, call["args"], ok=False, error=exc.to_dict())
                continue
            preview = self.brain.preview_text(tool, call["args"], preflight, state["lang"])
            request = {"id": f"confirm-{uuid.uuid4().hex[:8]}", "tool": tool.name, "args": call["args"],
                       "preview": preview}
            answer = interrupt(request)
            approved = bool(answer.get("approve")) if isinstance(answer, dict) else answer is True
            call["status"] = "approved" if approved else "declined"
            if not approved:
                call["record"] = call_record(tool.name, call["args"], ok=False, error={
                    "type": "declined", "message": "Not run: you declined the confirmation."})
            trace.append(_step("reflect", self.brain.decision_text(tool.name, approved, state["lang"])))
        return {"plan": plan, "trace": trace}

    def act(self, state: TurnState) -> dict:
        plan = [dict(c) for c in state["plan"]]
        trace = list(state["trace"])
        memo = dict(state.get("memo") or {})
        attachments = list(state.get("attachments") or [])
        citations = list(state.get("citations") or [])
        ctx = self.make_context(state)
        for call in plan:
            if not call.get("tool") or call.get("status") not in ("planned", "approved"):
                continue
            record = self.registry.call(call["tool"], call["args"], ctx)
            call["record"] = record
            call["status"] = "done" if record["ok"] else "failed"
            trace.append(_step("tool", self.brain.tool_text(record, state["lang"])))
            if record["ok"]:
                result = record["result"] if isinstance(record["result"], dict) else {}
                attachments.extend(result.get("attachments", []))
                citations.extend(result.get("citations", []) if isinstance(result.get("citations"), list) else [])
                _remember(memo, call["tool"], record)
        return {"plan": plan, "trace": trace, "memo": memo, "attachments": attachments, "citations": citations}

    def reflect(self, state: TurnState) -> dict:
        trace = list(state["trace"])
        for call in state["plan"]:
            record = call.get("record")
            if record is not None:
                trace.append(_step("observe", self.brain.observe_text(record, state["lang"])))
        note = self.brain.reflect_text(state["plan"], state["lang"])
        if note:
            trace.append(_step("reflect", note))
        return {"trace": trace}

    def respond(self, state: TurnState) -> dict:
        answer = self.brain.compose(state)
        trace = [*state["trace"], _step("answer", self.brain.answer_step_text(state["lang"]))]
        return {"answer": answer, "trace": trace, "pending": None,
                "messages": [{"role": "assistant", "content": answer}]}


def _remember(memo: dict, tool: str, record: dict) -> None:
    """What later turns may refer to ("its status", "that file")."""
    result = record.get("result") or {}
    args = record.get("args") or {}
    memo["last_tool"] = tool
    if isinstance(result, dict) and result.get("job_id"):
        memo["last_job_id"] = result["job_id"]
    for key in ("data", "dataset"):
        if isinstance(args, dict) and args.get(key):
            memo["last_file"] = args[key]
    if isinstance(args, dict) and args.get("texts"):
        memo["last_texts"] = args["texts"]


def needs_confirmation(nodes: TurnNodes) -> Any:
    def decide(state: TurnState) -> Literal["confirm", "act"]:
        for call in state.get("plan", []):
            if call.get("tool") in nodes.registry and nodes.registry.get(call["tool"]).side_effects:
                return "confirm"
        return "act"

    return decide


def build_graph(brain: Any, registry: ToolRegistry, make_context: Any) -> StateGraph:
    """The uncompiled graph; compile it with a checkpointer."""
    nodes = TurnNodes(brain, registry, make_context)
    g = StateGraph(TurnState)
    for name in ("understand", "route", "confirm", "act", "reflect", "respond"):
        g.add_node(name, getattr(nodes, name))
    g.add_edge(START, "understand")
    g.add_edge("understand", "route")
    g.add_conditional_edges("route", needs_confirmation(nodes), ["confirm", "act"])
    g.add_edge("confirm", "act")
    g.add_edge("act", "reflect")
    g.add_edge("reflect", "respond")
    g.add_edge("respond", END)
    return g


def default_context_factory(settings: Any, embedder_factory: Any) -> Any:
    def make(state: TurnState) -> ToolContext:
        return ToolContext(home=settings.home, user_id=state.get("user_id", "local"),
                           data_roots=tuple(settings.data_roots), lang=state.get("lang", "en"),
                           embedder=embedder_factory)

    return make
