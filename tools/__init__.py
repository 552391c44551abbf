"""Capabilities of stackwise: one module per tool, and the registry that serves them."""

from tools.base import Tool, ToolContext, ToolError, tool
from tools.registry import ENTRY_POINT_GROUP, ToolRegistry

__all__ = ["ENTRY_POINT_GROUP", "Tool", "ToolContext", "ToolError", "ToolRegistry", "tool"]
