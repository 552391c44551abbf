"""``stackwise jobs`` (list, show, logs, cancel, resume your fine-tune jobs; merge, export and serve-info in
:mod:`bots.export_commands`) and ``stackwise worker``.

Exit codes: 0 done, 1 the job cannot do that (not found, nothing to cancel or resume), 2 usage errors.
With ``--json`` stdout carries exactly one JSON object: the result, or ``{"error": {"type", "message"}}``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from bots.cli import _fail, _print_json, _settings, _user


def add_jobs_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``jobs …`` and ``worker`` to the ``stackwise`` subcommands."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--user", default=None, help="whose jobs (default: $USER)")
    common.add_argument("--json", action="store_true", help="print one JSON object")
    jobs = sub.add_parser("jobs", help="your fine-tune jobs: list, show, logs, cancel, resume, merge, export, "
                                       "serve-info")
    jobs_sub = jobs.add_subparsers(dest="jobs_command", metavar="ACTION", required=True)
    listing = jobs_sub.add_parser("list", parents=[common], help="jobs, newest first")
    listing.add_argument("--all", action="store_true", help="everyone's jobs (the operator's view)")
    listing.add_argument("--limit", type=int, default=50, help="at most this many (1–1000)")
    show = jobs_sub.add_parser("show", parents=[common], help="one job: spec, preflight, progress, history")
    show.add_argument("id", metavar="ID")
    logs = jobs_sub.add_parser("logs", parents=[common], help="the end of a job's train.log and worker.log")
    logs.add_argument("id", metavar="ID")
    logs.add_argument("--tail", type=int, default=50, help="how many lines of each log (1–10000)")
    for action, text in (("cancel", "cancel a queued or running job (it keeps its checkpoint)"),
                         ("resume", "queue a failed, cancelled or interrupted job again, from its checkpoint")):
        jobs_sub.add_parser(action, parents=[common], help=text).add_argument("id", metavar="ID")
    from bots.export_commands import add_export_parsers

    add_export_parsers(jobs_sub, common)

    worker = sub.add_parser("worker", help="run queued fine-tune jobs on this machine (or the Ray cluster)")
    worker.add_argument("--drain", action="store_true", help="exit when the queue is empty")


def cmd_jobs(args: argparse.Namespace) -> int:
    """``stackwise jobs ACTION``."""
    from agent import Toolbox
    from agent.jobs import JobsError

    if args.jobs_command == "list" and not 1 <= args.limit <= 1000:
        return _fail("--limit must be between 1 and 1000.", as_json=args.json, kind="usage", code=2)
    if args.jobs_command == "logs" and not 1 <= args.tail <= 10_000:
        return _fail("--tail must be between 1 and 10000.", as_json=args.json, kind="usage", code=2)
    toolbox = Toolbox(_settings(args))
    try:
        from bots.export_commands import ACTIONS, run_export_action

        if args.jobs_command in ACTIONS:
            return run_export_action(toolbox.jobs(), args)
        action = {"list": _list, "show": _show, "logs": _logs, "cancel": _change, "resume": _change}
        return action[args.jobs_command](toolbox.jobs(), args)
    except JobsError as exc:
        return _fail(exc.message, as_json=args.json, kind=exc.type)
    finally:
        toolbox.close()


def cmd_worker(args: argparse.Namespace) -> int:
    """``stackwise worker [--drain]``: one line per finished job on stdout, progress on stderr."""
    from agent import Toolbox
    from agent.jobs import JobsError

    worker_log = logging.getLogger("stackwise.worker")
    if not worker_log.isEnabledFor(logging.INFO):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("worker: %(message)s"))
        worker_log.addHandler(handler)
        worker_log.setLevel(logging.INFO)
        worker_log.propagate = False

    def announce(job: Any) -> None:
        print(_line(_row(job)), flush=True)

    toolbox = Toolbox(_settings(args))
    try:
        return toolbox.jobs().run_worker(drain=args.drain, on_finished=announce)
    except JobsError as exc:
        return _fail(exc.message, as_json=False, kind=exc.type)
    finally:
        toolbox.close()


def _list(jobs, args) -> int:
    rows = jobs.list(_user(args), admin=args.all, limit=args.limit)
    if args.json:
        _print_json({"jobs": rows, "all": args.all})
    elif not rows:
        print("no jobs" + ("" if args.all else f" for {_user(args)}"))
    else:
        for row in rows:
            print(_line(row, owner=args.all))
    return 0


def _show(jobs, args) -> int:
    job = jobs.show(args.id, _user(args))
    if args.json:
        _print_json(job)
        return 0
    spec, progress, preflight = job["spec"], job["progress"] or {}, job["preflight"] or {}
    print(f"{job['id']}  {job['status']}  (owner {job['owner']}, attempt {job['attempts']}, "
          f"backend {job['backend'] or 'any'})")
    print(f"  {spec.get('base_model')} · {spec.get('method', 'lora')} · {spec.get('dataset')}")
    if progress:
        print(f"  progress  {_progress(progress)}")
    if preflight.get("rows"):
        print(f"  preflight {_preflight(preflight)}")
    if job["error"]:
        print(f"  error     {job['error']}")
    for name, path in (job["artifacts"] or {}).items():
        if path:
            print(f"  {name:<9} {path}")
    for i, line in enumerate(_tracking_lines(job.get("summary"))):
        print(f"  {'tracking' if i == 0 else '':<9} {line}")
    for entry in job["history"]:
        print(f"  {entry['at']}  {entry['status']:<11} {entry['note']}")
    return 0


def _logs(jobs, args) -> int:
    result = jobs.logs(args.id, _user(args), tail=args.tail)
    if args.json:
        _print_json(result)
    else:
        print(result["text"] or f"{result['id']} has no logs yet ({result['status']})")
    return 0


def _change(jobs, args) -> int:
    row = getattr(jobs, args.jobs_command)(args.id, _user(args))
    if args.json:
        _print_json(row)
    elif args.jobs_command == "resume":
        print(f"{row['id']} is queued again; a worker continues it from its last checkpoint")
    elif row["status"] == "cancelling":
        print(f"{row['id']} is being cancelled; its worker saves a checkpoint and stops it")
    else:
        print(f"{row['id']} is {row['status']}")
    return 0


def _row(job: Any) -> dict:
    from agent.jobs import job_row

    return job_row(job)


def _line(row: dict, owner: bool = False) -> str:
    """``ft-3  running     12/60  loss 1.234  Qwen/Qwen2.5-0.5B lora  data.jsonl``."""
    step = f"{row['step']}/{row['total']}" if row.get("step") is not None else "-"
    loss = f"loss {row['loss']:.4g}" if isinstance(row.get("loss"), int | float) else ""
    parts = [f"{row['id']:<7}", f"{row['status']:<11}", f"{step:>11}", f"{loss:<12}",
             f"{row.get('base_model') or '?'} {row.get('method') or ''}", row.get("dataset") or ""]
    if owner:
        parts.insert(1, f"{row['owner']:<12}")
    text = "  ".join(parts).rstrip()
    if row.get("error") and row["status"] in ("failed", "interrupted"):
        text += f"\n         {row['error'].splitlines()[0][:200]}"
    return text


def _progress(p: dict) -> str:
    bits = [f"step {p.get('step')}/{p.get('total')}"]
    for key, label in (("loss", "loss"), ("eval_loss", "eval"), ("lr", "lr"), ("tokens_per_s", "tok/s")):
        if isinstance(p.get(key), int | float):
            bits.append(f"{label} {p[key]:.4g}")
    if isinstance(p.get("eta_s"), int | float):
        bits.append(f"ETA {_duration(p['eta_s'])}")
    if isinstance(p.get("gpu_mem_gb"), int | float):
        bits.append(f"GPU {p['gpu_mem_gb']:.1f} GiB")
    return "  ".join(bits)


def _tracking_lines(summary: Any) -> list[str]:
    """The runs ``summary.json``'s ``tracking`` links (TensorBoard, W&B, MLflow) and the trackers skipped."""
    tracking = summary.get("tracking") if isinstance(summary, dict) else None
    if not isinstance(tracking, dict):
        return []
    lines = []
    board, wandb, mlflow = (tracking.get(k) for k in ("tensorboard", "wandb", "mlflow"))
    if isinstance(board, dict):
        lines.append(f"TensorBoard: {board.get('command')}")
    if isinstance(wandb, dict):
        lines.append(f"W&B: {wandb['url']}" if wandb.get("url") else
                     f"W&B (offline): {wandb.get('dir')}  upload: {wandb.get('sync')}")
    if isinstance(mlflow, dict):
        lines.append(f"MLflow: {mlflow.get('url') or mlflow.get('uri')}  run {mlflow.get('run_id')}")
    skipped = tracking.get("skipped")
    if isinstance(skipped, dict):
        lines += [f"{name} skipped: {why}" for name, why in skipped.items()]
    return lines


def _preflight(p: dict) -> str:
    rows, vram, time_ = p.get("rows") or {}, p.get("vram") or {}, p.get("time") or {}
    bits = [f"{rows.get('train')} train / {rows.get('eval')} eval rows"]
    if vram.get("total_gb") is not None:
        bits.append(f"~{vram['total_gb']} GiB" + ("" if p.get("fits") is None else " (fits)" if p["fits"] else
                                                  " (does not fit)"))
    if time_.get("seconds") is not None:
        bits.append(f"~{_duration(time_['seconds'])} on {time_.get('gpu_kind', '?')}")
    return ", ".join(bits)


def _duration(seconds: Any) -> str:
    seconds = int(float(seconds or 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h {rest // 60:02d}m" if hours else f"{rest // 60}m {rest % 60:02d}s"
