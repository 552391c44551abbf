"""The brain of stackwise: settings, the graph, the brains and the ``Agent`` facade.

Names are imported on first use, so ``stackwise jobs`` / ``stackwise worker`` (which need only the
``Toolbox``) start without loading LangGraph.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.facade import Agent, InputError
    from agent.reply import Reply
    from agent.settings import Settings, SettingsError
    from agent.toolbox import Toolbox

_HOMES = {"Agent": "agent.facade", "InputError": "agent.facade", "Reply": "agent.reply",
          "Settings": "agent.settings", "SettingsError": "agent.settings", "Toolbox": "agent.toolbox"}

__all__ = ["Agent", "InputError", "Reply", "Settings", "SettingsError", "Toolbox"]


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'agent' has no attribute {name!r}")
