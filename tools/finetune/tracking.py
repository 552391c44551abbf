"""Experiment tracking for a training run: TensorBoard always, Weights & Biases and MLflow when configured.

Which trackers run is read from the training process's environment (the worker's):

- **TensorBoard**, always (no account needed), into ``RUN/tensorboard``;
- **W&B** when ``WANDB_API_KEY`` is set or ``WANDB_MODE=offline`` (``WANDB_MODE=disabled`` or
  ``WANDB_DISABLED=true`` turn it off): project ``$WANDB_PROJECT`` or ``stackwise``, the run named after the
  job, the spec as its config (``config.spec``), its files in ``RUN/wandb``;
- **MLflow** when ``MLFLOW_TRACKING_URI`` is set (``DISABLE_MLFLOW_INTEGRATION=true`` turns it off):
  experiment ``$MLFLOW_EXPERIMENT_NAME`` or ``stackwise``, the run named after the job, the spec as
  ``spec.*`` params.

The metrics are logged by transformers' own integrations (``TensorBoardCallback``, ``WandbCallback``,
``MLflowCallback``). :class:`TrackingCallback` holds them instead of the Trainer's ``report_to`` so that a
tracker whose package is missing, or which fails to start or later (no network, a bad key or URI), is
dropped with a one-line notice in ``train.log`` — and in ``summary.json`` — instead of failing the job.
It starts the W&B and MLflow runs itself, on the main process only (``state.is_world_process_zero``; the
integrations then log into those runs), finishes them when training ends, and continues the same runs
when the job is resumed (their ids come from the previous ``summary.json``).

``TrackingCallback.links`` is ``summary.json``'s ``tracking``, filled in as trackers start::

    {"tensorboard": {"dir", "command"},
     "wandb": {"mode": "offline|online", "project", "name", "run_id", "dir", "url", "sync"},
     "mlflow": {"uri", "experiment", "experiment_id", "run_id", "url"},
     "skipped": {"<tracker>": "why"}}          # only trackers that ran; "skipped" only when one did not
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from tools.finetune.rundir import RunPaths

log = logging.getLogger("stackwise.finetune")
TRUE = ("1", "true", "yes", "on")
DEFAULT_PROJECT = "stackwise"
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow-skinny"}


def wanted_trackers(env: Mapping[str, str]) -> list[str]:
    """The trackers the environment asks for, TensorBoard first.

    Example:
        >>> wanted_trackers({}), wanted_trackers({"WANDB_MODE": "offline", "MLFLOW_TRACKING_URI": "file:///m"})
        (['tensorboard'], ['tensorboard', 'wandb', 'mlflow'])
    """
    names = ["tensorboard"]
    wandb_mode = env.get("WANDB_MODE", "").strip().lower()
    wandb_off = wandb_mode == "disabled" or env.get("WANDB_DISABLED", "").strip().lower() in TRUE
    if not wandb_off and (env.get("WANDB_API_KEY", "").strip() or wandb_mode in ("offline", "dryrun")):
        names.append("wandb")
    mlflow_off = env.get("DISABLE_MLFLOW_INTEGRATION", "").strip().lower() in TRUE
    if not mlflow_off and env.get("MLFLOW_TRACKING_URI", "").strip():
        names.append("mlflow")
    return names


@contextmanager
def _env_var(name: str, value: str) -> Iterator[None]:
    """``name=value`` for the duration (the integrations read some settings from the environment)."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def _one_line(exc: BaseException, limit: int = 240) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:limit]


def _previous_links(summary_path: Path) -> dict[str, Any]:
    """The ``tracking`` of the run's last summary (a resumed job continues its W&B and MLflow runs)."""
    try:
        links = json.loads(summary_path.read_text(encoding="utf-8")).get("tracking")
    except (OSError, ValueError, AttributeError):
        return {}
    return links if isinstance(links, dict) else {}


