"""The public Python surface other code imports: changing it is a contract change (DESIGN §2)."""

from __future__ import annotations

import agent
import memory
import tools
from agent.reply import Reply


def test_agent_package_exports():
    assert sorted(agent.__all__) == ["Agent", "InputError", "Reply", "Settings", "SettingsError", "Toolbox"]
    for name in ("ask", "stream", "astream", "resume", "tools", "call_tool", "history", "close", "from_settings"):
        assert callable(getattr(agent.Agent, name)), name


def test_tools_package_exports():
    assert sorted(tools.__all__) == ["ENTRY_POINT_GROUP", "Tool", "ToolContext", "ToolError", "ToolRegistry", "tool"]
    assert tools.ENTRY_POINT_GROUP == "stackwise.tools"


def test_memory_package_exports_the_embedder_interface():
    for name in ("Embedder", "EmbedderError", "load_embedder", "offline_models"):
        assert name in memory.__all__ and getattr(memory, name)


def test_reply_fields_are_the_contract():
    assert list(Reply.model_fields) == ["thread_id", "answer", "steps", "tool_calls", "citations", "attachments",
                                        "pending"]
    record_fields = {"tool", "args", "ok", "result", "error"}
    assert set(Reply.model_fields["tool_calls"].annotation.__args__[0].model_fields) == record_fields
