"""The built-in tools, registered through the same hook a third-party plugin uses."""

from __future__ import annotations

from collections.abc import Callable

from tools.base import Tool


def register_tools(register: Callable[[Tool], None]) -> None:
    from tools.embedding_distance import embedding_distance
    from tools.explain import explain_concept
    from tools.finetune import cancel_finetune, export_finetune, finetune_serve_info, finetune_status, launch_finetune
    from tools.knowledge import kb_ingest
    from tools.shap_report import shap_report

    for t in (explain_concept, embedding_distance, launch_finetune, finetune_status, cancel_finetune, shap_report,
              kb_ingest, export_finetune, finetune_serve_info):
        register(t)
