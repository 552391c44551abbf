"""The ``stackwise`` command line: parsing and dispatch; each command group lives in its own function.

Exit codes: 0 success, 1 the turn or tool failed (with a clear message), 2 usage errors.
With ``--json`` stdout carries exactly one JSON object; logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

# Offline by design: never let a library try the network for a model.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")

LATER: dict[str, str] = {}


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False, default=str) + "\n")
    sys.stdout.flush()


def _fail(message: str, *, as_json: bool, kind: str = "error", code: int = 1) -> int:
    if as_json:
        _print_json({"error": {"type": kind, "message": message}})
    else:
        sys.stderr.write(f"error: {message}\n")
    return code


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stackwise", description="A chat bot for people who build with the AI stack.")
    p.add_argument("--home", help="data folder (default: $STACKWISE_HOME or ~/.stackwise)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    chat = sub.add_parser("chat", help="terminal REPL")
    chat.add_argument("--thread", help="thread id (default: cli:<user>)")
    chat.add_argument("--user", default=None, help="user id (default: $USER)")
    chat.add_argument("--brain", choices=["local", "llm"], help="which brain answers")
    chat.add_argument("--llm-url", default=None, metavar="URL",
                      help="chat with the model at this OpenAI-compatible endpoint (e.g. your served fine-tune)")
    chat.add_argument("--llm-model", default=None, metavar="NAME", help="the served model's name (with --llm-url)")

    ask = sub.add_parser("ask", help="ask one question")
    ask.add_argument("text", help="the message")
    ask.add_argument("--thread", help="thread id (default: cli:<user>)")
    ask.add_argument("--user", default=None, help="user id (default: $USER)")
    ask.add_argument("--json", action="store_true", help="print the Reply as one JSON object")
    ask.add_argument("--yes", action="store_true", help="approve confirmations of this turn")
    ask.add_argument("--brain", choices=["local", "llm"], help="which brain answers")

    tool = sub.add_parser("tool", help="run one tool directly, no routing")
    tool.add_argument("name")
    tool.add_argument("--args", default="{}", help="the arguments as a JSON object")
    tool.add_argument("--user", default=None)
    tool.add_argument("--json", action="store_true")

    tools = sub.add_parser("tools", help="list tools with their JSON schemas")
    tools.add_argument("--json", action="store_true")

    ev = sub.add_parser("eval", help="run the evals and print tables")
    ev.add_argument("suite", nargs="?", default="all",
                    choices=["routing", "retrieval", "answers", "shap", "memory", "all"])
    ev.add_argument("--json", action="store_true")
    ev.add_argument("--failures", type=int, default=15, help="how many failures to list")
    ev.add_argument("--brain", choices=["local", "llm"], help="which brain the routing eval measures")

    bench = sub.add_parser("bench", help="run the benchmarks and print a table")
    bench.add_argument("--json", action="store_true")
    bench.add_argument("--quick", action="store_true", help="fewer repetitions")

    from bots.kb_commands import add_kb_parser

    add_kb_parser(sub)
    from bots.jobs_commands import add_jobs_parsers

    add_jobs_parsers(sub)
    from bots.memory_commands import add_memory_parser

    add_memory_parser(sub)
    serve = sub.add_parser("serve", help="HTTP API: OpenAI-compatible /v1/chat/completions and native routes")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (not loopback: STACKWISE_API_TOKENS required)")
    serve.add_argument("--port", type=int, default=8000)
    mcp = sub.add_parser("mcp", help="MCP server: every tool, over stdio (default) or streamable HTTP")
    mcp.add_argument("--http", action="store_true", help="serve streamable HTTP at http://HOST:PORT/mcp")
    mcp.add_argument("--host", default="127.0.0.1")
    mcp.add_argument("--port", type=int, default=8765)
    tg = sub.add_parser("telegram", help="Telegram bot: long polling, or a webhook (STACKWISE_TELEGRAM_* settings)")
    tg.set_defaults(run=_cmd_telegram)
    sl = sub.add_parser("slack", help="Slack bot: Events API over HTTP, or Socket Mode (SLACK_* settings)")
    sl.add_argument("--host", default="127.0.0.1", help="bind address of the events endpoint (HTTP mode)")
    sl.add_argument("--port", type=int, default=3000)
    sl.set_defaults(run=_cmd_slack)
    for name, where in LATER.items():
        sp = sub.add_parser(name, help=f"(arrives with {where})")
        sp.add_argument("rest", nargs=argparse.REMAINDER)
    return p


def _settings(args: argparse.Namespace, **overrides: Any):
    from agent.settings import Settings

    return Settings.from_env(home=args.home, **overrides)


def _cmd_telegram(args: argparse.Namespace) -> int:
    from bots.telegram import serve

    return serve(_settings(args))


def _cmd_slack(args: argparse.Namespace) -> int:
    from bots.slack import serve

    return serve(_settings(args), host=args.host, port=args.port)


def _user(args: argparse.Namespace) -> str:
    return getattr(args, "user", None) or os.environ.get("USER") or "local"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = os.environ.get("STACKWISE_LOG_LEVEL", "WARNING").upper()
    logging.basicConfig(level=getattr(logging, level, logging.WARNING), stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.command:
        parser.print_help(sys.stderr)
        return 2
    if args.command in LATER:
        sys.stderr.write(f"stackwise {args.command} is not available in this version yet "
                         f"(it arrives with {LATER[args.command]}).\n")
        return 1
    from bots import commands

    handler = getattr(args, "run", None) or getattr(commands, f"cmd_{args.command}")
    as_json = bool(getattr(args, "json", False))
    try:
        return handler(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        known = commands.known_error(exc)
        if known is None:
            raise
        return _fail(known[1], as_json=as_json, kind=known[0])


if __name__ == "__main__":
    sys.exit(main())
