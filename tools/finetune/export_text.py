"""What the user reads about exports and serving, in English and Chinese: the confirmation's lines, the answer
after an export, and the serving commands."""

from __future__ import annotations

from typing import Any

MADE_FROM = {"merge": ("把适配器合并进基座模型", "the adapter merged into its base model"),
             "merged": ("训练时已合并的模型（直接复用）", "the model the training merged already (reused)"),
             "full": ("全参数微调保存的完整模型（无需合并）",
                      "the whole model a full fine-tune saved (nothing to merge)")}
FORMAT_WORDS = {"vllm": ("vLLM 文件夹", "a vLLM folder"), "gguf": ("GGUF 文件", "a GGUF file"),
                "all": ("vLLM 文件夹和 GGUF 文件", "a vLLM folder and a GGUF file")}


def export_preview(args: dict, lang: str) -> str:
    """The confirmation's first line."""
    job = args.get("job_id") or ("你最近完成的任务" if lang == "zh" else "your latest finished job")
    words = FORMAT_WORDS.get(str(args.get("format") or "all"), FORMAT_WORDS["all"])
    if lang == "zh":
        return f"将导出 {job}：合并并写出{words[0]}（会写入数 GB）。"
    return f"Export {job}: merge and write {words[1]} (several GB on a real model)."


def check_lines(check: dict[str, Any], lang: str) -> dict[str, Any]:
    """The preflight shown with the confirmation: what is merged into what, where it goes, the disk."""
    zh, job, source, paths = lang == "zh", check["job"], check["source"], check["paths"]
    made = MADE_FROM[source.kind][0 if zh else 1]
    disk = check["disk"]
    converter = check["converter"]
    warnings = [n for n in source.notes if n.startswith("QLoRA")]
    if zh:
        lines = {"任务": f"{job.id}（{source.method} · {source.base_model}）", "来源": f"{made}，{source.dtype}",
                 "vLLM 文件夹": str(paths.vllm) + ("" if check["fresh"] else "（已是最新，直接复用）"),
                 "磁盘": f"约需 {disk['needed_gb']} GB，可用 {disk['free_gb']} GB"}
        if converter is not None:
            lines["GGUF"] = f"{paths.gguf}（转换器：{converter.where}）"
        elif check.get("format") != "vllm":
            lines["GGUF"] = "跳过：没有找到 llama.cpp 的转换器"
        lines["warnings"] = ["QLoRA：合并进未量化的基座（适配器是在 4 位权重上训练的，回答可能与 4 位模型略有不同）"
                             if w.startswith("QLoRA") else w for w in warnings]
        return lines
    lines = {"job": f"{job.id} ({source.method} · {source.base_model})", "from": f"{made}, {source.dtype}",
             "vLLM folder": str(paths.vllm) + ("" if check["fresh"] else " (up to date: reused)"),
             "disk": f"about {disk['needed_gb']} GB needed, {disk['free_gb']} GB free"}
    if converter is not None:
        lines["GGUF"] = f"{paths.gguf} (converter: {converter.where})"
    elif check.get("format") != "vllm":
        lines["GGUF"] = "skipped: llama.cpp's converter is not available"
    lines["warnings"] = warnings
    return lines


def export_text(r: dict[str, Any], lang: str) -> str:
    """The answer after ``export_finetune``."""
    zh, job, vllm, gguf, serve = lang == "zh", r["job_id"], r["vllm"], r.get("gguf"), r["serve"]
    made = MADE_FROM.get(vllm["made_from"], (vllm["made_from"],) * 2)[0 if zh else 1]
    if zh:
        head = (f"{job} 的 vLLM 文件夹已是最新：{vllm['folder']}" if vllm.get("reused") else
                f"已导出 {job}（{made}，{vllm['dtype']}）：{vllm['folder']}")
        lines = [head, f"用 vLLM 启动：`{serve['vllm']['command']}`"]
    else:
        head = (f"{job}'s vLLM folder is up to date: {vllm['folder']}" if vllm.get("reused") else
                f"Exported {job} ({made}, {vllm['dtype']}) to {vllm['folder']}")
        lines = [head, f"Serve it with vLLM: `{serve['vllm']['command']}`"]
    if gguf and gguf.get("skipped"):
        lines.append(gguf["skipped"])
    elif gguf:
        g = serve["gguf"]
        lines.append((f"GGUF（{gguf['gguf_type']}）：{gguf['file']} —— Ollama：`{g['ollama']}`，llama.cpp："
                      f"`{g['llama_server']}`") if zh else
                     (f"GGUF ({gguf['gguf_type']}): {gguf['file']} — Ollama: `{g['ollama']}`, llama.cpp: "
                      f"`{g['llama_server']}`"))
    lines.append(_chat_line(serve, zh))
    return "\n".join(lines)


def _chat_line(serve: dict[str, Any], zh: bool) -> str:
    chat, flags = serve["chat"], serve["vllm"]["command_for_stackwise"]
    if zh:
        return (f"和它对话：用 `{flags}` 启动（stackwise 的 llm 大脑会发送工具定义），然后在聊天里输入 "
                f"`{chat['repl']}`，或运行 `{chat['shell']}`。")
    return (f"Chat with it: start it with `{flags}` (stackwise's llm brain sends tool schemas), then type "
            f"`{chat['repl']}` in the chat, or run `{chat['shell']}`.")


def serve_text(r: dict[str, Any], lang: str) -> str:
    """The answer of ``finetune_serve_info``: the commands, and what still has to be exported."""
    zh, job = lang == "zh", r["job_id"]
    vllm, lora, gguf = r["vllm"], r.get("vllm_lora"), r["gguf"]
    if zh:
        lines = [f"{job} 的部署方式（服务名 {job}）："]
        lines.append(f"- vLLM（合并后的模型）：`{vllm['command']}`" +
                     ("" if vllm["ready"] else f"（先导出：`stackwise jobs merge {job}`）"))
        if lora:
            lines.append(f"- vLLM（不合并，在基座上加载 LoRA）：`{lora['command']}`")
        lines.append(f"- Ollama：`{gguf['ollama']}`，然后 `{gguf['ollama_run']}`" +
                     ("" if gguf["ready"] else f"（先导出 GGUF：`stackwise jobs export {job} --format gguf`）"))
        lines.append(f"- llama.cpp：`{gguf['llama_server']}`")
    else:
        lines = [f"Ways to serve {job} (served model name {job}):"]
        lines.append(f"- vLLM, merged model: `{vllm['command']}`" +
                     ("" if vllm["ready"] else f" (export it first: `stackwise jobs merge {job}`)"))
        if lora:
            lines.append(f"- vLLM, the LoRA on its base without merging: `{lora['command']}`")
        lines.append(f"- Ollama: `{gguf['ollama']}`, then `{gguf['ollama_run']}`" +
                     ("" if gguf["ready"] else f" (make the GGUF first: `stackwise jobs export {job} --format gguf`)"))
        lines.append(f"- llama.cpp: `{gguf['llama_server']}`")
    lines.append(_chat_line(r, zh))
    return "\n".join(lines)
