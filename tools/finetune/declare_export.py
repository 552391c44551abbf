"""Declarations of ``export_finetune`` (merge and export a finished job for vLLM / Ollama / llama.cpp) and
``finetune_serve_info`` (the exact commands that serve it and point stackwise at it).

``export_finetune`` asks first, like ``launch_finetune``: on a real model it loads the whole base model for
minutes and writes several GB (twice with GGUF); its preflight shows what is merged into what, where it goes
and the free disk space, and refuses before the question when the job cannot be exported.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tools.base import ToolContext, tool
from tools.finetune.spec import JobRef


class ExportArgs(JobRef):
    """Which finished job to export, and to what."""

    format: Literal["vllm", "gguf", "all"] = Field(
        "all", description="vllm: a merged model folder vLLM serves as is; gguf: also a GGUF file for Ollama / "
                           "llama.cpp (needs llama.cpp's converter); all: the folder, and GGUF when the converter "
                           "is available.")
    gguf_type: Literal["f16", "bf16", "q8_0"] = Field("f16", description="Precision of the GGUF file.")
    merge_base: str | None = Field(
        None, max_length=500,
        description="Merge onto this base model instead of the job's (a local folder or a cached hub id) — e.g. "
                    "the bf16 original when the job trained on a pre-quantized base.")
    force: bool = Field(False, description="Export again even when the export is up to date.")


def _export_check(args: ExportArgs, ctx: ToolContext) -> dict:
    from tools.finetune.export import export_check
    from tools.finetune.export_text import check_lines

    check = export_check(args.job_id, args.format, ctx, merge_base=args.merge_base, gguf_type=args.gguf_type,
                         force=args.force)
    return check_lines(check, ctx.lang)


def _export_preview(args: dict, lang: str) -> str:
    from tools.finetune.export_text import export_preview

    return export_preview(args, lang)


def _export_text(result: dict, lang: str) -> str:
    from tools.finetune.export_text import export_text

    return export_text(result, lang)


def _serve_text(result: dict, lang: str) -> str:
    from tools.finetune.export_text import serve_text

    return serve_text(result, lang)


@tool(
    args=ExportArgs,
    side_effects=True,
    preflight=_export_check,
    preview=_export_preview,
    render=_export_text,
    keywords=("merge", "merged", "export", "gguf", "合并", "导出", "转成", "转换"),
    exemplars={
        "en": [
            "merge ft-12 and export it for vLLM",
            "merge the adapter of ft-3 into the base model",
            "export ft-7 to GGUF for Ollama",
            "convert my fine-tuned model to gguf",
            "export my latest job so I can serve it",
            "merge the LoRA weights and save the full model",
            "make a llama.cpp gguf of ft-4",
        ],
        "zh": [
            "把 ft-12 合并导出",
            "合并 ft-3 的 LoRA 适配器",
            "把 ft-7 导出成 GGUF 给 Ollama 用",
            "把微调好的模型转成 gguf",
            "导出 ft-5 给 vLLM 部署",
            "把适配器合并到基座模型里",
        ],
    },
)
def export_finetune(args: ExportArgs, ctx) -> dict:
    """Merge a finished fine-tune's LoRA adapter into its base model and export it: a folder vLLM serves as is,
    and a GGUF file for Ollama / llama.cpp when llama.cpp's converter is available. Needs the user's
    confirmation (it writes several GB)."""
    from tools.finetune.export import export_job

    return export_job(args.job_id, args.format, ctx, merge_base=args.merge_base, gguf_type=args.gguf_type,
                      force=args.force)


@tool(
    args=JobRef,
    render=_serve_text,
    keywords=("serve", "serving", "deploy", "host", "vllm serve", "ollama", "llama-server", "部署", "上线", "推理服务"),
    exemplars={
        "en": [
            "how do I serve ft-12?",
            "how can I deploy my fine-tuned model with vLLM",
            "give me the commands to run ft-3 in Ollama",
            "serve my latest fine-tune",
            "how do I chat with the model I just trained",
            "what's the vllm serve command for ft-7",
            "host ft-5 with llama.cpp",
        ],
        "zh": [
            "怎么部署 ft-12？",
            "用 vLLM 部署我微调好的模型",
            "ft-3 怎么用 Ollama 跑起来",
            "怎么和我刚训练好的模型对话",
            "给我 ft-7 的 vllm serve 命令",
            "把 ft-5 上线成推理服务要怎么做",
        ],
    },
)
def finetune_serve_info(args: JobRef, ctx) -> dict:
    """Show the exact commands that serve a finished fine-tune (vLLM — merged, or the LoRA on its base —,
    Ollama, llama.cpp) and how to point stackwise's llm brain at it, with what still has to be exported."""
    from tools.finetune.export import serve_info

    return serve_info(args.job_id, ctx)
