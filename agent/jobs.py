"""``JobsService``: the one place channels (the CLI, later the bots) list, show, cancel and resume fine-tune
jobs, read their logs, and run a worker. Every call checks the owner; ``admin=True`` is the operator's view.

Store errors become :class:`JobsError` with a ``type`` a channel maps to its own error shape:
``not_found`` (no such job — or someone else's, which reads the same), ``invalid_state`` (nothing to cancel,
nothing to resume), ``invalid_args``, ``settings`` (an unknown backend, ray missing), ``store`` (a damaged or
locked database).

Example:
    >>> import tempfile; from agent.settings import Settings
    >>> service = JobsService(Settings.from_env({"STACKWISE_HOME": tempfile.mkdtemp()}))
    >>> service.list("alice")
    []
    >>> service.close()
"""

from __future__ import annotations

import builtins
import logging
import threading
from collections.abc import Callable
from typing import Any

from agent.settings import Settings
from memory.jobs import Job, JobNotFound, JobStateError, JobStore, StoreError
from memory.jobs_model import iso
from tools.finetune.backends import BackendError, LocalBackend, RayBackend, latest_checkpoint, make_backend, run_logs
from tools.finetune.worker import Worker, last_progress

MAX_TAIL = 10_000
log = logging.getLogger("stackwise.jobs")
ENDED_HEADS = {"succeeded": ("微调任务完成", "Fine-tune finished"),
               "cancelled": ("微调任务已取消", "Fine-tune cancelled"),
               "failed": ("微调任务失败", "Fine-tune failed"),
               "interrupted": ("微调任务被中断", "Fine-tune interrupted")}


class JobsError(Exception):
    """A jobs request that cannot be done: ``type`` for programs, ``message`` for people."""

    def __init__(self, type: str, message: str):  # noqa: A002
        super().__init__(message)
        self.type = type
        self.message = message


