"""One settings object: every field described, read from the environment and an optional TOML file.

Precedence: explicit keyword > environment variable > ``stackwise.toml`` > default. The TOML file
is looked up as ``$STACKWISE_CONFIG``, else ``./stackwise.toml``, else ``$STACKWISE_HOME/stackwise.toml``.

Example:
    >>> Settings.from_env({"STACKWISE_HOME": "/tmp/sw", "STACKWISE_BRAIN": "local"}).brain
    'local'
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any


class SettingsError(ValueError):
    """A setting has a value we cannot use; the message names it."""


def _f(default: Any, env: str, doc: str, **kw: Any) -> Any:
    meta = {"env": env, "doc": doc}
    if callable(default):
        return field(default_factory=default, metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass(kw_only=True, frozen=True)
class Settings:
    home: Path = _f(lambda: Path("~/.stackwise").expanduser(), "STACKWISE_HOME",
                    "Where threads, memory, uploads, reports and caches live.")
    brain: str = _f("local", "STACKWISE_BRAIN", "Which brain routes and answers: local (offline) or llm.")
    data_roots: tuple[Path, ...] = _f(tuple, "STACKWISE_DATA_ROOTS",
                                      "Extra folders tools may read (os.pathsep-separated), besides the "
                                      "working directory and the user's uploads.")
    router_model: str = _f("use-multilingual", "STACKWISE_ROUTER_MODEL",
                           "Sentence embedder of the semantic router (multilingual).")
    embedding_model: str | None = _f(None, "STACKWISE_EMBEDDING_MODEL",
                                     "Default model of embedding_distance (empty: MiniLM, or USE for Chinese).")
    kb_embedder: str = _f("use-multilingual", "STACKWISE_KB_EMBEDDER",
                          "Embedder of the knowledge base (chosen by `stackwise eval retrieval`).")
    chroma_url: str | None = _f(None, "STACKWISE_CHROMA_URL",
                                "A Chroma server (http://host:port) for the knowledge base; empty: embedded, "
                                "under home.")
    database_url: str | None = _f(None, "STACKWISE_DATABASE_URL",
                                  "Postgres URL for threads/jobs; empty: SQLite under home.")
    job_backend: str = _f("local", "STACKWISE_JOB_BACKEND",
                          "Where fine-tune jobs run: local (`stackwise worker` subprocesses) or ray.")
    ray_address: str | None = _f(None, "STACKWISE_RAY_ADDRESS",
                                 "The Ray cluster's dashboard (http://head:8265) for the ray job backend; "
                                 "empty: Ray's own RAY_ADDRESS.")
    ray_num_gpus: float = _f(1.0, "STACKWISE_RAY_NUM_GPUS",
                             "GPUs each fine-tune run asks the Ray cluster for (0 on a CPU-only cluster, where a "
                             "run asking for 1 would wait forever).")
    worker_gpu: str = _f("auto", "STACKWISE_WORKER_GPU",
                         "The fine-tune worker's GPU, for the preflight's fit check: auto (this machine's, with "
                         "the local backend; unknown with ray), none (CPU only), unknown, or NAME:GB "
                         "(e.g. 'RTX 4090:24'; 'H200:141x2' for two).")
    max_message_chars: int = _f(20_000, "STACKWISE_MAX_MESSAGE_CHARS", "Longest message accepted in one turn.")
    router_threshold: float = _f(0.36, "STACKWISE_ROUTER_THRESHOLD",
                                 "Below this routing score a message is chit-chat, not a tool call.")
    llm_base_url: str | None = _f(None, "OPENAI_BASE_URL", "OpenAI-compatible endpoint for the llm brain.")
    llm_api_key: str | None = _f(None, "OPENAI_API_KEY", "API key for the llm brain.", repr=False)
    llm_model: str | None = _f(None, "STACKWISE_LLM_MODEL", "Model name for the llm brain.")
    llm_timeout_s: float = _f(60.0, "STACKWISE_LLM_TIMEOUT_S", "Seconds one request to the llm brain's model may take.")
    llama_cpp: str | None = _f(None, "STACKWISE_LLAMA_CPP",
                               "A llama.cpp checkout (or its convert_hf_to_gguf.py) for GGUF exports of fine-tunes; "
                               "empty: the converter on PATH, if any.")
    llm_max_steps: int = _f(6, "STACKWISE_LLM_MAX_STEPS",
                            "Most model calls in one turn of the llm brain (call → observe → call again → answer).")
    keep_checkpoints: int = _f(20, "STACKWISE_KEEP_CHECKPOINTS",
                               "Checkpoints kept per thread (older ones are pruned; the conversation is kept).")
    thread_max_idle_days: float = _f(90.0, "STACKWISE_THREAD_MAX_IDLE_DAYS",
                                     "Threads idle longer than this many days are deleted (0: keep forever).")
    log_level: str = _f("WARNING", "STACKWISE_LOG_LEVEL", "Logging level (logs go to stderr).")

    @property
    def threads_db(self) -> Path:
        return self.home / "threads.sqlite"

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"

    @classmethod
    def describe(cls) -> list[dict[str, str]]:
        """Each field with its environment variable and description (for docs and ``--help``)."""
        return [{"name": f.name, "env": f.metadata["env"], "doc": f.metadata["doc"]} for f in fields(cls)]

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        source: dict[str, str] = {}
        toml_path, data = _read_toml(env, overrides.get("home"))
        values.update(data)
        source.update({k: str(toml_path) for k in data})
        for f in fields(cls):
            raw = env.get(f.metadata["env"])
            if raw not in (None, ""):
                values[f.name] = raw
                source[f.name] = f"${f.metadata['env']}"
        for k, v in overrides.items():
            if v is not None:
                values[k] = v
                source[k] = "the command line"
        coerced = {}
        for k, v in values.items():
            try:
                coerced[k] = _coerce(k, v)
            except SettingsError as exc:
                raise SettingsError(f"{exc} (from {source.get(k, 'defaults')})") from None
        return cls(**coerced)

    def with_(self, **changes: Any) -> Settings:
        return replace(self, **{k: _coerce(k, v) for k, v in changes.items()})


def _read_toml(env: Mapping[str, str], home_override: Any = None) -> tuple[Path | None, dict[str, Any]]:
    home = Path(home_override or env.get("STACKWISE_HOME") or "~/.stackwise").expanduser()
    candidates = [env.get("STACKWISE_CONFIG"), "stackwise.toml", home / "stackwise.toml"]
    for cand in candidates:
        if not cand:
            continue
        path = Path(cand)
        if path.is_file():
            try:
                data = tomllib.loads(path.read_text(encoding="utf-8"))
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
                raise SettingsError(f"{path} is not valid TOML: {exc}") from None
            known = {f.name for f in fields(Settings)}
            unknown = sorted(set(data) - known)
            if unknown:
                raise SettingsError(f"{path}: unknown setting(s) {', '.join(unknown)}")
            return path, data
    return None, {}


def parse_worker_gpu(value: str) -> tuple[str, dict[str, Any] | None]:
    """``STACKWISE_WORKER_GPU`` as ``(kind, gpu)``: ``("auto" | "unknown" | "none", None)`` or
    ``("given", {"name", "memory_gb", "count"})``; ``NAME:GBxN`` describes N such GPUs.

    >>> parse_worker_gpu("RTX 4090:24")
    ('given', {'name': 'RTX 4090', 'memory_gb': 24.0, 'count': 1})
    >>> parse_worker_gpu("H200:141x2")[1]["count"]
    2
    """
    text = value.strip()
    if text.lower() in ("auto", "unknown", "none", ""):
        return (text.lower() or "unknown"), None
    name, sep, size = text.rpartition(":")
    size, times, count_text = size.lower().partition("x")
    try:
        memory_gb, count = float(size), int(count_text) if times else 1
    except ValueError:
        memory_gb, count = -1.0, 0
    if not sep or not name.strip() or not 0 < memory_gb <= 4096 or not 1 <= count <= 64:
        raise SettingsError("worker_gpu must be auto, none, unknown or NAME:GB[xCOUNT] (e.g. 'A100:80' or "
                            f"'H200:141x2'), not {value!r}")
    return "given", {"name": name.strip(), "memory_gb": memory_gb, "count": count}


def _coerce(name: str, value: Any) -> Any:
    try:
        if name == "home":
            return Path(value).expanduser().resolve()
        if name == "data_roots":
            parts = value.split(os.pathsep) if isinstance(value, str) else list(value)
            return tuple(Path(p).expanduser().resolve() for p in parts if str(p).strip())
        if name in ("max_message_chars", "llm_max_steps", "keep_checkpoints"):
            number = int(value)
            if number < 1:
                raise SettingsError(f"{name} must be at least 1, not {value!r}")
            return number
        if name in ("llm_timeout_s", "thread_max_idle_days"):
            number = float(value)
            if number < 0 or (name == "llm_timeout_s" and number == 0):
                raise SettingsError(f"{name} must be {'positive' if name == 'llm_timeout_s' else '0 or more'}, "
                                    f"not {value!r}")
            return number
        if name == "router_threshold":
            return float(value)
        if name == "ray_num_gpus":
            gpus = float(value)
            if not 0 <= gpus <= 64:
                raise SettingsError(f"ray_num_gpus must be between 0 and 64, not {value!r}")
            return gpus
        if name == "job_backend":
            if value not in ("local", "ray"):
                raise SettingsError(f"job_backend must be 'local' or 'ray', not {value!r}")
            return value
        if name == "worker_gpu":
            parse_worker_gpu(str(value))
            return str(value).strip()
        if name == "brain":
            if value not in ("local", "llm"):
                raise SettingsError(f"brain must be 'local' or 'llm', not {value!r}")
            return value
    except (TypeError, ValueError) as exc:
        if isinstance(exc, SettingsError):
            raise
        raise SettingsError(f"setting {name}: cannot use {value!r} ({exc})") from None
    return value
