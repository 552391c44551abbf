"""Which model thinks: switching an :class:`agent.facade.Agent` between the local brain and an
OpenAI-compatible LLM (for instance the fine-tune just served by vLLM, Ollama or llama.cpp) between turns.
A mixin of ``Agent`` (it uses the agent's ``settings``, ``brain``, ``registry``, ``toolbox``, ``checkpointer``,
``user_memory``, ``graph`` and ``_lock``)."""

from __future__ import annotations

from typing import Any

from agent.graph import build_graph
from agent.settings import Settings, SettingsError


class BrainSwitch:
    """``use_model``, ``use_local_brain``, ``brain_label``."""

    def use_model(self, base_url: str, model: str, *, api_key: str | None = None) -> str:
        """From the next turn on, route and answer with the llm brain on ``model`` at ``base_url`` (any
        OpenAI-compatible endpoint — e.g. the fine-tune just served by vLLM, Ollama or llama.cpp); when it fails,
        the local brain still answers that turn and says so. The configured key goes only to the configured
        endpoint; another one gets ``api_key`` (or none). Returns the brain's label; ``SettingsError`` for a bad
        URL or an empty model name."""
        from agent.brains.llm import LLMBrain, check_llm_settings
        from agent.brains.llm_client import ChatClient
        from agent.brains.llm_prompt import tool_specs

        url, name = (base_url or "").strip().rstrip("/"), (model or "").strip()
        if not url.startswith(("http://", "https://")) or not name:
            raise SettingsError("give the endpoint's http(s) URL and the served model's name, e.g. "
                                f"http://127.0.0.1:8000/v1 ft-12 (got {base_url!r} {model!r})")
        key = api_key or (self.settings.llm_api_key if url == (self.settings.llm_base_url or "").rstrip("/") else None)
        settings = self.settings.with_(brain="llm", llm_base_url=url, llm_model=name, llm_api_key=key)
        check_llm_settings(settings)
        local = getattr(self.brain, "local", self.brain)
        client = ChatClient(model=settings.llm_model, base_url=url, api_key=key, timeout_s=settings.llm_timeout_s,
                            tools=tool_specs(self.registry), known_tools=set(self.registry.names()))
        self._swap_brain(LLMBrain(local, client, max_steps=settings.llm_max_steps), settings)
        return self.brain.label

    def use_local_brain(self) -> str:
        """From the next turn on, the local brain routes and answers (offline); returns its label."""
        self._swap_brain(getattr(self.brain, "local", self.brain), self.settings.with_(brain="local"))
        return self.brain_label

    @property
    def brain_label(self) -> str:
        """``local`` or ``llm · MODEL``: which brain answers the next turn."""
        return getattr(self.brain, "label", self.brain.name)

    def _swap_brain(self, brain: Any, settings: Settings) -> None:
        graph = build_graph(brain, self.registry, self.toolbox.context_for_turn).compile(
            checkpointer=self.checkpointer, store=self.user_memory.store)
        with self._lock:            # never in the middle of a turn
            self.brain, self.graph, self.settings = brain, graph, settings
