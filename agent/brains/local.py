"""The local brain: offline, deterministic, milliseconds. Fills *route* and *respond* of the graph.

Routing is the semantic router (``agent.router``) plus slot filling (``agent.slots``); answers
are bilingual templates filled with tool results (each tool may bring its own ``render``).
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

from agent import templates as T
from agent import trials
from agent.router import SemanticRouter, looks_like_question
from agent.slots import extract_slots, fill_args
from agent.state import PlannedCall, TurnState
from memory.facts import is_question
from memory.intents import memory_intent
from memory.recall import acknowledged, apply_profile, memory_call
from tools.base import Tool
from tools.registry import ToolRegistry

_FILE_FIELDS = ("data", "dataset")
# "the file I just sent" means the asker's newest upload of these kinds (what the channels accept).
_UPLOAD_SUFFIXES = (".csv", ".parquet", ".jsonl", ".json", ".md", ".pdf")
_UPLOAD_REFERENCE = re.compile(
    r"\b(?:the|that|this|my)\s+(?:\w+\s+)?(?:file|upload|csv|data ?set|dataset|document)\s+(?:I|we)\s+"
    r"(?:just\s+|have\s+just\s+|recently\s+)?(?:sent|uploaded|shared|attached|gave)\b"
    r"|\bmy\s+(?:latest|last|newest|new)\s+(?:upload|file)\b|\bthe\s+(?:latest|last|newest)\s+upload\b"
    r"|(?:刚才|刚刚|刚)(?:发|上传|传)的(?:文件|数据|表格|数据集)?|(?:我)?上传的(?:文件|数据|表格|数据集)",
    re.IGNORECASE)


# A question the router took for small talk goes to explain_concept when one of the asker's
# documents is at least this close to it (cosine, the knowledge base's embedder).
DOC_ROUTE_MIN = 0.35


def make_local_brain(toolbox: Any, router_embedder: Any = None) -> LocalBrain:
    """The local brain for a :class:`~agent.toolbox.Toolbox`: the semantic router on the configured
    multilingual embedder, and the toolbox's knowledge base for questions about the user's documents."""
    from agent.toolbox import embedder_factory

    settings = toolbox.settings
    embedder = router_embedder or embedder_factory(settings.router_model)
    router = SemanticRouter(list(toolbox.registry), embedder, threshold=settings.router_threshold,
                            cache_dir=settings.cache_dir)
    return LocalBrain(toolbox.registry, router, knowledge=toolbox.knowledge, memory=toolbox.user_memory,
                      uploads=lambda user_id: toolbox.context(user_id).uploads_dir, jobs=toolbox.jobs)


class LocalBrain:
    name = "local"

    def __init__(self, registry: ToolRegistry, router: SemanticRouter, knowledge: Any = None, memory: Any = None,
                 uploads: Any = None, jobs: Any = None):
        self.registry = registry
        self.jobs = jobs        # () -> JobsService: the user's trial job, for "run the full job"
        self.uploads = uploads  # (user_id) -> the user's upload folder, for "the file I just sent"
        self.router = router
        self.knowledge = knowledge
        self.memory = memory    # () -> UserMemory: what users told us about themselves

    # --- route -----------------------------------------------------------------------------
    def route_turn(self, state: TurnState) -> dict:
        """Route each step on its own (``route_steps``), then settle what steps say about each other: a trial's
        full run gets its lead line as the turn's notice (in place of "nothing is waiting for a yes")."""
        from agent.graph import route_steps

        update = route_steps(self, state)
        notice = trials.settle(update["plan"], state.get("notice"), state["lang"],
                               T.NOTHING_PENDING.get(state["lang"]))
        if notice != state.get("notice"):
            update["notice"] = notice
        return update

    def route_step(self, step: str, lang: str, memo: dict[str, Any], user_id: str | None = None) -> PlannedCall:
        routed_before, memo["routed_at"] = memo.get("routed_at"), time.time()
        if "launch_finetune" in self.registry:     # after a trial: "run the full job" (or "yes" to its offer)
            followup = trials.full_run_call(step, lang, memo, user_id, routed_before, self.jobs)
            if followup is not None:
                return followup
        intent = memory_intent(step) if self.memory is not None and user_id else None
        if intent is not None and intent[0] != "recall":
            return memory_call(step, self.memory(), user_id, intent, lang)
        # A question about what the user told us: a fact that clearly answers it wins over the router.
        answer = self.memory().answer(user_id, step, lang, sure=True) if intent is not None else None
        named = self._name_the_upload(step, user_id)      # "the file I just sent" → its name, for routing and slots
        slots = extract_slots(named, lang)
        decision = self.router.route(named, slots)
        if answer is None and self.memory is not None and user_id and decision.tool in (None, "explain_concept"):
            # A memory question the router took for small talk or a concept, or a plain statement of facts.
            # Worded as a memory question, or about the asker with nothing else to do: memory answers.
            if intent is not None and (intent[1] != "maybe" or decision.tool is None):
                answer = self.memory().answer(user_id, step, lang)
            if answer is None and not is_question(step):
                answer = acknowledged(self.memory(), user_id, step, lang)
        if answer is not None:
            action = "recall" if intent else "noted"
            return {"step": step, "tool": None, "args": {}, "score": 1.0, "status": "memory", "record": None,
                    "why": action, "memory": {"action": action, "answer": answer}}
        if decision.tool is None and "explain_concept" in self.registry and self._documents_answer(step, user_id):
            tool = self.registry.get("explain_concept")
            return {"step": step, "tool": tool.name, "args": fill_args(tool.args_model, slots, lang) | {"query": step},
                    "score": decision.score, "status": "planned", "record": None,
                    "why": decision.explain() + "; your documents answer it"}
        if decision.tool is None:
            return {"step": step, "tool": None, "args": {}, "score": decision.score, "status": "chat",
                    "record": None, "why": decision.explain()}
        tool = self.registry.get(decision.tool)
        args = fill_args(tool.args_model, slots, lang)
        amends = False
        if tool.name == "launch_finetune":
            if "sample_rows" in args and not {"base_model", "dataset"} & slots.keys() and memo.get("last_launch"):
                args, amends = {**memo["last_launch"], **args}, True   # "try it on 500 rows first": the launch shown
            memo["last_launch"] = {k: v for k, v in args.items() if k != "sample_rows"}
        self._resolve_references(tool, args, memo)
        why = decision.explain() + ("; a trial of the launch you asked for before" if amends else "")
        if self.memory is not None and user_id:
            why += "".join(f"; {n}" for n in apply_profile(self.memory(), user_id, tool, args, step))
        return {"step": step, "tool": tool.name, "args": args, "score": decision.score, "status": "planned",
                "record": None, "why": why, **({"amends": True} if amends else {})}

    def _documents_answer(self, step: str, user_id: str | None) -> bool:
        """Whether a question-shaped step is answered by the user's (or the shared) documents."""
        if self.knowledge is None or not looks_like_question(step):
            return False
        kb = self.knowledge()
        if not kb.has_documents(owner=user_id):
            return False
        hits = kb.search(step, k=1, owner=user_id, kinds=("doc",))
        return bool(hits) and (hits[0].dense or 0.0) >= DOC_ROUTE_MIN

    def open_question(self, call: PlannedCall, record: dict) -> dict | None:
        """The argument a failed call is missing, when the answer will ask the user for it.

        Convention: an ``invalid_args`` failure with a required field absent, or a tool's own
        ``missing_<field>`` / ``unknown_<field>`` error, names the field the user should supply.
        """
        tool = self.registry.get(call["tool"])
        kind = (record.get("error") or {}).get("type", "")
        field = None
        if kind == "invalid_args":
            missing = _missing_fields(tool, call.get("args") or {})
            field = missing[0] if missing else None
        elif kind.startswith(("missing_", "unknown_")):
            field = kind.split("_", 1)[1]
        if field not in tool.args_model.model_fields:
            return None
        return {"tool": tool.name, "args": dict(call.get("args") or {}), "field": field}

    def answer_question(self, step: str, lang: str, asked: dict) -> PlannedCall | None:
        """The asked-for call again, with ``step`` as the missing value — unless ``step`` is a new request."""
        if asked.get("tool") not in self.registry or len(step) > 120 or trials.wants_full_run(step):
            return None
        slots = extract_slots(step, lang)
        decision = self.router.route(step, slots)
        if decision.tool and decision.tool != asked["tool"] and decision.score >= self.router.threshold + 0.15:
            return None   # a fresh request, not an answer
        tool = self.registry.get(asked["tool"])
        field = asked["field"]
        value = fill_args(tool.args_model, slots, lang).get(field) or _bare_value(step)
        if not value:
            return None
        args = {**asked["args"], field: value}
        return {"step": step, "tool": tool.name, "args": args, "score": 1.0, "status": "planned",
                "record": None, "why": f"answers the question about {field}"}

    def _name_the_upload(self, step: str, user_id: str | None) -> str:
        """``step`` with "the file I just sent" / "刚才发的文件" replaced by the asker's newest upload's name (as if
        they had typed it), or unchanged when it points at no upload or they have none."""
        match = _UPLOAD_REFERENCE.search(step) if self.uploads is not None and user_id else None
        if match is None:
            return step
        try:
            files = [f for f in self.uploads(user_id).iterdir() if f.is_file() and f.suffix.lower() in _UPLOAD_SUFFIXES]
        except OSError:
            return step
        if not files:
            return step
        newest = max(files, key=lambda f: f.stat().st_mtime_ns).name
        return f"{step[:match.start()]} {newest} {step[match.end():]}".strip()

    @staticmethod
    def _resolve_references(tool: Tool, args: dict, memo: dict[str, Any]) -> None:
        """Fill what the text only points at ("that file", "its status") from the thread."""
        fields = tool.args_model.model_fields
        for name in _FILE_FIELDS:
            if name in fields and name not in args and memo.get("last_file"):
                args[name] = memo["last_file"]
        if "job_id" in fields and "job_id" not in args and memo.get("last_job_id"):
            required = fields["job_id"].is_required()
            if required:
                args["job_id"] = memo["last_job_id"]

    # --- trace texts ---------------------------------------------------------------------------
    @staticmethod
    def plan_text(steps: list[str], lang: str) -> str:
        if len(steps) == 1:
            return "理解请求，选择合适的工具。" if lang == "zh" else "Understand the request and pick a tool."
        listed = "; ".join(f"{i + 1}) {s}" for i, s in enumerate(steps))
        return f"分成 {len(steps)} 步：{listed}" if lang == "zh" else f"{len(steps)} steps: {listed}"

    @staticmethod
    def route_text(call: PlannedCall, lang: str) -> str:
        if call.get("memory"):
            return ("用户记忆：" if lang == "zh" else "user memory: ") + str(call.get("why"))
        if not call.get("tool"):
            return ("闲聊/帮助，不调用工具" if lang == "zh" else "chit-chat/help — no tool") + f" ({call.get('why')})"
        args = json.dumps(call["args"], ensure_ascii=False)
        return f"{call['tool']} {args} ({call.get('why')})"

    @staticmethod
    def preview_text(tool: Tool, args: dict, preflight: dict | None, lang: str) -> str:
        head = tool.preview(args, lang) if tool.preview else f"{tool.name} {json.dumps(args, ensure_ascii=False)}"
        if preflight:
            lines = [f"- {k}: {v}" for k, v in preflight.items() if k != "warnings"]
            lines += [f"- ⚠ {w}" for w in preflight.get("warnings", [])]
            head += "\n" + "\n".join(lines)
        return head

    @staticmethod
    def decision_text(tool: str, approved: bool, lang: str) -> str:
        if lang == "zh":
            return f"用户{'确认' if approved else '拒绝'}了 {tool}"
        return f"user {'approved' if approved else 'declined'} {tool}"

    @staticmethod
    def tool_text(record: dict, lang: str) -> str:
        state = "ok" if record["ok"] else f"{record['error']['type']}"
        return f"{record['tool']} → {state}"

    @staticmethod
    def observe_text(record: dict, lang: str) -> str:
        if record["ok"]:
            result = record.get("result")
            keys = ", ".join(list(result)[:6]) if isinstance(result, dict) else type(result).__name__
            return f"{record['tool']}: {keys}"
        return f"{record['tool']}: {record['error']['message']}"

    @staticmethod
    def reflect_text(plan: list[PlannedCall], lang: str) -> str:
        failed = [c for c in plan if c.get("record") and not c["record"]["ok"]]
        if not failed:
            return ""
        if lang == "zh":
            return f"{len(failed)} 个工具调用没有成功，说明原因和下一步。"
        return f"{len(failed)} tool call(s) did not succeed; say why and what to do next."

    @staticmethod
    def answer_step_text(lang: str) -> str:
        return "用模板写出回答。" if lang == "zh" else "Write the answer from the templates."

    # --- respond -------------------------------------------------------------------------------
    def compose(self, state: TurnState) -> str:
        lang = state["lang"]
        parts = []
        if state.get("notice"):
            parts.append(state["notice"])
            if all(not c.get("tool") and not c.get("reply") for c in state["plan"]) and len(state.get("text", "")) < 40:
                return state["notice"]   # a bare "yes"/"no" with nothing pending: just say so
        for call in state["plan"]:
            parts.append(self._call_answer(call, lang))
        return "\n\n".join(p for p in parts if p).strip()

    def compose_settled(self, plan: list[PlannedCall], lang: str) -> str:
        """Answers of the calls that already ran (shown above a confirmation question)."""
        settled = [c for c in plan if c.get("tool") and c.get("status") in ("done", "failed")]
        return "\n\n".join(p for p in (self._call_answer(c, lang) for c in settled) if p)

    def _call_answer(self, call: PlannedCall, lang: str) -> str:
        if call.get("memory"):
            return call["memory"]["answer"]
        if not call.get("tool"):
            return call.get("reply") or T.chat_reply(call["step"], lang)
        record = call.get("record")
        if record is None:
            return ""
        tool = self.registry.get(call["tool"])
        if record["ok"]:
            if tool.render:
                return tool.render(record["result"], lang)
            return json.dumps(record["result"], ensure_ascii=False, indent=2)[:3000]
        error = record["error"]
        if error["type"] == "invalid_args":
            missing = _missing_fields(tool, call.get("args") or {})
            if missing:
                return T.missing_field_question(missing[0], lang)
        return T.failure_text(tool.name, error, lang)


_ANSWER_LEAD = re.compile(r"^(?:it'?s|it is|the (?:target|column|file|model|data ?set) is|use|try|"
                          r"目标(?:列)?(?:是|为)|用|是|就是)\s*", re.IGNORECASE)


def _bare_value(step: str) -> str:
    """A short reply as a value: "the target is churn." → "churn", "「churn」" → "churn"."""
    value = _ANSWER_LEAD.sub("", step.strip()).strip(" \t.。!！?？,，'\"`“”「」‘’")
    return value if value and len(value.split()) <= 3 else ""


def _missing_fields(tool: Tool, args: dict) -> list[str]:
    return [name for name, f in tool.args_model.model_fields.items() if f.is_required() and name not in args]
