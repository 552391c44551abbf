"""The llm brain: any OpenAI-compatible model routes and answers; the graph still runs tools and asks first.

It fits the graph the local brain fits, with two additions the graph looks for:

- ``route_turn(state)`` — one model call per visit. Tool calls become planned calls of the plan (the
  graph's ``advance`` runs them; one with side effects stops in ``confirm`` whatever the model says);
  a text reply becomes the answer once its numbers are checked against the tool results.
- ``continues(state)`` — after the calls settle, route again so the model observes the results and
  calls again or answers (call → observe → call again → answer), at most ``llm_max_steps`` model calls.

The model's reasoning is the trace (``plan`` for the first call, ``reflect`` after results), never the
answer. When the endpoint fails twice (or refuses), the local brain takes the turn over and the trace
says so. Everything not about routing or answering — previews, step texts, template answers — is the
local brain's, so both brains read alike.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage

from agent import templates as T
from agent import trials
from agent.brains.llm_client import ChatClient, LLMError
from agent.brains.llm_grounding import ungrounded_numbers, with_sources
from agent.brains.llm_prompt import conversation, rounds_of, system_prompt, tool_specs
from agent.brains.local import LocalBrain, make_local_brain
from agent.settings import Settings, SettingsError
from agent.slots import extract_slots, fill_args
from agent.state import PlannedCall, TurnState

log = logging.getLogger(__name__)
MAX_CALLS_PER_REPLY = 8         # more tool calls than this in one model reply are dropped (runaway guard)
EVAL_STUB = json.dumps({"ok": True, "result": {"note": "Routing evaluation: the tool was not run. Call any other "
                                                       "tool the request needs, or answer."}})


def _step(kind: str, text: str) -> dict[str, str]:
    return {"kind": kind, "text": text}


def check_llm_settings(settings: Settings) -> None:
    """Raise a :class:`SettingsError` that says what to set when the llm brain cannot be used."""
    missing = []
    if not settings.llm_model:
        missing.append("STACKWISE_LLM_MODEL (the model name, e.g. gpt-4o-mini, deepseek-chat, qwen2.5:7b)")
    if not settings.llm_base_url and not settings.llm_api_key:
        missing.append("OPENAI_BASE_URL (your endpoint, e.g. http://localhost:11434/v1 for Ollama) or, for "
                       "OpenAI itself, OPENAI_API_KEY")
    if missing:
        raise SettingsError("The llm brain is not configured: set " + " and ".join(missing) +
                            " — or use the local brain (--brain local, or unset STACKWISE_BRAIN).")
    url = settings.llm_base_url
    if url and not url.startswith(("http://", "https://")):
        raise SettingsError(f"OPENAI_BASE_URL must be an http(s) URL such as http://localhost:8000/v1, not {url!r}")


def make_llm_brain(toolbox: Any, router_embedder: Any = None) -> LLMBrain:
    """The llm brain for a :class:`~agent.toolbox.Toolbox`, with the local brain behind it for fallback."""
    settings = toolbox.settings
    check_llm_settings(settings)
    registry = toolbox.registry
    client = ChatClient(model=settings.llm_model, base_url=settings.llm_base_url, api_key=settings.llm_api_key,
                        timeout_s=settings.llm_timeout_s, tools=tool_specs(registry), known_tools=set(registry.names()))
    return LLMBrain(make_local_brain(toolbox, router_embedder), client, max_steps=settings.llm_max_steps)


def _token_sink() -> Any:
    """A function that sends ``{"type": "token", "text"}`` to the graph's custom stream (None outside a run)."""
    from langgraph.config import get_stream_writer

    try:
        write = get_stream_writer()
    except RuntimeError:
        return None
    return lambda text: write({"type": "token", "text": text})


def model_calls(plan: list[PlannedCall]) -> int:
    """Model calls made so far in this turn (each llm entry records the count when it was planned)."""
    return max((c["llm"]["calls"] for c in plan if c.get("llm")), default=0)


