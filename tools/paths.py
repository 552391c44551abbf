"""Resolve user-supplied paths inside the allowed roots, and nowhere else."""

from __future__ import annotations

from pathlib import Path

from tools.base import ToolContext, ToolError


def allowed_roots(ctx: ToolContext) -> list[Path]:
    roots = [Path.cwd(), ctx.uploads_dir, *ctx.data_roots]
    return [r.resolve() for r in roots]


def resolve_user_path(raw: str, ctx: ToolContext, *, must_exist: bool = True) -> Path:
    """The absolute path for ``raw`` if it lies inside an allowed root.

    Relative names are looked up in the user's upload folder first, then the other roots.
    Symlinks are resolved before the check, so a link cannot lead outside.
    """
    if not raw or "\x00" in raw:
        raise ToolError("invalid_path", "The file name is empty or contains a NUL character.")
    roots = allowed_roots(ctx)
    given = Path(raw).expanduser()
    candidates = [given] if given.is_absolute() else [root / given for root in [ctx.uploads_dir.resolve(), *roots]]
    inside, escaped = [], False
    for cand in candidates:
        real = cand.resolve()
        if _other_users_data(real, ctx):
            escaped = True   # inside $STACKWISE_HOME but not this user's uploads: never, whatever the roots say
            continue
        if any(real == r or real.is_relative_to(r) for r in roots):
            inside.append(real)
            if not must_exist or real.exists():
                return real
        elif cand.is_symlink() or (cand.exists() and not given.is_absolute()):
            escaped = True   # a link (or ../ path) inside a root that leads outside
    if not inside or escaped:
        names = ", ".join(str(r) for r in roots)
        raise ToolError("forbidden_path", f"{raw!r} is outside the folders I may read ({names}).")
    raise ToolError("not_found", f"I can't find {raw!r} in your uploads or the working directory.")


def _other_users_data(real: Path, ctx: ToolContext) -> bool:
    """``real`` lies in the stackwise home (threads, memory, jobs, every user's uploads and reports) outside this
    user's own uploads folder — reachable as a relative path when the working directory contains the home."""
    home, own = Path(ctx.home).resolve(), ctx.uploads_dir.resolve()
    return (real == home or real.is_relative_to(home)) and not (real == own or real.is_relative_to(own))
