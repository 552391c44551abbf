"""Entry point for LangGraph Studio / ``langgraph dev`` (see ``langgraph.json``).

The server brings its own checkpointer, so the graph is compiled without one here. Input:
``{"text": "…", "user_id": "…"}``; the output state carries ``answer``, ``trace`` and ``plan``.
"""

from __future__ import annotations

from agent.brains.local import LocalBrain
from agent.graph import build_graph, default_context_factory
from agent.router import SemanticRouter
from agent.settings import Settings
from tools.registry import ToolRegistry


def make_graph():
    from memory.embedders import load_embedder

    settings = Settings.from_env()
    registry = ToolRegistry.default()
    router = SemanticRouter(list(registry), load_embedder(settings.router_model),
                            threshold=settings.router_threshold, cache_dir=settings.cache_dir)
    brain = LocalBrain(registry, router)
    return build_graph(brain, registry, default_context_factory(settings, load_embedder)).compile()


graph = make_graph()
