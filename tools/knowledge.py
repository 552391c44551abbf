"""The knowledge base as tools see it: one opened base per home, and ``kb_ingest`` — a user adds
their own notes (md/txt/pdf/html files or folders) to their private part of the base.

``stackwise kb ingest`` runs the same :func:`ingest_paths` into the shared part.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from memory.kb.index import KnowledgeError
from memory.kb.readers import SUFFIXES, DocumentError
from memory.kb.store import KnowledgeBase
from tools.base import ToolContext, ToolError, tool
from tools.paths import allowed_roots, resolve_user_path

MAX_FILES = 10_000
_bases: dict[str, KnowledgeBase] = {}
_lock = threading.Lock()


def knowledge_base(ctx: ToolContext) -> KnowledgeBase:
    """The caller's knowledge base (``ctx.knowledge``), else one per home with the default settings."""
    if ctx.knowledge is not None:
        return ctx.knowledge()
    with _lock:
        key = str(ctx.home)
        if key not in _bases:
            _bases[key] = KnowledgeBase(ctx.home, embedder_factory=ctx.embedder)
        return _bases[key]


def _files(path: Path, roots: list[Path]) -> tuple[list[Path], list[dict]]:
    """Ingestible files under ``path`` (itself when a file); links leading outside the roots are skipped."""
    if path.is_file():
        return [path], []
    found, skipped = [], []
    for folder, dirs, names in os.walk(path, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if name.startswith(".") or not name.lower().endswith(SUFFIXES):
                continue
            real = (Path(folder) / name).resolve()
            if not any(real == r or real.is_relative_to(r) for r in roots):
                skipped.append({"path": str(Path(folder) / name), "error": "a link to a place outside the allowed "
                                "folders; skipped"})
                continue
            found.append(real)
            if len(found) > MAX_FILES:
                raise ToolError("too_many_files", f"{path} holds more than {MAX_FILES} documents; ingest it in parts.")
    return found, skipped


def ingest_paths(raw_paths: list[str], ctx: ToolContext, *, shared: bool,
                 progress: Callable[[int, int, str], None] | None = None) -> dict:
    """Resolve, walk and ingest; every path gets an outcome, one bad file never stops the rest."""
    kb = knowledge_base(ctx)
    roots = allowed_roots(ctx)
    files: list[Path] = []
    failed: list[dict] = []
    for raw in raw_paths:
        try:
            path = resolve_user_path(raw, ctx)
        except ToolError as exc:
            failed.append({"path": raw, "error": exc.message})
            continue
        if path.is_file() and not path.name.lower().endswith(SUFFIXES):
            failed.append({"path": raw, "error": f"{path.name}: only {', '.join(SUFFIXES)} files are ingested"})
            continue
        found, skipped = _files(path, roots)
        failed += skipped
        if path.is_dir() and not found:
            failed.append({"path": raw, "error": f"no {', '.join(SUFFIXES)} files in this folder"})
        files += [f for f in found if f not in files]
    outcome: dict[str, list] = {"added": [], "updated": [], "unchanged": []}
    chunks, started = 0, time.perf_counter()
    for done, path in enumerate(files, start=1):
        try:
            result = kb.ingest_file(path, owner=None if shared else ctx.user_id)
        except (DocumentError, KnowledgeError) as exc:
            failed.append({"path": str(path), "error": str(exc)})
        else:
            outcome[result["status"]].append({"source": result["source"], "chunks": result["chunks"]})
            if result["status"] != "unchanged":
                chunks += result["chunks"]
        if progress:
            progress(done, len(files), path.name)
    seconds = time.perf_counter() - started
    return {**outcome, "failed": failed, "chunks": chunks, "seconds": round(seconds, 3),
            "chunks_per_s": round(chunks / seconds, 1) if chunks and seconds > 0 else None,
            "scope": "shared" if shared else "private"}


class IngestArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    paths: list[str] = Field(min_length=1, max_length=100,
                             description="Files or folders (.md .txt .pdf .html) to add to your knowledge base.")


def render_ingest(result: dict, lang: str = "en") -> str:
    added, updated, same, failed = (len(result[k]) for k in ("added", "updated", "unchanged", "failed"))
    if lang == "zh":
        text = (f"已加入你的知识库：新增 {added} 个文件，更新 {updated} 个，未变化 {same} 个"
                f"（共 {result['chunks']} 个片段）。")
        fail = "未能导入：" if failed else ""
    else:
        text = (f"Added to your knowledge base: {added} new, {updated} updated, {same} unchanged "
                f"({result['chunks']} chunks indexed).")
        fail = "Not ingested: " if failed else ""
    if failed:
        text += "\n" + fail + "; ".join(f"{f['path']} ({f['error']})" for f in result["failed"][:5])
    return text


@tool(
    args=IngestArgs,
    keywords=("knowledge base", "ingest", "index my", "add my notes", "知识库", "导入", "收录"),
    exemplars={
        "en": ["add notes.md to my knowledge base", "ingest the docs folder into the knowledge base",
               "index my paper.pdf so you can answer from it", "learn from team-guide.html",
               "put handbook.txt into your knowledge base"],
        "zh": ["把 notes.md 加到我的知识库", "导入 docs 文件夹到知识库", "把 paper.pdf 收录进知识库，之后根据它回答",
               "学习一下 guide.html 这个文档"],
    },
    render=render_ingest,
)
def kb_ingest(args: IngestArgs, ctx: ToolContext) -> dict:
    """Add your own notes (md/txt/pdf/html files or folders) to your private part of the knowledge base,
    so explain_concept can answer from them with citations."""
    result = ingest_paths(args.paths, ctx, shared=False)
    if result["failed"] and not (result["added"] or result["updated"] or result["unchanged"]):
        raise ToolError("ingest_failed", "; ".join(f"{f['path']}: {f['error']}" for f in result["failed"][:5]))
    return result
