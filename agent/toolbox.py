"""Direct tool access without the graph, the router or the thread database.

``stackwise tool`` / ``stackwise tools`` and ``Agent.call_tool`` use it, so running one tool never
depends on a healthy ``threads.sqlite`` or on loading the router's model.
"""

from __future__ import annotations

import json
import threading
from typing import TYPE_CHECKING, Any

from agent.settings import Settings, parse_worker_gpu
from tools.base import ToolContext
from tools.registry import ToolRegistry, call_record

if TYPE_CHECKING:
    from agent.jobs import JobsService
    from memory.user_memory import UserMemory


def embedder_factory(name: str | None = None) -> Any:
    """The shared, cached embedder for ``name`` (imported lazily: numpy-only until first use)."""
    from memory.embedders import load_embedder

    return load_embedder(name)


def local_gpu() -> dict[str, Any] | None:
    """This machine's first CUDA GPU as ``{"name", "memory_gb", "count"}`` (count: how many it has), or ``None``
    without one (torch imported on first call only)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        props = torch.cuda.get_device_properties(0)
        return {"name": props.name, "memory_gb": round(props.total_memory / 2**30, 1),
                "count": torch.cuda.device_count()}
    except Exception:   # a broken driver reads as no GPU, never as a failed launch
        return None


class Toolbox:
    def __init__(self, settings: Settings, registry: ToolRegistry | None = None):
        self.settings = settings
        self.registry = registry or ToolRegistry.default()
        self._knowledge = None
        self._knowledge_lock = threading.Lock()
        self._jobs = None
        self._memory = None
        self._memory_lock = threading.Lock()
        self._gpu: list[dict[str, Any] | None] = []   # the probed GPU, once
        self._gpu_lock = threading.Lock()

    def worker_gpu(self) -> dict[str, Any] | None:
        """The worker's GPU for the preflight (``STACKWISE_WORKER_GPU``); ``auto`` probes this machine once."""
        kind, given = parse_worker_gpu(self.settings.worker_gpu)
        if kind != "auto":
            return given
        with self._gpu_lock:
            if not self._gpu:
                self._gpu.append(local_gpu())
        return self._gpu[0]

    def _extras(self) -> dict[str, Any]:
        """What the fine-tune tools read: the job database's URL, and the worker's GPU (lazily: probing imports
        torch) unless unknown — ``unknown``, or ``auto`` with the ray backend, whose workers are other machines."""
        extras: dict[str, Any] = {"database_url": self.settings.database_url} if self.settings.database_url else {}
        if self.settings.llama_cpp:          # the GGUF converter for export_finetune
            extras["llama_cpp"] = self.settings.llama_cpp
        kind, given = parse_worker_gpu(self.settings.worker_gpu)
        if kind == "unknown" or (kind == "auto" and self.settings.job_backend != "local"):
            return extras
        return extras | {"worker_gpu": self.worker_gpu if kind == "auto" else given}

    def knowledge(self) -> Any:
        """The knowledge base (opened on first use; cards are indexed on first search)."""
        if self._knowledge is None:
            with self._knowledge_lock:
                if self._knowledge is None:
                    from memory.kb.store import KnowledgeBase

                    self._knowledge = KnowledgeBase(self.settings.home, embedder=self.settings.kb_embedder,
                                                    chroma_url=self.settings.chroma_url,
                                                    embedder_factory=embedder_factory)
        return self._knowledge

    def ingest(self, paths: list[str], *, user_id: str | None = None,
               progress: Any = None) -> dict:
        """``kb ingest``: documents into the shared base (``user_id=None``) or one user's private part."""
        from tools.knowledge import ingest_paths

        ctx = self.context(user_id or "local")
        return ingest_paths(paths, ctx, shared=user_id is None, progress=progress)

    def user_memory(self) -> UserMemory:
        """What users told us about themselves (``memory.user_memory``; the store opens on first use, the embedder
        loads on the first fact or recall)."""
        if self._memory is None:
            with self._memory_lock:
                if self._memory is None:
                    from memory.user_memory import UserMemory

                    self._memory = UserMemory.open(self.settings.home, self.settings.database_url,
                                                   embedder_factory(self.settings.router_model))
        return self._memory

    def jobs(self) -> JobsService:
        """Fine-tune jobs: list, show, logs, cancel, resume, and the worker (the store opens on first use)."""
        if self._jobs is None:
            from agent.jobs import JobsService

            self._jobs = JobsService(self.settings)
        return self._jobs

    def close(self) -> None:
        if self._knowledge is not None:
            self._knowledge.close()
            self._knowledge = None
        if self._jobs is not None:
            self._jobs.close()
            self._jobs = None
        if self._memory is not None:
            self._memory.close()
            self._memory = None

    def context_for_turn(self, state: dict) -> ToolContext:
        """The graph's tool context: this turn's user and language, and where the turn came from (a launched
        job's end is announced there)."""
        ctx = self.context(state.get("user_id", "local"), state.get("lang", "en"))
        if state.get("thread_id"):
            ctx.extras["origin"] = {"channel": state.get("channel") or "python", "thread_id": state["thread_id"],
                                    "lang": state.get("lang", "en")}
        user = state.get("user_id", "local")
        # The GPU the user told us about, for the fine-tune preflight's advice (read only when a job is checked).
        ctx.extras["user_gpu"] = lambda: self.user_memory().profile(user).get("gpu")
        return ctx

    def context(self, user_id: str, lang: str = "en") -> ToolContext:
        return ToolContext(home=self.settings.home, user_id=user_id, data_roots=tuple(self.settings.data_roots),
                           lang=lang, embedder=embedder_factory, knowledge=self.knowledge, extras=self._extras())

    def tools(self) -> list[dict]:
        """Name, description, JSON schema and side effects of every tool."""
        return self.registry.describe()

    def call_tool(self, name: str, args: Any, *, user_id: str = "local") -> dict:
        """Run one tool (no routing, no confirmation); always a tool-call record."""
        return self.registry.call(name, args, self.context(user_id))

    def call_tool_json(self, name: str, raw_args: str, *, user_id: str = "local", what: str = "The arguments") -> dict:
        """``call_tool`` with the arguments as JSON text; text that is not JSON is an ``ok: false`` record."""
        try:
            args = json.loads(raw_args)
        except json.JSONDecodeError as exc:
            message = f"{what} is not valid JSON: {exc.msg} at column {exc.colno}."
            return call_record(name, raw_args, ok=False, error={"type": "invalid_json", "message": message})
        return self.call_tool(name, args, user_id=user_id)
