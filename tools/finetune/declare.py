"""Declarations of the three fine-tune tools: schemas, routing exemplars, confirmation previews and answers.

The work lives in :mod:`tools.finetune.launch` (model, preflight, queueing) and :mod:`tools.finetune.status`
(status, loss plot, cancel); this module adds what the user reads, in English and Chinese.
"""

from __future__ import annotations

from pathlib import Path

from tools.base import ToolContext, tool
from tools.finetune.spec import CancelArgs, FinetuneSpec, JobRef
from tools.finetune.status import cancel_job, cancel_text, duration_text, job_status, status_text

FORMATS = {"en": {"cot": "chain-of-thought", "chat": "chat", "alpaca": "alpaca"},
           "zh": {"cot": "思维链", "chat": "对话", "alpaca": "alpaca"}}
METHODS = {"lora": "LoRA", "qlora": "QLoRA", "full": "full SFT"}
ZH_WARNINGS = {
    "tiny_dataset": "只有 {rows} 行数据：模型几乎学不到东西，可能只会记住这些行；通常需要几百行以上。",
    "no_eval": "没有留出评估数据（少于 10 行或 eval_fraction 为 0）：不会有 eval loss，也没有前后对比。",
    "high_lr": "学习率偏高，loss 可能发散（LoRA 常用 1e-4 到 3e-4，全参数 1e-5 到 5e-5）。",
    "rows_cut": "{cut} 行超过 max_seq_len {msl}，会被截断；可以调大 max_seq_len 或去掉过长的行。",
    "no_room": "有训练行的提示词本身就达到 max_seq_len，留不下可学习的回答 token；请调大 max_seq_len。",
    "qlora_needs_gpu": "QLoRA 需要 CUDA GPU（bitsandbytes 4 位内核），在只有 CPU 的 worker 上会失败。",
    "unknown_targets": "target_modules 里有不是该模型线性层的名字，它们不会增加可训练参数。",
    "seq_beyond_model": "max_seq_len 超过了模型的 max_position_embeddings。",
    "slow_on_cpu": "在 CPU 上会非常慢，请使用 GPU。",
    "no_chat_template": "模型没有对话模板，提示词使用简单的 '### User:' 格式。",
    "packing": "每步处理的 token 中约 {padding:.0%} 是填充（每批 {batch} 行，长短不一）。把行无填充地拼接（packing: "
               "true，行与行之间互不注意）这里约快 {speedup:.1f} 倍——回复“否”，再加上“用 packing”重新提交。",
}


def _count(n: float) -> str:
    """``1234`` → ``1.2 K``, ``7.6e9`` → ``7.6 B``."""
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f}"


def preflight_lines(report: dict, lang: str) -> dict:
    """The preflight as short lines the confirmation question shows (``warnings`` as a list)."""
    zh, rows, tok, train = lang == "zh", report["rows"], report["tokens"], report["training"]
    fmt = FORMATS["zh" if zh else "en"].get(report["format"], report["format"])
    model = report.get("model") or {}
    where = {"local": ("本地文件夹", "local folder"), "huggingface": ("Hugging Face 缓存", "Hugging Face cache"),
             "modelscope": ("ModelScope 缓存", "ModelScope cache")}.get(model.get("source"), ("", ""))
    cut = report["rows_cut"]
    if zh:
        out = {"模型": f"{model.get('resolved')}（{where[0]}：{model.get('path')}）",
               "数据": f"{rows['total']:,} 行（训练 {rows['train']:,}，评估 {rows['eval']:,}），"
                       f"{fmt}，{report['container']}",
               "长度": f"每行 token 中位数 {tok['median']:,}，p95 {tok['p95']:,}，最长 {tok['max']:,}；"
                       + (f"{cut:,} 行超过 {report['max_seq_len']} 会被截断" if cut else "没有行被截断"),
               "步数": f"{train['total_steps']:,} 步（有效 batch {train['effective_batch']}）"}
    else:
        out = {"model": f"{model.get('resolved')} ({where[1]}: {model.get('path')})",
               "data": f"{rows['total']:,} rows ({rows['train']:,} train, {rows['eval']:,} eval), {fmt} "
                       f"{report['container']}",
               "tokens": f"per row median {tok['median']:,}, p95 {tok['p95']:,}, max {tok['max']:,}; "
                         + (f"{cut:,} rows longer than {report['max_seq_len']} will be cut" if cut else "none cut"),
               "steps": f"{train['total_steps']:,} (effective batch {train['effective_batch']})"}
    out.update(_model_lines(report, zh))
    out["warnings"] = [_warning(w, report, zh) for w in report["warnings"]]
    return out


