"""Progress lines, cancellation and the run's log for the training loop.

:class:`ProgressCallback` appends one JSON line per logging step to ``RUN/progress.jsonl``
(``time, step, total, epoch, loss, eval_loss, lr, tokens_per_s, eta_s, gpu_mem_gb``) and turns a
SIGTERM/SIGINT (recorded by :class:`CancelFlag`) into "save a checkpoint, then stop";
:func:`run_logging` sends everything to ``RUN/train.log`` and short lines to stderr.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

log = logging.getLogger("stackwise.finetune")
# The trainer's raw log dicts go to ``train.log`` only (the root logger's file handler).
trainer_log = logging.getLogger("stackwise.trainer")


class CancelFlag:
    """Set by SIGTERM/SIGINT; a second signal falls back to the default behaviour (stop at once)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self._event = threading.Event()
        self._previous: dict[int, Any] = {}
        self.signal_name: str | None = None

    def install(self) -> CancelFlag:
        """Install the handlers (main thread only; a no-op elsewhere)."""
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        """Put the previous handlers back."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name
        self._event.set()
        # A second signal stops the process the usual way.
        signal.signal(signum, signal.SIG_DFL if signum == signal.SIGTERM else signal.default_int_handler)

    def set(self) -> None:
        """Ask for cancellation without a signal."""
        self._event.set()

    @property
    def is_set(self) -> bool:
        return self._event.is_set()


def gpu_mem_gb() -> float | None:
    """Peak GPU memory allocated by this process in GiB (``None`` without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return None
    return round(torch.cuda.max_memory_allocated() / 2**30, 3)


def _num(value: Any, digits: int = 6) -> float | None:
    if value is None:
        return None
    try:
        return round(float(value), digits)
    except (TypeError, ValueError):
        return None


class ProgressCallback(TrainerCallback):
    """Writes ``progress.jsonl``, forces a last log/eval at the final step, and handles cancellation."""

    def __init__(self, path: Path | None, cancel: CancelFlag, *, sync: bool = False) -> None:
        """``path``: where to append progress lines (None on the ranks other than 0 of a multi-GPU run);
        ``sync``: agree on cancellation with the other ranks at every step end (all of them stop together)."""
        self.path = path
        self.cancel = cancel
        self.sync = sync
        self.cancelled = False
        self.last_loss: float | None = None
        self.last_eval_loss: float | None = None
        self._pending: dict[str, Any] | None = None
        self._t0 = self._t_prev = 0.0
        self._step0 = 0
        self._tokens0 = self._tokens_prev = 0
        self.train_seconds = 0.0
        self.session_tokens = 0

    # -- the training loop -------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        self._t0 = self._t_prev = time.monotonic()
        self._step0 = state.global_step
        self._tokens0 = self._tokens_prev = int(state.num_input_tokens_seen or 0)

    def on_step_end(self, args, state, control, **kwargs):
        stop = self.cancel.is_set
        if self.sync:
            from tools.finetune.distributed import any_rank

            stop = any_rank(stop)
        if stop and not self.cancelled:
            self.cancelled = True
            control.should_save = True
            control.should_training_stop = True
            control.should_log = True
            control.should_evaluate = False
        elif state.global_step >= state.max_steps:
            control.should_log = True
            control.should_evaluate = args.eval_strategy != "no"
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        trainer_log.info("step %s: %s", state.global_step, json.dumps(logs, default=str))
        if "loss" in logs:
            self.last_loss = _num(logs["loss"])
            line = self._line(state, logs)
            if control.should_evaluate:
                self._pending = line  # the evaluation of this step follows: write both together
            else:
                self._write(line)
        elif "eval_loss" in logs:
            self.last_eval_loss = _num(logs["eval_loss"])
            line = self._pending if self._pending is not None else self._line(state, {})
            line["eval_loss"] = self.last_eval_loss
            self._pending = None
            self._write(line)

    def on_evaluate(self, args, state, control, **kwargs):
        self._flush()

    def on_train_end(self, args, state, control, **kwargs):
        self._flush()
        self.train_seconds = time.monotonic() - self._t0
        self.session_tokens = int(state.num_input_tokens_seen or 0) - self._tokens0

    # -- helpers -------------------------------------------------------------------------
    @property
    def tokens_per_s(self) -> float | None:
        """Real (non-padding) tokens per second over this session's training."""
        if self.train_seconds <= 0 or self.session_tokens <= 0:
            return None
        return round(self.session_tokens / self.train_seconds, 1)

    def _line(self, state, logs: dict[str, Any]) -> dict[str, Any]:
        now = time.monotonic()
        tokens = int(state.num_input_tokens_seen or 0)
        dt = now - self._t_prev
        tokens_per_s = round((tokens - self._tokens_prev) / dt, 1) if dt > 0 and tokens > self._tokens_prev else None
        self._t_prev, self._tokens_prev = now, tokens
        done = state.global_step - self._step0
        eta = (state.max_steps - state.global_step) * (now - self._t0) / done if done > 0 else None
        return {
            "time": round(time.time(), 3),
            "step": state.global_step,
            "total": state.max_steps,
            "epoch": _num(state.epoch, 4),
            "loss": _num(logs.get("loss")),
            "eval_loss": None,
            "lr": _num(logs.get("learning_rate"), 10),
            "tokens_per_s": tokens_per_s,
            "eta_s": round(max(eta, 0.0), 1) if eta is not None else None,
            "gpu_mem_gb": gpu_mem_gb(),
        }

    def _flush(self) -> None:
        if self._pending is not None:
            line, self._pending = self._pending, None
            self._write(line)

    def _write(self, line: dict[str, Any]) -> None:
        if self.path is None:
            return
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(line) + "\n")
            fh.flush()


class _NoTraceback(logging.Filter):
    """Keep tracebacks out of stderr (they go to ``train.log``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.exc_info is None


@contextmanager
def run_logging(log_path: Path, prefix: str = "train"):
    """``log_path`` (``RUN/train.log``) gets everything, libraries and warnings too; stderr gets the
    ``stackwise.finetune`` logger's short lines, never a traceback. Restores the global logging set-up after."""
    import datasets
    import transformers

    file_handler = logging.FileHandler(log_path, encoding="utf-8")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    file_handler.setLevel(logging.INFO)
    err_handler = logging.StreamHandler(sys.stderr)
    err_handler.setFormatter(logging.Formatter(prefix + ": %(message)s"))
    err_handler.addFilter(_NoTraceback())
    root = logging.getLogger()
    saved = (root.level, log.level, transformers.logging.get_verbosity(), datasets.logging.get_verbosity())
    root.addHandler(file_handler)
    root.setLevel(logging.INFO)
    log.addHandler(err_handler)
    log.setLevel(logging.INFO)
    transformers.logging.set_verbosity_warning()
    transformers.logging.disable_default_handler()
    transformers.logging.enable_propagation()
    datasets.logging.set_verbosity_warning()
    datasets.disable_progress_bars()
    transformers.logging.disable_progress_bar()
    logging.captureWarnings(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")  # library warnings are logged, never raised
            yield
    finally:
        logging.captureWarnings(False)
        datasets.enable_progress_bars()
        transformers.logging.enable_progress_bar()
        transformers.logging.disable_propagation()
        transformers.logging.enable_default_handler()
        root.setLevel(saved[0])
        log.setLevel(saved[1])
        transformers.logging.set_verbosity(saved[2])
        datasets.logging.set_verbosity(saved[3])
        log.removeHandler(err_handler)
        root.removeHandler(file_handler)
        file_handler.close()
