"""``stackwise memory``: what is kept about a user (facts and threads), deleting it for real, and the stores' sizes.

    stackwise memory show   [--user U] [--json]                     the user's facts (exactly as stored) and threads
    stackwise memory forget [--user U] [--key K] [--threads] [--json]   delete one fact, all facts (+ the threads)
    stackwise memory stats  [--user U] [--json]                     sizes of the thread, memory and job databases
    stackwise memory prune  [--vacuum] [--json]                     apply the retention settings to every thread now

It opens only the stores (no router model), so it is quick and works while a bot is running.
"""

from __future__ import annotations

import argparse
import os
import time
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from bots.cli import _fail, _print_json, _settings, _user


def add_memory_parser(sub: argparse._SubParsersAction) -> None:
    mem = sub.add_parser("memory", help="what stackwise keeps about a user: show, forget, stats, prune")
    mem_sub = mem.add_subparsers(dest="memory_command", metavar="ACTION", required=True)
    show = mem_sub.add_parser("show", help="the user's facts (as stored) and threads")
    forget = mem_sub.add_parser("forget", help="delete the user's facts (all, or --key K), and with --threads their "
                                               "conversations; erased from disk")
    forget.add_argument("--key", help="one fact's key (see `memory show`), e.g. gpu or note-1a2b3c4d5e")
    forget.add_argument("--threads", action="store_true", help="also delete the user's threads (conversations)")
    stats = mem_sub.add_parser("stats", help="database sizes, threads, checkpoints and facts")
    prune = mem_sub.add_parser("prune", help="keep the last STACKWISE_KEEP_CHECKPOINTS checkpoints of every thread "
                                             "and drop threads idle past STACKWISE_THREAD_MAX_IDLE_DAYS, now")
    prune.add_argument("--vacuum", action="store_true", help="then give the freed space back to the file system")
    for p in (show, forget, stats):
        p.add_argument("--user", default=None, help="user id (default: $USER)")
    for p in (show, forget, stats, prune):
        p.add_argument("--json", action="store_true")
    mem.set_defaults(run=cmd_memory)


@contextmanager
def _stores(args: argparse.Namespace):
    """The user memory and the thread store's retention, without loading the router."""
    from agent import Toolbox
    from memory.checkpoints import close_checkpointer, open_checkpointer
    from memory.retention import Retention

    settings = _settings(args)
    toolbox = Toolbox(settings)
    saver = None
    try:
        saver = open_checkpointer(settings.threads_db, settings.database_url)
        retention = Retention(saver, keep=settings.keep_checkpoints, max_idle_days=settings.thread_max_idle_days)
        yield settings, toolbox.user_memory(), retention
    finally:
        if saver is not None:
            close_checkpointer(saver)
        toolbox.close()


def cmd_memory(args: argparse.Namespace) -> int:
    from memory.user_memory import UserMemoryError

    try:
        with _stores(args) as (settings, memory, retention):
            return {"show": _show, "forget": _forget, "stats": _stats, "prune": _prune}[args.memory_command](
                args, settings, memory, retention)
    except UserMemoryError as exc:
        return _fail(str(exc), as_json=args.json, kind="memory")


def _when(epoch: float | None) -> str:
    return datetime.fromtimestamp(epoch, tz=UTC).strftime("%Y-%m-%d %H:%M UTC") if epoch else "-"


def _show(args, settings, memory, retention) -> int:
    user = _user(args)
    facts = memory.show(user)
    threads = [{k: t[k] for k in ("thread_id", "checkpoints", "last_active")} for t in retention.threads(user)]
    if args.json:
        _print_json({"user": user, "facts": facts, "threads": threads})
        return 0
    from memory.fact_text import describe

    print(f"user {user}: {len(facts)} fact(s), {len(threads)} thread(s)")
    for f in facts:
        print(f"  [{f['key']}] {describe(f['kind'], f['data'], 'en')}")
        print(f"      said: {f['said']!r}  ·  kept since {f['created_at'][:16]}, updated {f['updated_at'][:16]}")
    for t in threads:
        print(f"  thread {t['thread_id']}: {t['checkpoints']} checkpoint(s), last active {_when(t['last_active'])}")
    return 0


