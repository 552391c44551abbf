"""Handlers of the ``stackwise`` commands that exist today: ask, tool, tools, chat, eval, bench."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from bots.cli import _print_json, _settings, _user


def known_error(exc: Exception) -> tuple[str, str] | None:
    """(type, message) for errors a user can act on; None for bugs (which keep their traceback)."""
    from agent.brains.llm_client import LLMError
    from agent.facade import InputError
    from agent.jobs import JobsError
    from agent.settings import SettingsError
    from memory.checkpoints import StoreError
    from memory.kb.index import KnowledgeError

    if isinstance(exc, InputError | JobsError):
        return exc.type, exc.message
    if isinstance(exc, SettingsError):
        return "settings", str(exc)
    if isinstance(exc, LLMError):
        return "llm", f"The model endpoint failed ({exc.kind}): {exc.message}"
    if isinstance(exc, StoreError):
        return "store", str(exc)
    if isinstance(exc, KnowledgeError):
        return "knowledge_base", str(exc)
    from memory.user_memory import UserMemoryError

    if isinstance(exc, UserMemoryError):
        return "memory", str(exc)
    return None


def _agent(args: argparse.Namespace, **overrides: Any):
    from agent import Agent

    return Agent(_settings(args, **overrides), channel="cli")


def render_reply(reply: Any, out=None) -> None:
    """Human-readable reply: dimmed steps, the answer, attachments, what to do for a pending action."""
    from rich.console import Console

    console = Console(file=out or sys.stdout, highlight=False, soft_wrap=True)
    for step in reply.steps:
        console.print(f"[dim]· {step.kind}: {step.text}[/dim]", markup=True, emoji=False)
    console.print(reply.answer, markup=False, emoji=False)
    for att in reply.attachments:
        console.print(f"[{att.kind}] {att.path}  {att.caption}", markup=False)
    if reply.pending:
        console.print(f"[dim](pending {reply.pending.id}: answer yes/no in this thread, or rerun with --yes)[/dim]")


def cmd_ask(args: argparse.Namespace) -> int:
    user = _user(args)
    agent = _agent(args, brain=args.brain)
    try:
        reply = agent.ask(args.text, thread_id=args.thread or f"cli:{user}", user_id=user,
                          approve=True if args.yes else None)
    finally:
        agent.close()
    if args.json:
        _print_json(reply.model_dump(mode="json"))
    else:
        render_reply(reply)
    failed = [c for c in reply.tool_calls if not c.ok and (c.error or {}).get("type") != "declined"]
    return 1 if failed else 0


def cmd_tool(args: argparse.Namespace) -> int:
    from agent import Toolbox

    record = Toolbox(_settings(args)).call_tool_json(args.name, args.args, user_id=_user(args), what="--args")
    if args.json:
        _print_json(record)
    elif record["ok"]:
        print(json.dumps(record["result"], ensure_ascii=False, indent=2, default=str))
    else:
        sys.stderr.write(f"error ({record['error']['type']}): {record['error']['message']}\n")
    return 0 if record["ok"] else 1


def cmd_tools(args: argparse.Namespace) -> int:
    from agent import Toolbox

    listing = Toolbox(_settings(args)).tools()
    if args.json:
        _print_json({"tools": listing})
    else:
        for t in listing:
            mark = "  [asks first]" if t["side_effects"] else ""
            first = " ".join(t["description"].split()).split(". ")[0].rstrip(".") + "."
            print(f"{t['name']:<20}{first}{mark}")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from bots.cli import _fail
    from bots.repl import run_repl

    if bool(args.llm_url) != bool(args.llm_model):
        return _fail("--llm-url and --llm-model go together (e.g. --llm-url http://127.0.0.1:8000/v1 "
                     "--llm-model ft-12).", as_json=False, kind="usage", code=2)
    agent = _agent(args, brain=None if args.llm_url else args.brain)
    try:
        if args.llm_url:
            agent.use_model(args.llm_url, args.llm_model)
        return run_repl(agent, user_id=_user(args), thread_id=args.thread)
    finally:
        agent.close()


def cmd_kb(args: argparse.Namespace) -> int:
    from bots.kb_commands import cmd_kb as run

    return run(args)


def cmd_jobs(args: argparse.Namespace) -> int:
    from bots.jobs_commands import cmd_jobs as run

    return run(args)


def cmd_worker(args: argparse.Namespace) -> int:
    from bots.jobs_commands import cmd_worker as run

    return run(args)


def cmd_serve(args: argparse.Namespace) -> int:
    from bots.http import serve

    return serve(_settings(args), host=args.host, port=args.port)


def cmd_mcp(args: argparse.Namespace) -> int:
    from bots.mcp_server import run_mcp

    return run_mcp(_settings(args), http=args.http, host=args.host, port=args.port)


def cmd_eval(args: argparse.Namespace) -> int:
    from evals.runner import run_evals

    return run_evals(args.suite, settings=_settings(args, brain=args.brain), as_json=args.json,
                     failures=args.failures)


def cmd_bench(args: argparse.Namespace) -> int:
    from evals.bench import run_bench

    return run_bench(settings=_settings(args), as_json=args.json, quick=args.quick)
