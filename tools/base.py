"""What a tool is: a typed function, its pydantic args model and the metadata the brain needs.

A tool is declared once, with :func:`tool`; the registry feeds the brain, the CLI, and the
channels from that one declaration.

Example:
    >>> class EchoArgs(BaseModel):
    ...     text: str
    >>> @tool(args=EchoArgs, exemplars={"en": ["echo this"], "zh": ["复述"]})
    ... def echo(args: EchoArgs, ctx: ToolContext) -> dict:
    ...     '''Repeat the text back.'''
    ...     return {"text": args.text}
    >>> echo.name, echo.side_effects
    ('echo', False)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel


class ToolError(Exception):
    """A user mistake or an unavailable capability, with a message a person can act on.

    ``type`` is a short machine-readable kind (``invalid_args``, ``not_found``,
    ``not_available``, ``too_large``, ``forbidden_path`` …).
    """

    def __init__(self, type: str, message: str):  # noqa: A002 - the contract calls it "type"
        super().__init__(message)
        self.type = type
        self.message = message

    def to_dict(self) -> dict[str, str]:
        return {"type": self.type, "message": self.message}


def safe_segment(name: str) -> str:
    """``name`` as one harmless path component: anything but letters, digits and ``_@+-`` is
    %-escaped, so ``../bob`` or ``a/b`` can never point into another user's folder.

    Example:
        >>> safe_segment("alice"), safe_segment("../bob"), safe_segment("telegram:42")
        ('alice', '%2E%2E%2Fbob', 'telegram%3A42')
    """
    escaped = "".join(ch if ch.isascii() and (ch.isalnum() or ch in "_@+-") else
                      "".join(f"%{b:02X}" for b in ch.encode()) for ch in name)
    return escaped or "%00"


@dataclass(kw_only=True)
class ToolContext:
    """What a tool may use, injected by the caller; tools never read the environment."""

    home: Path
    user_id: str = "local"
    data_roots: tuple[Path, ...] = ()
    lang: str = "en"
    # A factory ``name | None -> Embedder``; passed in so tools share one cached model.
    embedder: Callable[[str | None], Any] | None = None
    # A factory ``() -> KnowledgeBase``; passed in so tools share one opened knowledge base.
    knowledge: Callable[[], Any] | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def reports_dir(self) -> Path:
        return self.home / "reports"

    @property
    def uploads_dir(self) -> Path:
        return self.home / "uploads" / safe_segment(self.user_id)


@dataclass(kw_only=True)
class Tool:
    """One declared capability. ``run(args, ctx) -> dict`` does the work."""

    name: str
    description: str
    args_model: type[BaseModel]
    run: Callable[[BaseModel, ToolContext], dict]
    side_effects: bool = False
    # Bilingual phrases for the semantic router: {"en": [...], "zh": [...]}.
    exemplars: dict[str, list[str]] = field(default_factory=dict)
    # Words that strongly suggest this tool (lower-case; Chinese as written).
    keywords: tuple[str, ...] = ()
    # Optional: ``() -> words`` read when a router is built (e.g. the names of the concept cards),
    # so listing tools never pays for loading them.
    more_keywords: Callable[[], tuple[str, ...]] | None = None
    # Optional: ``(args, ctx) -> dict`` checked before a side-effect tool asks for confirmation.
    preflight: Callable[[BaseModel, ToolContext], dict] | None = None
    # Optional: ``(result, lang) -> str`` the answer text for a successful call.
    render: Callable[[dict, str], str] | None = None
    # Optional: ``(args_dict, lang) -> str`` the confirmation preview line.
    preview: Callable[[dict, str], str] | None = None

    def all_keywords(self) -> tuple[str, ...]:
        extra = self.more_keywords() if self.more_keywords else ()
        return self.keywords + tuple(k.lower() for k in extra)

    def schema(self) -> dict:
        return self.args_model.model_json_schema()

    def describe(self) -> dict:
        """The public listing: name, description, JSON schema, side effects."""
        return {
            "name": self.name,
            "description": self.description,
            "schema": self.schema(),
            "side_effects": self.side_effects,
        }


def tool(
    *,
    args: type[BaseModel],
    name: str | None = None,
    side_effects: bool = False,
    exemplars: dict[str, list[str]] | None = None,
    keywords: tuple[str, ...] | list[str] = (),
    more_keywords: Callable[[], tuple[str, ...]] | None = None,
    preflight: Callable | None = None,
    render: Callable | None = None,
    preview: Callable | None = None,
) -> Callable[[Callable], Tool]:
    """Declare a tool from a function; its docstring is the description."""

    def wrap(fn: Callable) -> Tool:
        return Tool(
            name=name or fn.__name__,
            description=inspect.cleandoc(fn.__doc__ or "").strip(),
            args_model=args,
            run=fn,
            side_effects=side_effects,
            exemplars=dict(exemplars or {}),
            keywords=tuple(k.lower() for k in keywords),
            more_keywords=more_keywords,
            preflight=preflight,
            render=render,
            preview=preview,
        )

    return wrap


def not_available(name: str, issue: str) -> Callable[[BaseModel, ToolContext], dict]:
    """A run function for a declared tool whose implementation has not landed yet."""

    def run(args: BaseModel, ctx: ToolContext) -> dict:
        raise ToolError(
            "not_available",
            f"The {name} tool is declared but not implemented in this version yet ({issue}).",
        )

    return run
