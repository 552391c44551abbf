"""Fine-tune job records: the statuses, the transitions between them, the errors, and the ``Job`` value.

Lifecycle::

    queued ──claim──▶ running ──finish──▶ succeeded | failed | cancelled | interrupted
      │                  │
      │ cancel           │ cancel (the worker sees ``cancel_requested`` and stops the run)
      ▼                  ▼
    cancelled        cancelling ──finish──▶ cancelled (or succeeded | failed if the run ended first)
                         │ dead worker ──▶ interrupted
    failed | cancelled | interrupted ──resume──▶ queued   (same run dir: training continues from its checkpoint)
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

STATUSES = ("queued", "running", "cancelling", "succeeded", "failed", "cancelled", "interrupted")
ACTIVE = frozenset({"running", "cancelling"})
FINISHED = frozenset({"succeeded", "failed", "cancelled", "interrupted"})
RESUMABLE = frozenset({"failed", "cancelled", "interrupted"})

TRANSITIONS: dict[str, frozenset[str]] = {
    "queued": frozenset({"running", "cancelled"}),
    "running": frozenset({"cancelling", "succeeded", "failed", "cancelled", "interrupted"}),
    "cancelling": frozenset({"cancelled", "succeeded", "failed", "interrupted"}),
    "succeeded": frozenset(),
    "failed": frozenset({"queued"}),
    "cancelled": frozenset({"queued"}),
    "interrupted": frozenset({"queued"}),
}

# How a message says where a job stands: "ft-3 already succeeded; nothing to cancel".
_STANDING = {
    "queued": "is queued",
    "running": "is running",
    "cancelling": "is already being cancelled",
    "succeeded": "already succeeded",
    "failed": "already failed",
    "cancelled": "is already cancelled",
    "interrupted": "was interrupted",
}

JOB_ID = re.compile(r"^ft-(\d{1,9})$")


class JobError(Exception):
    """A job operation that cannot be done; the message is meant for the user."""


class JobNotFound(JobError, LookupError):
    """No such job for this user (a job of someone else reads exactly like a missing one)."""

    def __init__(self, job_id: object):
        self.job_id = job_id
        text = str(job_id)
        hint = "" if JOB_ID.match(text) else " (job ids look like ft-12)"
        super().__init__(f"There is no job {text}{hint}.")


class JobStateError(JobError, ValueError):
    """The job's status does not allow the requested change."""


def standing(job_id: str, status: str) -> str:
    """Where a job stands, as the start of a sentence.

    Example:
        >>> standing("ft-3", "succeeded")
        'ft-3 already succeeded'
    """
    return f"{job_id} {_STANDING.get(status, f'is {status}')}"


def check_transition(job_id: str, current: str, new: str) -> None:
    """Raise :class:`JobStateError` unless ``current → new`` is a valid step of the lifecycle."""
    if new not in TRANSITIONS.get(current, ()):
        raise JobStateError(f"{standing(job_id, current)}; it cannot become {new}.")


def normalize_job_id(job_id: object) -> str:
    """``" FT-12 "`` → ``"ft-12"``; anything that is not a job id raises :class:`JobNotFound`."""
    text = str(job_id).strip().lower() if isinstance(job_id, str) else ""
    if not JOB_ID.match(text):
        raise JobNotFound(job_id)
    return text


def iso(ts: float | None) -> str | None:
    """Unix seconds → ISO-8601 UTC text (``None`` stays ``None``)."""
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class HistoryEntry:
    """One status change: the new status, when (Unix seconds) and why."""

    status: str
    at: float
    note: str

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "at": iso(self.at), "note": self.note}


