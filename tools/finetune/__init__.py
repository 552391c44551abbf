"""Fine-tuning tools: ``launch_finetune``, ``finetune_status``, ``cancel_finetune``, and for a finished job
``export_finetune`` (merge, vLLM folder, GGUF) and ``finetune_serve_info`` (the serving commands)."""

from tools.finetune.declare import cancel_finetune, finetune_status, launch_finetune
from tools.finetune.declare_export import export_finetune, finetune_serve_info

__all__ = ["cancel_finetune", "export_finetune", "finetune_serve_info", "finetune_status", "launch_finetune"]