class JobsService:
    """Fine-tune jobs for channels, on the job store the settings name (Postgres at ``database_url``, else SQLite
    under ``home``), opened on first use."""

    def __init__(self, settings: Settings, *, store: JobStore | None = None):
        self.settings = settings
        self._store = store
        self._own_store = store is None
        self._lock = threading.Lock()

    @property
    def store(self) -> JobStore:
        if self._store is None:
            with self._lock:
                if self._store is None:
                    self._store = _call(JobStore.open, self.settings.home, self.settings.database_url)
        return self._store

    def close(self) -> None:
        if self._store is not None and self._own_store:
            self._store.close()
            self._store = None

    # --- reading -------------------------------------------------------------------------------------

    def list(self, user: str, admin: bool = False, *, status: str | None = None,
             limit: int = 50) -> builtins.list[dict[str, Any]]:
        """``user``'s jobs, newest first (everyone's with ``admin``), as short rows (see :func:`job_row`)."""
        jobs = _call(self.store.list, None if admin else user, status, limit)
        return [job_row(job) for job in jobs]

    def show(self, job_id: str, user: str, admin: bool = False) -> dict[str, Any]:
        """The whole job (``Job.to_dict``: spec, preflight, history, artifacts, summary) with its latest progress
        read from the run directory while it runs, and ``latest_checkpoint``."""
        job = self._get(job_id, user, admin)
        shown = job.to_dict()
        if job.is_active:
            shown["progress"] = last_progress(job.run_dir) or shown["progress"]
        checkpoint = latest_checkpoint(job.run_dir)
        shown["latest_checkpoint"] = str(checkpoint) if checkpoint else None
        return shown

    def logs(self, job_id: str, user: str, tail: int = 50, admin: bool = False) -> dict[str, Any]:
        """The last ``tail`` lines of the run's ``train.log`` and ``worker.log`` (Ray's log for a Ray job)."""
        if not 1 <= tail <= MAX_TAIL:
            raise JobsError("invalid_args", f"tail must be between 1 and {MAX_TAIL}, not {tail}")
        job = self._get(job_id, user, admin)
        text, source = run_logs(job.run_dir, tail), "run_dir"
        if not text and job.backend == "ray":
            try:
                text, source = self._ray().logs(job, tail), "ray"
            except (BackendError, JobsError) as exc:
                text = f"(no logs in {job.run_dir}, and Ray's are not available: {exc})"
        return {"id": job.id, "status": job.status, "source": source, "tail": tail, "text": text}

    # --- the owner's actions -------------------------------------------------------------------------

    def cancel(self, job_id: str, user: str, admin: bool = False) -> dict[str, Any]:
        """Cancel: a queued job at once, a running one once its worker has stopped it (``cancelling`` meanwhile)."""
        job = _call(self.store.request_cancel, job_id, None if admin else user, admin=admin)
        return job_row(job)

    def resume(self, job_id: str, user: str, admin: bool = False) -> dict[str, Any]:
        """Queue a failed, cancelled or interrupted job again; it continues from its last checkpoint."""
        job = _call(self.store.resume, job_id, None if admin else user, admin=admin)
        return job_row(job)

    # --- serving a finished job (tools/finetune/export.py does the work, owner-checked) -------------------

    def export(self, job_id: str, user: str, fmt: str = "all", *, base: str | None = None, force: bool = False,
               gguf_type: str = "f16", lang: str = "en") -> dict[str, Any]:
        """Merge ``job_id``'s adapter and export it: ``RUN/export/vllm`` (a folder vLLM serves as is) and, for
        ``gguf`` / ``all``, a GGUF file when llama.cpp's converter is there (``all`` notes it when not; ``gguf``
        fails). Takes minutes and GBs on a real model (a subprocess does the merge)."""
        from tools.finetune.export import export_job

        return self._export_call(export_job, user, lang, job_id, fmt, merge_base=base, force=force,
                                 gguf_type=gguf_type)

    def merge(self, job_id: str, user: str, *, base: str | None = None, force: bool = False) -> dict[str, Any]:
        """``export(…, "vllm")``: the merged model folder only."""
        return self.export(job_id, user, "vllm", base=base, force=force)

    def serve_info(self, job_id: str, user: str, lang: str = "en") -> dict[str, Any]:
        """The exact commands that serve ``job_id`` (vLLM, Ollama, llama.cpp) and point stackwise at it."""
        from tools.finetune.export import serve_info

        return self._export_call(serve_info, user, lang, job_id)

    def _export_call(self, fn: Callable[..., Any], user: str, lang: str, *args: Any, **kwargs: Any) -> Any:
        from tools.base import ToolContext, ToolError

        extras: dict[str, Any] = {"jobs": self.store}
        if self.settings.llama_cpp:
            extras["llama_cpp"] = self.settings.llama_cpp
        ctx = ToolContext(home=self.settings.home, user_id=user, lang=lang,
                          data_roots=tuple(self.settings.data_roots), extras=extras)
        try:
            return fn(*args, ctx, **kwargs)
        except ToolError as exc:
            raise JobsError(exc.type, exc.message) from None

    # --- the worker ----------------------------------------------------------------------------------

    def backend(self) -> LocalBackend | RayBackend:
        """The backend the settings name (``STACKWISE_JOB_BACKEND``: local by default, or ray)."""
        name, address = _backend_settings(self.settings)
        try:
            return make_backend(name, ray_address=address, ray_num_gpus=self.settings.ray_num_gpus)
        except BackendError as exc:
            raise JobsError("settings", str(exc)) from None

    def worker(self, on_finished: Callable[[Job], None] | None = None, **options: Any) -> Worker:
        """A worker on this store and the configured backend, for a channel that runs it in a thread of its own
        (and stops it with ``request_stop``). ``options`` go to :class:`~tools.finetune.worker.Worker`
        (``poll_s``, ``heartbeat_s``, ``stale_s``, ``worker_id``…)."""
        return Worker(self.settings.home, backend=self.backend(), store=self.store, on_finished=on_finished,
                      **options)

    def run_worker(self, drain: bool = False, on_finished: Callable[[Job], None] | None = None, **options: Any) -> int:
        """Run a worker in this process until the queue is empty (``drain``) or SIGTERM/SIGINT; exit code 0."""
        worker = self.worker(on_finished, **options)
        try:
            worker.run(drain)
        except StoreError as exc:
            raise JobsError("store", str(exc)) from None
        return 0

    # --- announcing a job's end where it was launched ------------------------------------------------

    def announcements(self, channel: str, user: str | None = None, limit: int = 20) -> builtins.list[dict[str, Any]]:
        """Take and return the announcements due on ``channel`` (for ``user``'s jobs, or everyone's): one per
        ended job launched from there and not announced yet. Each job is handed out once, whichever process
        asks first (see :meth:`notice` for the shape)."""
        jobs = _call(self.store.unannounced, channel, user, limit)
        return [self.notice(job) for job in jobs if _call(self.store.mark_announced, job.id)]

    def notice(self, job: Job) -> dict[str, Any]:
        """The message that tells ``job``'s launcher it ended: ``job_id``, ``owner``, ``status``, ``origin``
        (channel, thread_id, lang), ``text`` (in the launch's language: the numbers, the adapter, the held-out
        evaluation before → after, the first before/after answer, or why it stopped and how to resume) and
        ``attachments`` (the loss curve); ``trial``: a trial run's sample (``{"rows", "of", …}``), else None."""
        from tools.base import ToolContext
        from tools.finetune.status import job_status, status_text

        origin = dict(job.origin or {})
        lang = "zh" if origin.get("lang") == "zh" else "en"
        ctx = ToolContext(home=self.settings.home, user_id=job.owner, lang=lang, extras={"jobs": self.store})
        try:
            result = job_status(job.id, ctx)
            body = status_text(result, lang, announcing=True)   # a trial offers its full run: "yes"
        except Exception:   # a damaged run directory still gets its job announced, with the record's words
            log.exception("%s: cannot read the run for its announcement", job.id)
            result, body = {"attachments": []}, f"{job.id}: {job.status}" + (f" ({job.error})" if job.error else "")
        head = ENDED_HEADS.get(job.status, (job.status, job.status))
        text = f"🔔 {head[0]}：{body}" if lang == "zh" else f"🔔 {head[1]} — {body}"
        return {"job_id": job.id, "owner": job.owner, "status": job.status, "origin": origin, "text": text,
                "attachments": result.get("attachments") or [], "trial": result.get("trial")}

    def watch(self, channel: str, callback: Callable[[dict[str, Any]], None], *, user: str | None = None,
              poll_s: float = 5.0) -> JobWatcher:
        """Start a daemon thread that passes every announcement due on ``channel`` to ``callback`` (the REPL
        prints it; a bot sends it to ``notice["origin"]["thread_id"]``'s chat). Stop it with ``stop()``."""
        watcher = JobWatcher(self, channel, callback, user=user, poll_s=poll_s)
        watcher.start()
        return watcher

    # --- internals -----------------------------------------------------------------------------------

    def _get(self, job_id: str, user: str, admin: bool) -> Job:
        return _call(self.store.get, job_id, owner=None if admin else user, admin=admin)

    def _ray(self) -> RayBackend:
        _, address = _backend_settings(self.settings)
        try:
            return RayBackend(address, num_gpus=self.settings.ray_num_gpus)
        except BackendError as exc:
            raise JobsError("settings", str(exc)) from None


