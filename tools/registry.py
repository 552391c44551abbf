"""The tool registry: built-in and third-party tools through one hook, and the one way to call them.

Built-ins register through :func:`tools.builtin.register_tools`, exactly like a plugin does
through the ``stackwise.tools`` entry-point group: a plugin's entry point is a callable
``register_tools(register)`` that calls ``register(tool)`` once per tool.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from importlib.metadata import entry_points
from typing import Any

from pydantic import BaseModel, ValidationError

from tools.base import Tool, ToolContext, ToolError

log = logging.getLogger(__name__)
ENTRY_POINT_GROUP = "stackwise.tools"


def format_validation_error(exc: ValidationError) -> str:
    """One readable line per problem: ``texts: give at least 2 texts to compare``."""
    lines = []
    for err in exc.errors(include_url=False):
        where = ".".join(str(p) for p in err.get("loc", ())) or "args"
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        lines.append(f"{where}: {msg}")
    return "; ".join(lines)


def call_record(tool: str, args: Any, *, ok: bool, result: Any = None, error: dict | None = None) -> dict:
    """The tool-call record of the public contract."""
    return {"tool": tool, "args": args, "ok": ok, "result": result, "error": error}


class ToolRegistry:
    """Holds the tools by name; validates args and turns failures into ``ok: false`` records."""

    def __init__(self, tools: Iterable[Tool] = ()):
        self._tools: dict[str, Tool] = {}
        self.load_errors: list[str] = []
        for t in tools:
            self.register(t)

    @classmethod
    def default(cls, *, plugins: bool = True) -> ToolRegistry:
        """The built-in tools, plus third-party ones from the entry-point group."""
        from tools.builtin import register_tools

        reg = cls()
        register_tools(reg.register)
        if plugins:
            reg.load_plugins()
        return reg

    def register(self, tool: Tool) -> None:
        if not isinstance(tool, Tool):
            raise TypeError(f"register() takes a Tool, got {type(tool).__name__}")
        if tool.name in self._tools and self._tools[tool.name] is not tool:
            raise ValueError(f"a tool named {tool.name!r} is already registered")
        self._tools[tool.name] = tool

    def load_plugins(self) -> None:
        """Load ``stackwise.tools`` entry points; a broken plugin is logged, never fatal."""
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            try:
                hook = ep.load()
                hook(self.register)
            except Exception as exc:  # a third-party plugin must not take the bot down
                msg = f"plugin {ep.name!r} ({ep.value}) failed to load: {exc}"
                log.warning(msg)
                self.load_errors.append(msg)

    def __contains__(self, name: str) -> bool:
        return name in self._tools

    def __iter__(self):
        return iter(self._tools.values())

    def names(self) -> list[str]:
        return list(self._tools)

    def get(self, name: str) -> Tool:
        try:
            return self._tools[name]
        except KeyError:
            known = ", ".join(sorted(self._tools))
            raise ToolError("unknown_tool", f"There is no tool named {name!r}. Known tools: {known}.") from None

    def describe(self) -> list[dict]:
        return [t.describe() for t in self._tools.values()]

    def validate(self, name: str, args: Any) -> BaseModel:
        """Parse ``args`` with the tool's model, or raise ``ToolError('invalid_args', …)``."""
        tool = self.get(name)
        if not isinstance(args, dict):
            raise ToolError("invalid_args", f"Arguments for {name} must be a JSON object, got {type(args).__name__}.")
        try:
            return tool.args_model.model_validate(args)
        except ValidationError as exc:
            raise ToolError("invalid_args", f"Bad arguments for {name}: {format_validation_error(exc)}") from None

    def preflight(self, name: str, args: Any, ctx: ToolContext) -> dict | None:
        """Validate and run the tool's preflight (if any); raises ToolError."""
        tool = self.get(name)
        parsed = self.validate(name, args)
        if tool.preflight is None:
            return None
        return tool.preflight(parsed, ctx)

    def call(self, name: str, args: Any, ctx: ToolContext) -> dict:
        """Run one tool; always returns a record, never raises for a user mistake."""
        try:
            tool = self.get(name)
            parsed = self.validate(name, args)
            result = tool.run(parsed, ctx)
            shown = parsed.model_dump(mode="json", exclude_none=True)
            return call_record(name, shown, ok=True, result=result)
        except ToolError as exc:
            return call_record(name, args, ok=False, error=exc.to_dict())
        except Exception as exc:  # a bug in a tool: report it, keep the turn alive
            log.exception("tool %s crashed", name)
            return call_record(
                name, args, ok=False,
                error={"type": "internal_error", "message": f"{name} failed unexpectedly: {type(exc).__name__}: {exc}"},
            )
