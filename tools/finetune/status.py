"""``finetune_status`` and ``cancel_finetune``'s work: the user's job from the store, its freshest progress
(read from ``RUN/progress.jsonl``), a loss-curve PNG, the artifacts and the before/after comparison.

The job store comes from ``ctx.extras["jobs"]`` (a :class:`~memory.jobs.JobStore`) when the caller shares
one; otherwise the PostgreSQL one at ``ctx.extras["database_url"]`` (``Settings.database_url``) or, without
it, the one at ``ctx.home/jobs.sqlite`` is opened for the call.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from memory.jobs import Job, JobNotFound, JobStateError, JobStore, StoreError
from tools.base import ToolContext, ToolError
from tools.finetune.eval_text import evaluation_text
from tools.finetune.rundir import RunPaths

TEXT_LIMIT = 400          # characters of a comparison answer kept in the result


@contextmanager
def open_jobs(ctx: ToolContext) -> Iterator[JobStore]:
    """The job store for this call; a damaged or locked database becomes a ``ToolError``."""
    shared = ctx.extras.get("jobs")
    try:
        if shared is not None:
            yield shared
            return
        store = JobStore.open(ctx.home, ctx.extras.get("database_url"))
        try:
            yield store
        finally:
            store.close()
    except StoreError as e:
        raise ToolError("store_unavailable", str(e)) from None


def find_job(jobs: JobStore, job_id: str | None, owner: str) -> Job:
    """``owner``'s job ``job_id``, or their latest; another user's job reads exactly like a missing one."""
    if job_id:
        try:
            return jobs.get(job_id, owner=owner)
        except JobNotFound as e:
            raise ToolError("not_found", str(e)) from None
    job = jobs.latest(owner)
    if job is None:
        raise ToolError("not_found", "You have no fine-tune jobs yet. Start one with launch_finetune, "
                                     "e.g. \"fine-tune Qwen/Qwen2.5-0.5B on data.jsonl\".")
    return job


# ---- progress ------------------------------------------------------------------------------------------

def read_progress(path: Path) -> list[dict]:
    """The progress lines of ``path``; a line being written right now (not yet valid JSON) is skipped."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    lines = []
    for raw in text.splitlines():
        try:
            line = json.loads(raw)
        except json.JSONDecodeError:
            continue
        if isinstance(line, dict) and _num(line.get("step")) is not None:
            lines.append(line)
    return lines


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) \
        and math.isfinite(value) else None


def _latest(lines: list[dict], key: str) -> float | None:
    return next((v for v in (_num(x.get(key)) for x in reversed(lines)) if v is not None), None)


def summarize_progress(lines: list[dict], stored: dict | None, status: str, now: float) -> dict | None:
    """Step/total, percent, loss, eval loss, lr, tokens/s and ETA from the last progress line."""
    lines = lines or ([stored] if stored else [])
    if not lines:
        return None
    last = lines[-1]
    step, total = _num(last.get("step")), _num(last.get("total"))
    eta, at = _num(last.get("eta_s")), _num(last.get("time"))
    if status == "running" and eta is not None and at is not None:
        eta = max(0.0, eta - max(0.0, now - at))      # the line is some seconds old
    elif status not in ("running", "cancelling"):
        eta = None
    return {"step": int(step) if step is not None else None, "total": int(total) if total else None,
            "percent": round(100 * step / total, 1) if step is not None and total else None,
            "epoch": _num(last.get("epoch")), "loss": _latest(lines, "loss"), "eval_loss": _latest(lines, "eval_loss"),
            "lr": _num(last.get("lr")), "tokens_per_s": _num(last.get("tokens_per_s")),
            "eta_s": round(eta) if eta is not None else None, "gpu_mem_gb": _num(last.get("gpu_mem_gb")),
            "updated_at": at}


