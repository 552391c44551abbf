"""Declarations of the three fine-tune tools: schemas, routing exemplars, confirmation previews."""

from __future__ import annotations

from tools.base import not_available, tool
from tools.finetune.spec import CancelArgs, FinetuneSpec, JobRef

ISSUE = "it arrives with the fine-tune launcher"


def _launch_preview(args: dict, lang: str) -> str:
    method = {"lora": "LoRA", "qlora": "QLoRA", "full": "full SFT"}.get(str(args.get("method", "lora")), "LoRA")
    shown = {k: v for k, v in args.items() if k not in ("base_model", "dataset", "method")}
    extra = ", ".join(f"{k}={v}" for k, v in shown.items())
    model, data = args.get("base_model"), args.get("dataset")
    if lang == "zh":
        return f"将用 {method} 在 {data} 上微调 {model}" + (f"（{extra}）。" if extra else "。")
    return f"Fine-tune {model} on {data} with {method}" + (f" ({extra})." if extra else ".")


def _cancel_preview(args: dict, lang: str) -> str:
    if lang == "zh":
        return f"将取消任务 {args.get('job_id')}。"
    return f"Cancel job {args.get('job_id')}."


@tool(
    args=FinetuneSpec,
    side_effects=True,
    preview=_launch_preview,
    keywords=("fine-tune", "finetune", "fine tune", "lora", "qlora", "sft", "train", "微调", "训练"),
    exemplars={
        "en": [
            "fine-tune DeepSeek-R1-Distill-Qwen-7B on medical_cot.jsonl with LoRA rank 16",
            "finetune Qwen2.5-0.5B on my data set",
            "train a LoRA adapter on data.jsonl",
            "launch a QLoRA job for Llama on chat.json",
            "start a full SFT run of Qwen on alpaca.csv for 3 epochs",
            "can you fine tune a model on my chain-of-thought data",
            "run supervised fine-tuning with learning rate 2e-4",
            "kick off a training job with lora",
            "I want to finetune mistral on train.parquet",
        ],
        "zh": [
            "用 LoRA 在 medical_cot.jsonl 上微调 DeepSeek-R1-Distill-Qwen-7B",
            "帮我微调 Qwen2.5-0.5B",
            "用 QLoRA 训练一个模型，数据是 data.jsonl",
            "开始一个全参数微调任务",
            "在我的数据集上训练 LoRA 适配器",
            "启动微调，学习率 2e-4，训练 3 轮",
            "我想用思维链数据微调模型",
        ],
    },
)
def launch_finetune(args: FinetuneSpec, ctx) -> dict:
    """Launch a LoRA / QLoRA / full SFT fine-tune job on a GPU worker after checking the data set
    and estimating memory and time. Needs the user's confirmation."""
    return not_available("launch_finetune", ISSUE)(args, ctx)


@tool(
    args=JobRef,
    keywords=("status", "progress", "loss", "eta", "jobs", "进度", "状态"),
    exemplars={
        "en": [
            "what's the status of ft-12",
            "how is my fine-tune job going",
            "show progress of job ft-3",
            "is my training finished yet",
            "check on my training run",
            "what is the loss of my latest job",
            "how long until the fine-tune is done",
        ],
        "zh": [
            "ft-12 的进度怎么样",
            "我的微调任务跑完了吗",
            "查看训练状态",
            "最新任务的 loss 是多少",
            "训练还要多久",
            "看看任务 ft-3 的状态",
        ],
    },
)
def finetune_status(args: JobRef, ctx) -> dict:
    """Show a fine-tune job's status and progress (step, loss, learning rate, tokens/s, ETA)."""
    return not_available("finetune_status", ISSUE)(args, ctx)


@tool(
    args=CancelArgs,
    side_effects=True,
    preview=_cancel_preview,
    keywords=("cancel", "stop", "abort", "kill", "取消", "停止", "终止"),
    exemplars={
        "en": [
            "cancel job ft-12",
            "stop my fine-tune ft-3",
            "abort the training run",
            "kill job ft-7 please",
            "cancel the fine-tuning",
        ],
        "zh": [
            "取消任务 ft-12",
            "停止训练 ft-3",
            "终止我的微调任务",
            "把 ft-7 停掉",
        ],
    },
)
def cancel_finetune(args: CancelArgs, ctx) -> dict:
    """Cancel a queued or running fine-tune job. Needs the user's confirmation."""
    return not_available("cancel_finetune", ISSUE)(args, ctx)