@dataclass(frozen=True)
class Job:
    """A snapshot of one fine-tune job record. Times are Unix seconds; :meth:`to_dict` shows them as ISO text.

    ``worker_pid`` is the process that claimed the job, ``pid`` the training process the worker reported
    (both on ``host``); ``attempts`` counts claims, so ``attempts > 1`` means a resumed run.
    """

    id: str
    owner: str
    status: str
    spec: dict[str, Any]
    preflight: dict[str, Any]
    run_dir: str
    created_at: float
    queued_at: float
    history: tuple[HistoryEntry, ...] = ()
    progress: dict[str, Any] | None = None
    artifacts: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] | None = None
    error: str | None = None
    started_at: float | None = None
    heartbeat_at: float | None = None
    finished_at: float | None = None
    worker: str | None = None
    worker_pid: int | None = None
    pid: int | None = None
    host: str | None = None
    backend: str | None = None
    backend_ref: str | None = None
    cancel_requested: bool = False
    attempts: int = 0
    origin: dict[str, Any] | None = None       # where it was launched: {"channel", "thread_id", "lang", …}
    announced_at: float | None = None          # when its end was announced there

    @property
    def number(self) -> int:
        """``12`` for ``ft-12``."""
        return int(self.id.split("-", 1)[1])

    @property
    def is_active(self) -> bool:
        """A worker holds it (running or being cancelled)."""
        return self.status in ACTIVE

    @property
    def is_finished(self) -> bool:
        return self.status in FINISHED

    @classmethod
    def from_row(cls, row: Any, history: list[Any]) -> Job:
        """Build from a ``jobs`` row and its ``job_history`` rows (mappings by column name)."""
        return cls(
            id=row["id"], owner=row["owner"], status=row["status"],
            spec=json.loads(row["spec"]), preflight=json.loads(row["preflight"]), run_dir=row["run_dir"],
            created_at=row["created_at"], queued_at=row["queued_at"],
            history=tuple(HistoryEntry(h["status"], h["at"], h["note"]) for h in history),
            progress=_json(row["progress"]), artifacts=_json(row["artifacts"]) or {},
            summary=_json(row["summary"]), error=row["error"],
            started_at=row["started_at"], heartbeat_at=row["heartbeat_at"], finished_at=row["finished_at"],
            worker=row["worker"], worker_pid=row["worker_pid"], pid=row["pid"], host=row["host"],
            backend=row["backend"], backend_ref=row["backend_ref"],
            cancel_requested=bool(row["cancel_requested"]), attempts=row["attempts"],
            origin=_json(row["origin"]), announced_at=row["announced_at"],
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready copy (what ``finetune_status``, ``jobs show`` and ``/v1/jobs`` build on)."""
        return {
            "id": self.id, "owner": self.owner, "status": self.status,
            "spec": _copy(self.spec), "preflight": _copy(self.preflight), "run_dir": self.run_dir,
            "progress": _copy(self.progress), "artifacts": _copy(self.artifacts), "summary": _copy(self.summary),
            "error": self.error, "history": [h.to_dict() for h in self.history],
            "created_at": iso(self.created_at), "queued_at": iso(self.queued_at),
            "started_at": iso(self.started_at), "heartbeat_at": iso(self.heartbeat_at),
            "finished_at": iso(self.finished_at),
            "worker": self.worker, "worker_pid": self.worker_pid, "pid": self.pid, "host": self.host,
            "backend": self.backend, "backend_ref": self.backend_ref,
            "cancel_requested": self.cancel_requested, "attempts": self.attempts,
            "origin": _copy(self.origin), "announced_at": iso(self.announced_at),
        }


def check_owner(owner: str) -> str:
    """A valid owner (user id) or ``ValueError``."""
    if not isinstance(owner, str) or not owner.strip() or len(owner) > 300:
        raise ValueError("a job owner is a non-empty user id of at most 300 characters")
    return owner


def json_text(value: Any, what: str) -> str:
    """A record field as strict JSON text; NaN/∞ (a diverged loss) become ``null`` so every reader can parse it."""
    if not isinstance(value, dict):
        raise TypeError(f"a job's {what} is a dict, not {type(value).__name__}")
    try:
        return json.dumps(_finite(value), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"a job's {what} must be plain JSON: {exc}") from None


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _json(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _copy(value: Any) -> Any:
    # Records hold plain JSON values, so a JSON round trip is a deep copy callers may change freely.
    return None if value is None else json.loads(json.dumps(value))