def loss_plot(lines: list[dict], target: Path, title: str) -> Path | None:
    """Train and eval loss against step as a PNG at ``target`` (redrawn only when the progress is newer)."""
    train = [(x["step"], _num(x.get("loss"))) for x in lines if _num(x.get("loss")) is not None]
    evals = [(x["step"], _num(x.get("eval_loss"))) for x in lines if _num(x.get("eval_loss")) is not None]
    if len(train) + len(evals) < 2:
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=100)
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train, strict=True), color="#2f6db5", lw=1.6, marker="o" if len(train) < 30 else None,
                ms=3, label="train loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), color="#d0424f", lw=1.6, marker="s", ms=4, label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Glyph .* missing from", category=UserWarning)
        fig.tight_layout()
        tmp = target.with_name(target.name + ".tmp.png")
        fig.savefig(tmp)
    tmp.replace(target)
    return target


# ---- status --------------------------------------------------------------------------------------------

def job_status(job_id: str | None, ctx: ToolContext) -> dict:
    """The result of ``finetune_status``."""
    with open_jobs(ctx) as jobs:
        job = find_job(jobs, job_id, ctx.user_id)
    run = Path(job.run_dir)
    lines = read_progress(RunPaths(run).progress)
    summary = job.summary or (_read_json(RunPaths(run).summary) if job.is_finished else None)
    artifacts = job.artifacts or (summary or {}).get("artifacts") or {}
    result: dict[str, Any] = {
        "job_id": job.id, "status": job.status, "base_model": job.spec.get("base_model"),
        "dataset": job.spec.get("dataset"), "method": job.spec.get("method"),
        "progress": summarize_progress(lines, job.progress, job.status, time.time()),
        "history": [h.to_dict() for h in job.history], "artifacts": artifacts, "error": job.error,
        "summary": summary, "comparison": None, "run_dir": job.run_dir, "plot": None, "attachments": [],
        "preflight": {k: job.preflight.get(k) for k in ("rows", "vram", "time") if k in job.preflight},
        "trial": job.spec.get("trial"),
    }
    if job.status == "succeeded":
        rows = _read_json(Path(artifacts.get("comparison") or RunPaths(run).comparison))
        if isinstance(rows, list) and rows and isinstance(rows[0], dict):
            result["comparison"] = {k: str(rows[0].get(k, ""))[:TEXT_LIMIT]
                                    for k in ("question", "reference", "before", "after")}
    plot = _plot(lines, run, job.id)
    if plot is not None:
        caption = (f"{job.id} 的损失曲线（训练与评估）" if ctx.lang == "zh" else
                   f"Loss of {job.id} by step (train and eval)")
        result["plot"] = str(plot)
        result["attachments"] = [{"kind": "image", "path": str(plot), "caption": caption}]
    return result


def _plot(lines: list[dict], run: Path, job_id: str) -> Path | None:
    target, progress = RunPaths(run).loss_plot, RunPaths(run).progress
    try:
        if target.exists() and target.stat().st_mtime_ns >= progress.stat().st_mtime_ns:
            return target
        return loss_plot(lines, target, f"{job_id} loss")
    except OSError:      # a read-only or full disk must not cost the user the numbers
        return None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# ---- cancel --------------------------------------------------------------------------------------------

def cancel_job(job_id: str, ctx: ToolContext) -> dict:
    """The result of ``cancel_finetune``: ``cancelled`` (it had not started) or ``cancelling`` (the worker stops it)."""
    with open_jobs(ctx) as jobs:
        try:
            job = jobs.request_cancel(job_id, ctx.user_id)
        except JobNotFound as e:
            raise ToolError("not_found", str(e)) from None
        except JobStateError as e:
            raise ToolError("invalid_state", str(e)) from None
    return {"job_id": job.id, "status": job.status, "cancel_requested": job.cancel_requested,
            "note": job.history[-1].note if job.history else None}


# ---- texts ---------------------------------------------------------------------------------------------

def duration_text(seconds: float | None, lang: str) -> str:
    """``45 s`` / ``6 min`` / ``2.5 h`` / ``3.1 d`` (``45 秒`` / ``6 分钟`` / …)."""
    if seconds is None:
        return "?"
    units = (("秒", "分钟", "小时", "天") if lang == "zh" else ("s", "min", "h", "d"))
    if seconds < 1:
        return f"< 1 {units[0]}"
    if seconds < 90:
        return f"{seconds:.0f} {units[0]}"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} {units[1]}"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} {units[2]}"
    return f"{seconds / 86400:.1f} {units[3]}"