def _model_lines(report: dict, zh: bool) -> dict:
    params, vram, timing, gpu = report.get("params"), report.get("vram"), report.get("time"), report.get("gpu")
    if not params:
        return {}
    share = f"{params['trainable_fraction']:.2%}"
    vram_text = f"≈ {vram['total_gb']:.1f} GiB"
    if vram["gradient_checkpointing"]:
        kept, layers = vram.get("checkpointed_layers"), vram.get("layers")
        if kept and layers and kept < layers:
            vram_text += f"（{layers} 层中 {kept} 层开启梯度检查点）" if zh else \
                f" with gradient checkpointing on {kept} of {layers} layers"
        else:
            vram_text += "（开启梯度检查点）" if zh else " with gradient checkpointing"
    if vram.get("recompute_mlp"):       # the preflight's cheaper saving, before (or with) checkpointing
        vram_text += "（MLP 在反向传播时重算 down_proj 的输入）" if zh else \
            ", the MLPs recomputing their down projection's input"
    if gpu:
        fits = ("放得下" if zh else "fits") if report.get("fits") else ("放不下" if zh else "does not fit")
        vram_text += f"，{fits} {gpu.get('name')}（{gpu.get('memory_gb')} GiB）" if zh else \
            f"; {fits} on {gpu.get('name')} ({gpu.get('memory_gb')} GiB)"
    elif not report.get("gpu_known", True):
        vram_text += "；worker 的 GPU 未知" if zh else "; the worker's GPU is unknown"
    kind = timing["gpu_kind"] + ("（假定）" if zh and timing.get("assumed_gpu") else
                                 " (assumed)" if timing.get("assumed_gpu") else "")
    if zh:
        return {"可训练参数": f"{_count(params['trainable'])} / {_count(params['total'])}（{share}）",
                "显存": vram_text,
                "时间": f"约 {duration_text(timing['seconds'], 'zh')}，约 {timing['tokens_per_s']:,} token/s，{kind}"}
    return {"trainable": f"{_count(params['trainable'])} of {_count(params['total'])} parameters ({share})",
            "VRAM": vram_text,
            "time": f"≈ {duration_text(timing['seconds'], 'en')} at ≈ {timing['tokens_per_s']:,} tokens/s on {kind}"}


def _warning(w: dict, report: dict, zh: bool) -> str:
    if not zh or w["code"] not in ZH_WARNINGS:
        return w["message"]
    return ZH_WARNINGS[w["code"]].format(rows=report["rows"]["total"], cut=report["rows_cut"],
                                         msl=report["max_seq_len"], **w.get("data", {}))


def _launch_check(args: FinetuneSpec, ctx: ToolContext) -> dict:
    """Before the confirmation: read and check everything, estimate; an error-level finding stops here."""
    from tools.finetune.launch import check_job, raise_on_errors

    report = check_job(args, ctx).report
    raise_on_errors(report)
    return preflight_lines(report, ctx.lang)


def _launch_text(result: dict, lang: str) -> str:
    report, job = result["preflight"], result["job_id"]
    model, data = report["model"]["requested"], Path(report["dataset_path"]).name
    steps, timing = report["training"]["total_steps"], report.get("time")
    method = METHODS.get(result.get("method", "lora"), "LoRA")
    if lang == "zh":
        text = f"已排队 {job}：用 {method} 在 {data} 上微调 {model}，{report['rows']['total']:,} 行，{steps:,} 步"
        text += f"，预计约 {duration_text(timing['seconds'], 'zh')}。" if timing else "。"
        text += f"\n由 worker 运行：`stackwise worker`。问“{job} 的进度”查看状态，或说“取消 {job}”停止。"
    else:
        rows = report["rows"]["total"]
        text = f"Queued {job}: {method} fine-tune of {model} on {data}, {rows:,} rows, {steps:,} steps"
        text += f", about {duration_text(timing['seconds'], 'en')}." if timing else "."
        text += f"\nThe worker runs it: `stackwise worker`. Ask \"status of {job}\" to watch it, or \"cancel {job}\"."
    warnings = [_warning(w, report, lang == "zh") for w in report["warnings"] if w["level"] != "info"]
    return text + "".join(f"\n⚠ {w}" for w in warnings)


def _launch_preview(args: dict, lang: str) -> str:
    method = METHODS.get(str(args.get("method", "lora")), "LoRA")
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
    preflight=_launch_check,
    render=_launch_text,
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
    from tools.finetune.launch import queue_job

    return queue_job(args, ctx)


@tool(
    args=JobRef,
    render=status_text,
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
    return job_status(args.job_id, ctx)


@tool(
    args=CancelArgs,
    side_effects=True,
    preview=_cancel_preview,
    render=cancel_text,
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
    return cancel_job(args.job_id, ctx)