class JobWatcher(threading.Thread):
    """Polls the job store for announcements due on one channel and hands each to a callback; a failing
    callback or store is logged and the next poll goes on (an announcement a callback failed on is not retried:
    it was taken, so no second process repeats it either)."""

    def __init__(self, service: JobsService, channel: str, callback: Callable[[dict[str, Any]], None], *,
                 user: str | None = None, poll_s: float = 5.0):
        super().__init__(name=f"stackwise-jobs-{channel}", daemon=True)
        self.service, self.channel, self.callback, self.user = service, channel, callback, user
        self.poll_s = max(0.05, float(poll_s))
        self._stop_event = threading.Event()

    def poll(self) -> int:
        """One look: announce what is due; the number announced."""
        try:
            due = self.service.announcements(self.channel, self.user)
        except JobsError as exc:
            log.warning("job announcements for %s: %s", self.channel, exc.message)
            return 0
        for notice in due:
            try:
                self.callback(notice)
            except Exception:
                log.exception("announcing %s on %s failed", notice["job_id"], self.channel)
        return len(due)

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.poll()
            self._stop_event.wait(self.poll_s)

    def stop(self, timeout: float | None = 5.0) -> None:
        self._stop_event.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout)


def job_row(job: Job) -> dict[str, Any]:
    """A job in one line's worth of fields: id, owner, status, model, method, data set, step/total, loss,
    error, times (ISO text)."""
    spec, progress = job.spec or {}, job.progress or {}
    return {
        "id": job.id, "owner": job.owner, "status": job.status, "base_model": spec.get("base_model"),
        "method": spec.get("method"), "dataset": spec.get("dataset"), "step": progress.get("step"),
        "total": progress.get("total"), "loss": progress.get("loss"), "eval_loss": progress.get("eval_loss"),
        "eta_s": progress.get("eta_s"), "attempts": job.attempts, "backend": job.backend, "error": job.error,
        "cancel_requested": job.cancel_requested, "created_at": iso(job.created_at),
        "started_at": iso(job.started_at), "finished_at": iso(job.finished_at),
    }


def _backend_settings(settings: Settings) -> tuple[str, str | None]:
    return settings.job_backend, settings.ray_address


def _call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a store call, turning its errors into :class:`JobsError`."""
    try:
        return fn(*args, **kwargs)
    except JobNotFound as exc:
        raise JobsError("not_found", str(exc)) from None
    except JobStateError as exc:
        raise JobsError("invalid_state", str(exc)) from None
    except StoreError as exc:
        raise JobsError("store", str(exc)) from None
    except (ValueError, TypeError) as exc:
        raise JobsError("invalid_args", str(exc)) from None