def _steps(p: dict, zh: bool) -> str:
    if p.get("total"):
        pct = f"（{p['percent']:.0f} %）" if zh else f" ({p['percent']:.0f} %)"
        return (f"第 {p['step']}/{p['total']} 步" if zh else f"step {p['step']}/{p['total']}") + pct
    return f"第 {p['step']} 步" if zh else f"step {p['step']}"


def _numbers(p: dict, zh: bool, *, eta: bool) -> str:
    parts = [_steps(p, zh)]
    if p.get("loss") is not None:
        parts.append(f"loss {p['loss']:.3g}")
    if p.get("eval_loss") is not None:
        parts.append(f"eval loss {p['eval_loss']:.3g}")
    if p.get("tokens_per_s"):
        parts.append(f"{p['tokens_per_s']:,.0f} tokens/s")
    if eta and p.get("eta_s") is not None:
        parts.append(f"预计还需 {duration_text(p['eta_s'], 'zh')}" if zh else f"ETA {duration_text(p['eta_s'], 'en')}")
    return ("，" if zh else ", ").join(parts)


_ENDED = {"failed": ("失败了", "failed"), "cancelled": ("已取消", "was cancelled"),
          "interrupted": ("被中断了", "was interrupted")}


def status_text(r: dict, lang: str, *, announcing: bool = False) -> str:
    """The answer for a ``finetune_status`` result, in English or Chinese (``announcing``: the end-of-job message
    in the thread that launched it, where a bare "yes" takes up a trial's offer of the full run)."""
    zh, job, status, p = lang == "zh", r["job_id"], r["status"], r.get("progress")
    what = f"{r.get('method') or 'lora'} · {r.get('base_model')} · {r.get('dataset')}"
    if status == "queued":
        text = (f"{job} 正在排队（{what}），等待 worker：运行 `stackwise worker` 开始训练。" if zh else
                f"{job} is queued ({what}); a worker picks it up: `stackwise worker`.")
    elif status in ("running", "cancelling") and p:
        verb = {"running": ("正在运行", "is running"), "cancelling": ("正在取消", "is being cancelled")}[status]
        text = (f"{job} {verb[0]}：{_numbers(p, zh, eta=True)}。" if zh else
                f"{job} {verb[1]}: {_numbers(p, zh, eta=True)}.")
    elif status in ("running", "cancelling"):
        text = (f"{job} 已开始，正在加载模型，还没有进度。" if zh else
                f"{job} has started; it is loading the model, no progress yet.")
    elif status == "succeeded":
        text = _succeeded(r, zh)
    else:
        text = _ended(r, zh)
    text += trial_text(r, zh, announcing=announcing)
    text += tracking_text(r, zh)
    if r.get("plot"):
        text += "\n损失曲线见附图。" if zh else "\nThe loss curve is attached."
    return text


def _ended(r: dict, zh: bool) -> str:
    """Failed, cancelled or interrupted: where it stopped, why, and how to continue."""
    job, p, reason = r["job_id"], r.get("progress"), r.get("error")
    said = _ENDED.get(r["status"], (r["status"], r["status"]))
    if zh:
        text = f"{job} {said[0]}" + (f"（停在{_numbers(p, zh, eta=False)}）" if p else "")
        return text + (f"：{reason}" if reason else "") + f"。可以用 `stackwise jobs resume {job}` 从上次的检查点继续。"
    text = f"{job} {said[1]}" + (f" (at {_numbers(p, zh, eta=False)})" if p else "")
    resume = f"`stackwise jobs resume {job}` continues from the last checkpoint."
    return text + (f": {reason}" if reason else "") + f". {resume}"


def _succeeded(r: dict, zh: bool) -> str:
    job, p, summary = r["job_id"], r.get("progress") or {}, r.get("summary") or {}
    loss = summary.get("final_loss") if summary.get("final_loss") is not None else p.get("loss")
    steps = summary.get("steps") or p.get("step")
    adapter = (r.get("artifacts") or {}).get("adapter")
    head = (f"{job} 已完成：{steps} 步" if zh else f"{job} succeeded: {steps} steps")
    if loss is not None:
        head += f"，最终 loss {loss:.3g}" if zh else f", final loss {loss:.3g}"
    if adapter:
        head += f"。适配器：{adapter}" if zh else f". Adapter: {adapter}"
    head += "。" if zh else "."
    evaluation = evaluation_text(summary.get("evaluation"), zh)
    if evaluation:
        head += "\n" + evaluation
    c = r.get("comparison")
    if c:
        labels = ("问题", "参考答案", "微调前", "微调后") if zh else ("Question", "Reference", "Before", "After")
        lines = [f"{label}: {c[k]}" for label, k in zip(labels, ("question", "reference", "before", "after"),
                                                          strict=True)]
        intro = "\n在一个留出的问题上的前后对比：\n" if zh else "\nBefore/after on a held-out question:\n"
        head += intro + "\n".join(lines)
    return head


