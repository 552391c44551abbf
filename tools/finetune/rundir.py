"""The files of one fine-tune run directory (``ft_contract.md``), named in one place.

The launcher writes ``spec.json`` and ``data/``, the training entry the rest; the worker, the status
tool and the backends read them. Nothing here imports more than the standard library.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunPaths:
    """The files of one run directory."""

    root: Path

    @property
    def spec(self) -> Path:
        return self.root / "spec.json"

    @property
    def train_data(self) -> Path:
        return self.root / "data" / "train.jsonl"

    @property
    def eval_data(self) -> Path:
        return self.root / "data" / "eval.jsonl"

    @property
    def progress(self) -> Path:
        return self.root / "progress.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def merged(self) -> Path:
        return self.root / "merged"

    @property
    def comparison(self) -> Path:
        return self.root / "comparison.json"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def log(self) -> Path:
        return self.root / "train.log"

    @property
    def worker_log(self) -> Path:
        return self.root / "worker.log"

    @property
    def loss_plot(self) -> Path:
        return self.root / "loss.png"
