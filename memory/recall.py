"""What a brain does with user memory inside a turn: answer a memory command (forget, show, remember, a question
about other users), acknowledge a statement of facts, and fill a tool's missing arguments from what the user told
us ("my usual data set", the preferred method). Plain functions over a :class:`~memory.user_memory.UserMemory`,
so any brain can use them; they return the plan entry (a ``PlannedCall``-shaped dict) or text.

Example:
    >>> from langgraph.store.memory import InMemoryStore
    >>> from memory.user_memory import UserMemory
    >>> memory = UserMemory(InMemoryStore())
    >>> _ = memory.learn("ada", "my GPU is an RTX 3060 12G")
    >>> memory_call("forget my GPU", memory, "ada", ("forget", "gpu"), "en")["memory"]["answer"]
    'Forgot your GPU (deleted for good).'
"""

from __future__ import annotations

from typing import Any

from memory import fact_text
from memory.facts import KINDS, extract_facts
from memory.intents import USUAL_DATASET_REF, USUAL_MODEL_REF

TRAIN_FILES = (".jsonl", ".json", ".csv", ".parquet", ".tsv", ".txt", ".arrow")
TABLE_FILES = (".csv", ".parquet", ".tsv")


def memory_call(step: str, memory: Any, user_id: str, intent: tuple[str, str | None], lang: str) -> dict:
    """The plan entry for a memory command; its ``memory.answer`` is the reply (the command has run)."""
    action, detail = intent
    if action == "other_users":
        answer = fact_text.OTHER_USERS[lang]
    elif action == "show":
        answer = fact_text.shown(memory.show(user_id), lang)
    elif action == "forget":
        if detail == "all":
            answer = fact_text.forgotten(memory.forget(user_id), None, lang)
        elif detail in KINDS:
            answer = fact_text.forgotten(memory.forget(user_id, detail), detail, lang)
        else:
            count, kind = memory.forget_matching(user_id, detail or step)
            answer = fact_text.forgotten(count, kind, lang)
    else:   # remember: the graph kept it when the message came in; say what is now kept
        answer = acknowledged(memory, user_id, step, lang) or fact_text.not_known([], lang)
    return {"step": step, "tool": None, "args": {}, "score": 1.0, "status": "memory", "record": None,
            "why": f"{action} {detail}" if detail else action, "memory": {"action": action, "answer": answer}}


def acknowledged(memory: Any, user_id: str, step: str, lang: str) -> str | None:
    """"Noted: …" for the facts ``step`` states that memory now holds, or None when it states none."""
    facts = extract_facts(step)
    if not facts:
        return None
    shown = memory.show(user_id)
    kept = {f["kind"]: f for f in shown if f["kind"] != "note"}
    notes = {f["said"] for f in shown if f["kind"] == "note"}
    held = [{"kind": f.kind, "data": f.data} for f in facts
            if (f.kind == "note" and f.said in notes) or (f.kind in kept and kept[f.kind]["data"] == f.data)]
    if held:
        return fact_text.noted(held, lang)
    if any(f.kind == "language" and f.data.get("lang") == "auto" for f in facts) and "language" not in kept:
        return fact_text.LANGUAGE_AUTO[lang]
    return None


def apply_profile(memory: Any, user_id: str, tool: Any, args: dict, step: str) -> list[str]:
    """Fill ``args`` from the user's facts: "my usual data set/model" (which wins over the thread's last file), and
    for a fine-tune the data set, base model and method when the message named none. Returns notes for the trace."""
    fields = tool.args_model.model_fields
    wanted_file = [f for f in ("dataset", "data") if f in fields]
    if not (wanted_file or "base_model" in fields):
        return []
    profile = memory.profile(user_id)
    notes: list[str] = []
    usual_file = (profile.get("usual_dataset") or {}).get("file")
    for field in wanted_file:
        if not usual_file or args.get(field) == usual_file:
            continue
        fits = usual_file.lower().endswith(TRAIN_FILES if field == "dataset" else TABLE_FILES)
        named = USUAL_DATASET_REF.search(step)
        # "my usual data set" names it; a fine-tune that names no data set at all takes it as the default.
        if (named and (fits or field == "dataset")) or (field == "dataset" and field not in args and fits):
            args[field] = usual_file
            notes.append(f"{field} = {usual_file} (your usual data set, from memory)")
    usual_model = (profile.get("usual_model") or {}).get("model")
    if ("base_model" in fields and usual_model and args.get("base_model") != usual_model
            and (USUAL_MODEL_REF.search(step) or "base_model" not in args)):
        args["base_model"] = usual_model
        notes.append(f"base_model = {usual_model} (your usual model, from memory)")
    method = (profile.get("preferred_method") or {}).get("method")
    if "method" in fields and "base_model" in fields and method and "method" not in args:
        args["method"] = method
        notes.append(f"method = {method} (your preferred method, from memory)")
    return notes