def tracking_text(r: dict, zh: bool) -> str:
    """Where the job's curves are (``summary.json``'s ``tracking``, tools/finetune/tracking.py): TensorBoard,
    W&B, MLflow, and trackers that could not run; while it runs, its TensorBoard folder. "" when there is none."""
    summary = r.get("summary") if isinstance(r.get("summary"), dict) else {}
    tracking = summary.get("tracking") if isinstance(summary.get("tracking"), dict) else {}
    board = tracking.get("tensorboard")
    live = Path(r.get("run_dir") or ".") / "tensorboard"
    if not board and r.get("status") in ("running", "cancelling") and r.get("run_dir") and live.is_dir():
        board = {"command": f"tensorboard --logdir {live}"}
    lines = []
    if isinstance(board, dict) and board.get("command"):
        lines.append(f"TensorBoard: `{board['command']}`")
    wandb = tracking.get("wandb")
    if isinstance(wandb, dict) and wandb.get("url"):
        lines.append(f"W&B: {wandb['url']}")
    elif isinstance(wandb, dict):
        lines.append(f"W&B（离线）：{wandb.get('dir')}，上传：`{wandb.get('sync')}`" if zh else
                     f"W&B (offline): {wandb.get('dir')}; upload it with `{wandb.get('sync')}`")
    mlflow = tracking.get("mlflow")
    if isinstance(mlflow, dict):
        lines.append(f"MLflow: {mlflow.get('url') or mlflow.get('uri')} (run {mlflow.get('run_id')})")
    skipped = tracking.get("skipped") if isinstance(tracking.get("skipped"), dict) else {}
    lines += [f"{name} 未记录：{why}" if zh else f"{name} not tracked: {why}" for name, why in skipped.items()]
    if not lines:
        return ""
    return ("\n训练曲线：\n" if zh else "\nTracking:\n") + "\n".join(f"- {line}" for line in lines)


def cancel_text(r: dict, lang: str) -> str:
    """The answer for a ``cancel_finetune`` result."""
    job, zh = r["job_id"], lang == "zh"
    if r["status"] == "cancelled":
        return f"已取消 {job}（它还没有开始）。" if zh else f"Cancelled {job} (it had not started)."
    return (f"正在取消 {job}：worker 会先保存检查点再停止。用“{job} 的进度”查看。" if zh else
            f"Cancelling {job}: the worker saves a checkpoint and stops it. Ask \"status of {job}\" to check.")


def trial_text(r: dict, zh: bool, *, announcing: bool = False) -> str:
    """A trial run's line ("try it on 500 rows first"): it was one, on how many rows, and — once it succeeded —
    how to launch the full run; empty for other jobs."""
    trial = r.get("trial")
    if not isinstance(trial, dict) or not trial.get("rows") or not trial.get("of"):
        return ""
    rows, of, status = int(trial["rows"]), int(trial["of"]), r.get("status")
    if zh:
        text = f"\n这是一次试跑：从 {of:,} 行中分层抽样 {rows:,} 行。"
        if status == "succeeded":
            text += ("说“跑完整的”" + ("（或回复“是”）" if announcing else "") +
                     f"，就用同样的配置在全部 {of:,} 行上启动完整任务。")
        return text
    text = f"\nThis {'is' if status in ('queued', 'running', 'cancelling') else 'was'} a trial on {rows:,} of " \
           f"{of:,} rows (a stratified sample)."
    if status == "succeeded":
        text += ' Say "run the full job"' + (' (or "yes")' if announcing else "") + \
            f" to launch the same spec on all {of:,} rows."
    return text