class LLMBrain:
    name = "llm"

    def __init__(self, local: LocalBrain, client: ChatClient, *, max_steps: int = 6):
        self.local = local
        self.registry = local.registry
        self.client = client
        self.max_steps = max_steps
        # Learnt from the first reply with reasoning_content: then the prompt stops asking for <think>.
        self.native_reasoning = False

    @property
    def label(self) -> str:
        return f"llm · {self.client.model_name}"

    # --- route ---------------------------------------------------------------------------------
    def route_turn(self, state: TurnState) -> dict:
        """One model call: plan its tool calls, or take its answer; the local brain when the model fails."""
        from agent.graph import route_steps

        lang = state["lang"]
        plan = [dict(c) for c in state.get("plan") or []]
        trace = list(state["trace"])
        if not plan and state.get("notice") == T.NOTHING_PENDING.get(lang):
            return self.local.route_turn(state)        # a bare "yes" with nothing pending (or a trial's full run)
        if not plan and self._memory_command(state):
            return route_steps(self.local, state)      # remember / forget / show: done by memory, the same every time
        if not plan and trials.wants_full_run(state["text"]):
            return self.local.route_turn(state)        # "run the full job": the trial's spec, from the job store
        try:
            turn = self.client.complete(self.messages(state, plan), on_token=_token_sink())
        except LLMError as exc:
            return self._fall_back(state, plan, trace, exc)
        calls = model_calls(plan) + 1
        self.native_reasoning = self.native_reasoning or turn.native_reasoning
        if turn.reasoning:
            trace.append(_step("plan" if calls == 1 else "reflect", turn.reasoning))
        update: dict[str, Any] = {"plan": plan, "trace": trace}
        if calls == 1:
            update["memo"] = {**(state.get("memo") or {}), "asked": None}   # the model reads the thread itself
        if turn.tool_calls:
            self._plan_calls(state, plan, trace, turn, calls)
            return update
        lookups = self._missed_lookups(state, plan)
        if lookups and calls < self.max_steps:
            self._plan_lookups(plan, trace, lookups, calls)
            return update
        update["answer"] = self._checked_answer(state, plan, trace, turn.content)
        return update

    def continues(self, state: TurnState) -> bool:
        """Whether the model should see the settled calls and go on (the graph then routes again)."""
        plan = state.get("plan") or []
        if state.get("answer") or not plan or not all(c.get("llm") for c in plan):
            return False
        return model_calls(plan) < self.max_steps

    def messages(self, state: TurnState, plan: list[PlannedCall]) -> list:
        system = system_prompt(self.registry, state["lang"], ask_reasoning=not self.native_reasoning,
                               facts=self._facts(state.get("user_id")))
        return conversation(state, plan, system)

    def _memory_command(self, state: TurnState) -> bool:
        """A one-step message that tells memory what to keep, forget or show (not a question about facts)."""
        from memory.intents import memory_intent

        steps = state.get("steps_text") or []
        if self.local.memory is None or not state.get("user_id") or len(steps) != 1:
            return False
        intent = memory_intent(steps[0])
        return intent is not None and intent[0] in ("remember", "forget", "show", "other_users")

    def _facts(self, user_id: str | None) -> list[dict]:
        """What the user told us (for the prompt); a memory that cannot be read costs the facts, not the turn."""
        if self.local.memory is None or not user_id:
            return []
        try:
            return self.local.memory().show(user_id)
        except Exception as exc:
            log.warning("cannot read the memory of %s for the model: %s", user_id, exc)
            return []

    def _plan_calls(self, state: TurnState, plan: list, trace: list, turn: Any, calls: int) -> None:
        round_no = len(rounds_of(plan)) + 1
        wanted = turn.tool_calls
        if len(wanted) > MAX_CALLS_PER_REPLY:
            trace.append(_step("reflect", f"The model asked for {len(wanted)} tool calls at once; "
                                          f"only the first {MAX_CALLS_PER_REPLY} run."))
            wanted = wanted[:MAX_CALLS_PER_REPLY]
        for i, call in enumerate(wanted):
            plan.append({"step": state["text"], "tool": call["name"], "args": call["args"], "score": 1.0,
                         "status": "planned", "record": None, "why": f"model {self.client.model_name}",
                         "llm": {"round": round_no, "id": call["id"], "calls": calls,
                                 "said": turn.content if i == 0 else ""}})
            text = f"{call['name']} {json.dumps(call['args'], ensure_ascii=False)} (model {self.client.model_name})"
            if round_no > 1 and self.registry.get(call["name"]).side_effects:
                text += " — asked for after reading tool results: check it is what you want"
            trace.append(_step("route", text))
        if calls >= self.max_steps:
            trace.append(_step("reflect", f"Step budget reached ({self.max_steps} model calls): these calls run, "
                                          "then the answer comes from the templates."))

    def _missed_lookups(self, state: TurnState, plan: list) -> list[PlannedCall]:
        """Concept questions the model answered without explain_concept (the local router spots them; its
        router only — ``route_step`` may also note what the user says about themselves)."""
        if "explain_concept" not in self.registry or any(c.get("tool") == "explain_concept" for c in plan):
            return []
        tool = self.registry.get("explain_concept")
        lookups = []
        for step in state.get("steps_text") or [state["text"]]:
            slots = extract_slots(step, state["lang"])
            decision = self.local.router.route(step, slots)
            if decision.tool == tool.name:
                args = fill_args(tool.args_model, slots, state["lang"])
                lookups.append({"step": step, "tool": tool.name, "args": args, "score": decision.score})
        return lookups

    def _plan_lookups(self, plan: list, trace: list, lookups: list, calls: int) -> None:
        round_no = len(rounds_of(plan)) + 1
        for i, call in enumerate(lookups):
            plan.append({**call, "status": "planned", "record": None, "why": "a concept question: look it up first",
                         "llm": {"round": round_no, "id": f"lookup-{round_no}-{i}", "calls": calls, "said": ""}})
            trace.append(_step("route", f"explain_concept {json.dumps(call['args'], ensure_ascii=False)} (the model "
                                        "answered a concept question without looking it up; look it up first)"))

    def _checked_answer(self, state: TurnState, plan: list, trace: list, text: str) -> str:
        records = [c["record"] for c in plan if c.get("record")]
        answer = text
        if records:
            sources = [state.get("text", ""), *[{"args": r.get("args"), "result": r.get("result"),
                                                  "error": r.get("error")} for r in records]]
            bad = ungrounded_numbers(text, sources)
            if bad:
                trace.append(_step("reflect", f"The model's answer has numbers no tool returned ({', '.join(bad[:5])});"
                                              " the template answer is used instead."))
                return self._template(state, plan)
            answer = with_sources(answer, list(state.get("citations") or []), state["lang"])
        return "\n\n".join(p for p in (state.get("notice"), answer) if p)

    def _template(self, state: TurnState, plan: list) -> str:
        return self.local.compose({**state, "plan": plan}) or T.chat_reply(state.get("text", ""), state["lang"])

    def _fall_back(self, state: TurnState, plan: list, trace: list, exc: LLMError) -> dict:
        from agent.graph import route_steps

        tried = "after one retry" if exc.retryable else "and a retry would not help"
        note = (f"The model endpoint failed ({exc.kind}: {exc.message}) {tried}; "
                "the local brain answers this turn.")
        if not any(c.get("llm") for c in plan):
            update = route_steps(self.local, state)
            head = len(state["trace"])
            update["trace"] = [*update["trace"][:head], _step("reflect", note), *update["trace"][head:]]
            return update
        trace.append(_step("reflect", note))
        return {"plan": plan, "trace": trace, "answer": self._template(state, plan)}

    # --- routing eval ----------------------------------------------------------------------------
    def predict_calls(self, text: str) -> list[dict]:
        """The tool calls the model makes for ``text`` (no tool runs: each gets a stub result); raises
        :class:`LLMError` when the endpoint fails, so an eval never scores an outage as wrong answers."""
        from agent.language import clean_text, detect_language

        text = clean_text(text)
        system = system_prompt(self.registry, detect_language(text), ask_reasoning=not self.native_reasoning)
        messages: list = [SystemMessage(system), HumanMessage(text)]
        made: list[dict] = []
        for _ in range(self.max_steps):
            turn = self.client.complete(messages)
            fresh = [c for c in turn.tool_calls if {"tool": c["name"], "args": c["args"]} not in made]
            if not fresh:
                break
            made += [{"tool": c["name"], "args": c["args"]} for c in fresh]
            messages.append(AIMessage(content=turn.content, tool_calls=[
                {"name": c["name"], "args": c["args"], "id": c["id"], "type": "tool_call"} for c in fresh]))
            messages += [ToolMessage(content=EVAL_STUB, tool_call_id=c["id"]) for c in fresh]
        return made

    def route_step(self, step: str, lang: str, memo: dict, user_id: str | None = None) -> PlannedCall:
        return self.local.route_step(step, lang, memo, user_id)

    def answer_question(self, step: str, lang: str, asked: dict) -> PlannedCall | None:
        return self.local.answer_question(step, lang, asked)

    def open_question(self, call: PlannedCall, record: dict) -> dict | None:
        return self.local.open_question(call, record) if call.get("tool") in self.registry else None

    # --- texts and answers: the local brain's words, so both brains read alike ---------------------
    def plan_text(self, steps: list[str], lang: str) -> str:
        model = self.client.model_name
        if lang == "zh":
            return f"请模型 {model} 推理、调用工具并回答；每次调用和结果都会列出。"
        return f"Ask the model {model} to reason, call tools and answer; every call and result is listed."

    def route_text(self, call: PlannedCall, lang: str) -> str:
        return self.local.route_text(call, lang)

    def preview_text(self, tool: Any, args: dict, preflight: dict | None, lang: str) -> str:
        return self.local.preview_text(tool, args, preflight, lang)

    def decision_text(self, tool: str, approved: bool, lang: str) -> str:
        return self.local.decision_text(tool, approved, lang)

    def tool_text(self, record: dict, lang: str) -> str:
        return self.local.tool_text(record, lang)

    def observe_text(self, record: dict, lang: str) -> str:
        return self.local.observe_text(record, lang)

    def reflect_text(self, plan: list[PlannedCall], lang: str) -> str:
        return self.local.reflect_text(plan, lang)

    def answer_step_text(self, lang: str) -> str:
        if lang == "zh":
            return "给出回答（数字和来源已对照工具结果检查）。"
        return "Answer, with numbers and sources checked against the tool results."

    def compose(self, state: TurnState) -> str:
        """The checked model answer, or the template answer (fallback, step budget spent)."""
        return state.get("answer") or self.local.compose(state)

    def compose_settled(self, plan: list[PlannedCall], lang: str) -> str:
        return self.local.compose_settled(plan, lang)
