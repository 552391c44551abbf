"""The brain's graph: understand → route → (advance ⇄ confirm)* → reflect → respond.

``advance`` is the *act* step: it runs the plan's calls one per visit, in the order the user asked;
a call with side effects first passes its preflight and then waits in ``confirm`` (a LangGraph
``interrupt``) for an explicit yes or no.

Nodes are verbs that return partial state. ``build_graph`` returns the uncompiled builder, so
tests and LangGraph Studio (``langgraph.json``) compile it with the checkpointer they want.
The brain (``agent.brains``) fills *route* and *respond*; everything else is shared. A brain with
``route_turn(state)`` plans the whole turn itself, and with ``continues(state)`` is routed again once
the calls settle (the llm brain: call → observe → call again → answer).
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any, Literal

from langgraph.config import get_store
from langgraph.graph import END, START, StateGraph
from langgraph.types import interrupt

from agent.language import clean_text, detect_language, split_steps
from agent.state import PlannedCall, TurnState
from tools.base import ToolError
from tools.registry import ToolRegistry, call_record

log = logging.getLogger(__name__)


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
        lang = detect_language(text, previous=state.get("lang"))
        lang, noted = _take_in(text, lang, state.get("user_id"))
        steps = split_steps(text)
        trace = [_step("plan", self.brain.plan_text(steps, lang)), *noted]
        return {"text": text, "lang": lang, "steps_text": steps, "trace": trace,
                "messages": [{"role": "user", "content": text}]}

    def route(self, state: TurnState) -> dict:
        route_turn = getattr(self.brain, "route_turn", None)
        if route_turn is not None:   # a brain that plans the whole turn itself (the llm brain)
            return route_turn(state)
        return route_steps(self.brain, state)

    def advance(self, state: TurnState) -> dict:
        """Run the next call of the plan, in order; a side-effect call first gets a preflight and
        waits for ``confirm``. Read-only calls before it have run, so the pending reply shows them."""
        plan = [dict(c) for c in state["plan"]]
        trace = list(state["trace"])
        update: dict = {"plan": plan, "trace": trace}
        call = next((c for c in plan if c.get("status") in ("planned", "approved")), None)
        if call is None:
            return update
        tool = self.registry.get(call["tool"])
        ctx = self.make_context(state)
        if tool.side_effects and call["status"] == "planned":
            try:
                preflight = self.registry.preflight(tool.name, call["args"], ctx)
            except ToolError as exc:
                call["status"] = "failed"
                call["record"] = call_record(tool.name, call["args"], ok=False, error=exc.to_dict())
                trace.append(_step("tool", self.brain.tool_text(call["record"], state["lang"])))
                self._remember_question(state, call, update)
                return update
            call["status"] = "awaiting"
            call["preview"] = self.brain.preview_text(tool, call["args"], preflight, state["lang"])
            return update
        record = self.registry.call(call["tool"], call["args"], ctx)
        call["record"] = record
        call["status"] = "done" if record["ok"] else "failed"
        trace.append(_step("tool", self.brain.tool_text(record, state["lang"])))
        if not record["ok"]:
            self._remember_question(state, call, update)
        if record["ok"]:
            result = record["result"] if isinstance(record["result"], dict) else {}
            update["attachments"] = [*(state.get("attachments") or []), *result.get("attachments", [])]
            cites = result.get("citations")
            update["citations"] = [*(state.get("citations") or []), *(cites if isinstance(cites, list) else [])]
            memo = dict(state.get("memo") or {})
            _remember(memo, call["tool"], record)
            update["memo"] = memo
        return update

    def _remember_question(self, state: TurnState, call: dict, update: dict) -> None:
        """A failed call whose answer asks for a missing value: the next short reply may supply it."""
        question = self.brain.open_question(call, call["record"])
        if question:
            update["memo"] = {**(state.get("memo") or {}), "asked": question}

    def confirm(self, state: TurnState) -> dict:
        """Stop the graph until the user says yes or no; only a resume can answer (never message text)."""
        plan = [dict(c) for c in state["plan"]]
        call = next(c for c in plan if c.get("status") == "awaiting")
        held = [f"{c['tool']} {json.dumps(c['args'], ensure_ascii=False)}" for c in plan
                if c.get("status") == "planned" and c is not call]
        request = {"id": f"confirm-{call.get('confirm_id') or uuid.uuid4().hex[:8]}", "tool": call["tool"],
                   "args": call["args"], "preview": call["preview"], "notice": state.get("notice"),
                   "held": held}
        answer = interrupt(request)
        approved = bool(answer.get("approve")) if isinstance(answer, dict) else answer is True
        call["status"] = "approved" if approved else "declined"
        if not approved:
            call["record"] = call_record(call["tool"], call["args"], ok=False, error={
                "type": "declined", "message": "Not run: you declined the confirmation."})
        trace = [*state["trace"], _step("reflect", self.brain.decision_text(call["tool"], approved, state["lang"]))]
        # The notice (e.g. "the earlier pending action was dropped") was shown with the question.
        # The thread's history gets the question and the answer, between the request and the result.
        said = ("是" if approved else "否") if state["lang"] == "zh" else ("yes" if approved else "no")
        exchange = [{"role": "assistant", "content": call["preview"]}, {"role": "user", "content": said}]
        return {"plan": plan, "trace": trace, "notice": None, "messages": exchange}

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


def route_steps(brain: Any, state: TurnState) -> dict:
    """Route each step of the message on its own (the local brain; the llm brain's fallback)."""
    memo = dict(state.get("memo") or {})
    plan: list[PlannedCall] = []
    trace = list(state["trace"])
    asked, memo["asked"] = memo.get("asked"), None
    if asked and len(state["steps_text"]) == 1:
        # Last turn ended with a question ("which column is the target?"): a short reply answers it.
        call = brain.answer_question(state["steps_text"][0], state["lang"], asked)
        if call is not None:
            trace.append(_step("route", brain.route_text(call, state["lang"])))
            return {"plan": [call], "trace": trace, "memo": memo}
    for step in state["steps_text"]:
        call = brain.route_step(step, state["lang"], memo, state.get("user_id"))
        plan.append(call)
        trace.append(_step("route", brain.route_text(call, state["lang"])))
    return {"plan": plan, "trace": trace, "memo": memo}


def _take_in(text: str, lang: str, user_id: str | None) -> tuple[str, list[dict[str, str]]]:
    """With a store (``compile(store=…)``): keep the facts the message states about its writer (user memory) and
    answer in the language they asked for; the facts kept are shown as a step. A failing store costs the memory,
    never the turn."""
    try:
        store = get_store()
    except RuntimeError:       # not running inside a graph
        store = None
    if store is None or not user_id:
        return lang, []
    from memory.fact_text import describe
    from memory.user_memory import UserMemory

    try:
        lang, learned = UserMemory(store).read_message(user_id, text, lang)
    except Exception as exc:   # shown in the trace and logged; the turn goes on without memory
        log.warning("user memory unavailable: %s", exc)
        return lang, [_step("observe", f"memory unavailable: {exc}")]
    if not learned:
        return lang, []
    facts = "; ".join(describe(f["kind"], f["data"], lang) for f in learned)
    return lang, [_step("observe", ("记住：" if lang == "zh" else "remembered: ") + facts)]


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


def next_node(state: TurnState) -> Literal["confirm", "advance", "reflect"]:
    """After routing or a call: ask, run the next call, or reflect when every call is settled."""
    plan = state.get("plan", [])
    if any(c.get("status") == "awaiting" for c in plan):
        return "confirm"
    if any(c.get("status") in ("planned", "approved") for c in plan):
        return "advance"
    return "reflect"


def build_graph(brain: Any, registry: ToolRegistry, make_context: Any) -> StateGraph:
    """The uncompiled graph; compile it with a checkpointer (and a store, for user memory)."""
    nodes = TurnNodes(brain, registry, make_context)
    g = StateGraph(TurnState)
    for name in ("understand", "route", "advance", "confirm", "reflect", "respond"):
        g.add_node(name, getattr(nodes, name))
    continues = getattr(brain, "continues", None)

    def after(state: TurnState) -> Literal["confirm", "advance", "route", "reflect"]:
        node = next_node(state)
        if node == "reflect" and continues is not None and continues(state):
            return "route"   # the llm brain observes the settled calls, then calls again or answers
        return node

    g.add_edge(START, "understand")
    g.add_edge("understand", "route")
    for node in ("route", "advance", "confirm"):
        g.add_conditional_edges(node, after, ["confirm", "advance", "route", "reflect"])
    g.add_edge("reflect", "respond")
    g.add_edge("respond", END)
    return g

