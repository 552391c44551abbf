"""Entry point for LangGraph Studio / ``langgraph dev`` (see ``langgraph.json``).

The server brings its own checkpointer, so the graph is compiled without one here. Input:
``{"text": "…", "user_id": "…"}``; the output state carries ``answer``, ``trace`` and ``plan``.
"""

from __future__ import annotations

from agent.brains.local import make_local_brain
from agent.graph import build_graph
from agent.settings import Settings
from agent.toolbox import Toolbox


def make_graph():
    toolbox = Toolbox(Settings.from_env())
    brain = make_local_brain(toolbox)
    # The server brings its own checkpointer; the user-memory store is ours, so Studio turns learn facts too.
    return build_graph(brain, toolbox.registry, toolbox.context_for_turn).compile(store=toolbox.user_memory().store)


graph = make_graph()
