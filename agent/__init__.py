"""The brain of stackwise: settings, the graph, the brains and the ``Agent`` facade."""

from agent.facade import Agent, InputError
from agent.reply import Reply
from agent.settings import Settings, SettingsError
from agent.toolbox import Toolbox

__all__ = ["Agent", "InputError", "Reply", "Settings", "SettingsError", "Toolbox"]