def _forget(args, settings, memory, retention) -> int:
    user = _user(args)
    if args.key is not None and args.threads:
        return _fail("--key deletes one fact; --threads goes with forgetting all facts. Use one of them.",
                     as_json=args.json, kind="usage", code=2)
    if args.key is not None and not any(f["key"] == args.key for f in memory.show(user)):
        return _fail(f"User {user} has no fact {args.key!r}; `stackwise memory show --user {user}` lists the keys.",
                     as_json=args.json, kind="unknown_key")
    facts = memory.forget(user, args.key)
    threads = retention.delete_threads([t["key"] for t in retention.threads(user)]) if args.threads else 0
    if args.json:
        _print_json({"user": user, "facts_deleted": facts, "threads_deleted": threads})
    else:
        what = f"fact {args.key}" if args.key else f"{facts} fact(s)"
        print(f"deleted {what}" + (f" and {threads} thread(s)" if args.threads else "") + f" of user {user}")
    return 0


def _size(path: Any) -> int:
    return sum(os.path.getsize(p) for p in (str(path), f"{path}-wal") if os.path.exists(p))


def _stats(args, settings, memory, retention) -> int:
    threads = retention.stats()
    store = memory.store
    stats: dict[str, Any] = {
        "threads": threads,
        "memory": {"backend": "postgres" if settings.database_url else "sqlite", "location": store.location,
                   "bytes": store.size_bytes(), "facts": _count_facts(store)},
        "jobs": {"backend": "postgres" if settings.database_url else "sqlite",
                 "bytes": None if settings.database_url else _size(settings.home / "jobs.sqlite")},
    }
    if args.user:
        stats["user"] = {"user": args.user, "facts": len(memory.show(args.user)),
                         "threads": retention.threads(args.user)}
    if args.json:
        _print_json(stats)
        return 0
    mb = 2**20
    print(f"threads   {threads['backend']:<8} {threads['bytes'] / mb:9.2f} MiB"
          + (f" (+ WAL {threads['wal_bytes'] / mb:.2f} MiB, free {threads['free_bytes'] / mb:.2f} MiB)"
             if threads["backend"] == "sqlite" else "")
          + f"  ·  {threads['threads']} thread(s), {threads['checkpoints']} checkpoint(s)"
          + f"  ·  keep {threads['keep_checkpoints']} per thread, drop after {threads['max_idle_days']:g} idle days")
    m = stats["memory"]
    print(f"memory    {m['backend']:<8} {m['bytes'] / mb:9.2f} MiB  ·  {m['facts']} fact(s)  ·  {m['location']}")
    j = stats["jobs"]
    print(f"jobs      {j['backend']:<8} " + (f"{j['bytes'] / mb:9.2f} MiB" if j["bytes"] is not None else
                                            "(in the Postgres database)"))
    if args.user:
        u = stats["user"]
        cps = sum(t["checkpoints"] for t in u["threads"])
        print(f"user {args.user}: {u['facts']} fact(s), {len(u['threads'])} thread(s), {cps} checkpoint(s)")
    return 0


def _count_facts(store: Any) -> int:
    return sum(len(store.search(ns, limit=10_000)) for ns in store.list_namespaces(prefix=("users",), limit=100_000))


def _prune(args, settings, memory, retention) -> int:
    before = retention.stats()
    started = time.perf_counter()
    dropped = retention.sweep()
    pruned = sum(retention.prune(t["key"]) for t in retention.threads())
    if args.vacuum:
        retention.vacuum()
    after = retention.stats()
    result = {"threads_dropped": dropped, "checkpoints_deleted": pruned, "bytes_before": before["bytes"],
              "bytes_after": after["bytes"], "seconds": round(time.perf_counter() - started, 3)}
    if args.json:
        _print_json(result)
    else:
        print(f"dropped {dropped} idle thread(s), deleted {pruned} old checkpoint(s); "
              f"{before['bytes'] / 2**20:.2f} → {after['bytes'] / 2**20:.2f} MiB"
              + ("" if args.vacuum else " (run with --vacuum to give free pages back)"))
    return 0