class TrackingCallback(TrainerCallback):
    """TensorBoard, W&B and MLflow for one run, each dropped with a notice when it cannot run (see the module)."""

    def __init__(self, run_dir: Path, job: Any, *, env: Mapping[str, str] | None = None) -> None:
        """``job``: the :class:`~tools.finetune.train_setup.Job`; ``env``: the settings (default ``os.environ``)."""
        self.env = os.environ if env is None else env
        self.root = Path(run_dir)
        self.tensorboard_dir = self.root / "tensorboard"
        self.job_id = job.job_id or self.root.name
        self.spec = job.spec.model_dump(mode="json")
        self.links: dict[str, Any] = {}
        self._previous = _previous_links(RunPaths(self.root).summary)
        self._trackers: dict[str, TrainerCallback] = {}
        self._wandb_run = None       # the W&B run this callback started
        self._wandb_used = False     # wandb.init was called (its service process may be running)
        self._mlflow = None          # the mlflow module while a run this callback started is active
        for name in wanted_trackers(self.env):
            try:
                self._trackers[name] = self._integration(name)
            except (ImportError, RuntimeError):   # what the integrations raise when the package is missing
                self._skip(name, f"the {PACKAGES[name]} package is not installed on this worker: "
                                 f"`pip install {PACKAGES[name]}` there")

    def _integration(self, name: str) -> TrainerCallback:
        from transformers.integrations import MLflowCallback, TensorBoardCallback, WandbCallback

        if name == "tensorboard":
            with _env_var("TENSORBOARD_LOGGING_DIR", str(self.tensorboard_dir)):
                return TensorBoardCallback()
        return WandbCallback() if name == "wandb" else MLflowCallback()

    # ---- the training loop -----------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        main = state.is_world_process_zero
        resumed = state.global_step > 0
        if main and not resumed and "tensorboard" in self._trackers:
            shutil.rmtree(self.tensorboard_dir, ignore_errors=True)    # a fresh start: no curves of an earlier try
        if main and "wandb" in self._trackers:
            self._guard("wandb", "start", self._start_wandb, resumed)
        if main and "mlflow" in self._trackers:
            self._guard("mlflow", "start", self._start_mlflow, resumed)
        self._each("on_train_begin", args, state, control, **kwargs)
        if main and "tensorboard" in self._trackers:
            self._guard("tensorboard", "start", self._started_tensorboard)

    def on_log(self, args, state, control, **kwargs):
        self._each("on_log", args, state, control, **kwargs)

    def on_save(self, args, state, control, **kwargs):
        self._each("on_save", args, state, control, **kwargs)

    def on_evaluate(self, args, state, control, **kwargs):
        self._each("on_evaluate", args, state, control, **kwargs)

    def on_predict(self, args, state, control, **kwargs):
        self._each("on_predict", args, state, control, **kwargs)

    def on_train_end(self, args, state, control, **kwargs):
        self._each("on_train_end", args, state, control, **kwargs)
        if state.is_world_process_zero:
            self.close()

    def close(self, failed: bool = False) -> None:
        """Finish the W&B and MLflow runs (and stop W&B's service process); safe to call twice."""
        self._finish_wandb(failed)
        self._finish_mlflow(failed)

    def _finish_wandb(self, failed: bool) -> None:
        run, self._wandb_run = self._wandb_run, None
        if not self._wandb_used:
            return
        self._wandb_used = False
        try:
            import wandb

            if run is not None:
                run.finish(exit_code=1 if failed else 0)
            wandb.teardown()      # W&B's service process: no stray process once training is over
        except Exception as exc:   # the data is on disk already; a failed upload must not fail the job
            log.warning("tracking: W&B did not finish cleanly — %s", _one_line(exc))

    def _finish_mlflow(self, failed: bool) -> None:
        mlflow, self._mlflow = self._mlflow, None
        if mlflow is None:
            return
        try:
            if mlflow.active_run() is not None:
                mlflow.end_run("FAILED" if failed else "FINISHED")
        except Exception as exc:
            log.warning("tracking: MLflow did not finish cleanly — %s", _one_line(exc))

    # ---- starting the runs ---------------------------------------------------------------------------
    def _start_wandb(self, resumed: bool) -> None:
        import wandb

        mode = "offline" if self.env.get("WANDB_MODE", "").strip().lower() in ("offline", "dryrun") else "online"
        previous = self._previous.get("wandb") if resumed else None
        run_id = previous.get("run_id") if isinstance(previous, dict) else None
        project = self.env.get("WANDB_PROJECT", "").strip() or DEFAULT_PROJECT
        self._wandb_used = True
        # Silent for the whole process too: trl reads ``run.url`` at every checkpoint, which W&B warns about offline.
        wandb.setup(settings=wandb.Settings(silent=True))
        run = wandb.init(project=project, name=self.job_id, id=run_id, resume="allow" if run_id else None,
                         dir=str(self.root), mode=mode, config={"job_id": self.job_id, "spec": self.spec},
                         settings=wandb.Settings(silent=True))   # our own log line says where the run is
        self._wandb_run = run
        folder = str(run.settings.sync_dir)
        # Each session of a resumed offline run has its own folder; syncing them all uploads the whole run.
        sessions = sorted(Path(folder).parent.glob(f"offline-run-*-{run.id}")) or [Path(folder)]
        sync = "wandb sync " + " ".join(shlex.quote(str(p)) for p in sessions) if mode == "offline" else None
        self.links["wandb"] = {"mode": mode, "project": project, "name": run.name, "run_id": run.id, "dir": folder,
                               "url": run.url if mode == "online" else None, "sync": sync}
        log.info("tracking: W&B run %s (%s) %s", run.name, mode,
                 run.url if mode == "online" else f"in {folder}; upload it with `{sync}`")

    def _start_mlflow(self, resumed: bool) -> None:
        import mlflow

        uri = self.env["MLFLOW_TRACKING_URI"].strip()
        name = self.env.get("MLFLOW_EXPERIMENT_NAME", "").strip() or DEFAULT_PROJECT
        previous = self._previous.get("mlflow") if resumed else None
        run_id = previous.get("run_id") if isinstance(previous, dict) else None
        mlflow.set_tracking_uri(uri)
        experiment = mlflow.set_experiment(name)
        if mlflow.active_run() is not None:       # left by an earlier run in this process that ended abruptly
            mlflow.end_run("KILLED")
        run = mlflow.start_run(run_id=run_id, run_name=None if run_id else self.job_id,
                               tags={"stackwise.job_id": self.job_id})
        self._mlflow = mlflow
        limit = mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
        mlflow.log_params({f"spec.{k}": str(v)[:limit] for k, v in self.spec.items()})
        url = None
        if uri.startswith(("http://", "https://")):
            url = f"{uri.rstrip('/')}/#/experiments/{experiment.experiment_id}/runs/{run.info.run_id}"
        self.links["mlflow"] = {"uri": uri, "experiment": name, "experiment_id": experiment.experiment_id,
                                "run_id": run.info.run_id, "url": url}
        log.info("tracking: MLflow run %s in experiment %s at %s", run.info.run_id, name, uri)

    def _started_tensorboard(self) -> None:
        writer = getattr(self._trackers["tensorboard"], "tb_writer", None)
        if writer is not None:
            writer.add_text("stackwise/spec", "    " + json.dumps(self.spec, indent=2).replace("\n", "\n    "))
            writer.flush()
        folder = str(self.tensorboard_dir)
        self.links["tensorboard"] = {"dir": folder, "command": f"tensorboard --logdir {shlex.quote(folder)}"}

    # ---- guarding ------------------------------------------------------------------------------------
    def _each(self, event: str, args, state, control, **kwargs) -> None:
        for name, callback in list(self._trackers.items()):
            self._guard(name, event, getattr(callback, event), args, state, control, **kwargs)

    def _guard(self, name: str, what: str, fn, *args, **kwargs) -> None:
        try:
            fn(*args, **kwargs)
        except Exception as exc:   # a tracker is a convenience: whatever it raises, training goes on without it
            reason = _one_line(exc)
            if "MLFLOW_ALLOW_FILE_STORE" in str(exc):    # mlflow 3's refusal of file:// stores ends with the fix
                reason = ("MLflow 3 keeps a plain-folder store (file:…) only with MLFLOW_ALLOW_FILE_STORE=true — set "
                          "it on the worker, or point MLFLOW_TRACKING_URI at an MLflow server")
            self._drop(name, f"{'could not start' if what == 'start' else f'stopped ({what})'}: {reason}")

    def _drop(self, name: str, reason: str) -> None:
        self._trackers.pop(name, None)
        self._skip(name, reason)
        if name == "wandb":
            self._finish_wandb(failed=True)
        elif name == "mlflow":
            self._finish_mlflow(failed=True)

    def _skip(self, name: str, reason: str) -> None:
        self.links.setdefault("skipped", {})[name] = reason
        log.warning("tracking: %s skipped — %s", name, reason)
