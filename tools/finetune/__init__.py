"""Fine-tuning tools: ``launch_finetune``, ``finetune_status``, ``cancel_finetune``.

The argument models are declared now so the brain can route and fill them; the launcher,
worker and job store arrive with the fine-tune issue and replace the ``not_available`` runs.
"""

from tools.finetune.declare import cancel_finetune, finetune_status, launch_finetune

__all__ = ["cancel_finetune", "finetune_status", "launch_finetune"]
