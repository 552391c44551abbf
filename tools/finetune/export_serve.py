"""Where a job's exports live and the exact commands that serve them (vLLM, Ollama, llama.cpp) and point
stackwise's llm brain at them. Nothing here loads a model.

The served model name is the job id (``ft-12``), so a chat request names the model the user trained.
stackwise's llm brain sends tool schemas with every request; vLLM accepts those only with a tool-call parser,
hence the ``--enable-auto-tool-choice --tool-call-parser …`` variant for chatting through stackwise.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

VLLM_PORT, OLLAMA_PORT, LLAMA_SERVER_PORT = 8000, 11434, 8080
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)     # the --max-lora-rank values vLLM accepts
# vLLM's tool-call parser by the model family (config.json model_type); hermes suits Qwen-style templates.
TOOL_PARSERS = {"llama": "llama3_json", "mistral": "mistral", "mixtral": "mistral", "granite": "granite",
                "internlm2": "internlm", "deepseek_v3": "deepseek_v3"}


@dataclass(frozen=True)
class ExportPaths:
    """The files of ``RUN/export``."""

    root: Path
    job_id: str

    @classmethod
    def of(cls, run: Path, job_id: str) -> ExportPaths:
        return cls(run / "export", job_id)

    @property
    def vllm(self) -> Path:
        return self.root / "vllm"

    @property
    def gguf_dir(self) -> Path:
        return self.root / "gguf"

    @property
    def gguf(self) -> Path:
        return self.gguf_dir / f"{self.job_id}.gguf"

    @property
    def modelfile(self) -> Path:
        return self.gguf_dir / "Modelfile"

    @property
    def gguf_record(self) -> Path:
        return self.gguf_dir / "gguf.json"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    @property
    def log(self) -> Path:
        return self.root / "export.log"

    def vllm_ready(self) -> bool:
        return (self.vllm / "serve.json").is_file() and (self.vllm / "config.json").is_file()

    def gguf_ready(self) -> bool:
        return self.gguf.is_file() and self.gguf_record.is_file()


def _q(path: Path | str) -> str:
    return shlex.quote(str(path))


def max_lora_rank(rank: int) -> int:
    """vLLM's ``--max-lora-rank`` for an adapter of ``rank``: the next value it accepts (its default is 16)."""
    return next((r for r in VLLM_LORA_RANKS if r >= rank), rank)


def chat_commands(url: str, name: str) -> dict[str, str]:
    """How to talk to a served model through stackwise's llm brain."""
    return {
        "shell": f"OPENAI_BASE_URL={url} STACKWISE_LLM_MODEL={name} stackwise chat --brain llm",
        "flags": f"stackwise chat --llm-url {url} --llm-model {name}",
        "repl": f"/model {url} {name}",
        "python": f"agent.use_model({url!r}, {name!r})",
    }


def serve_commands(job_id: str, run: Path, *, method: str, base: Path | None, adapter: Path | None,
                   lora_rank: int | None, model_type: str | None = None) -> dict[str, Any]:
    """Every way to serve ``job_id``'s model, with whether its files exist yet (``ready``)."""
    paths = ExportPaths.of(run, job_id)
    vllm_url = f"http://127.0.0.1:{VLLM_PORT}/v1"
    serve = f"vllm serve {_q(paths.vllm)} --served-model-name {job_id} --port {VLLM_PORT}"
    parser = TOOL_PARSERS.get(model_type or "", "hermes")
    result: dict[str, Any] = {
        "served_model_name": job_id,
        "vllm": {"folder": str(paths.vllm), "ready": paths.vllm_ready(), "command": serve,
                 "command_for_stackwise": f"{serve} --enable-auto-tool-choice --tool-call-parser {parser}",
                 "url": vllm_url},
        "vllm_lora": None,
        "gguf": {"file": str(paths.gguf), "ready": paths.gguf_ready(), "modelfile": str(paths.modelfile),
                 "ollama": f"ollama create {job_id} -f {_q(paths.modelfile)}",
                 "ollama_run": f"ollama run {job_id}", "ollama_url": f"http://127.0.0.1:{OLLAMA_PORT}/v1",
                 "llama_server": f"llama-server -m {_q(paths.gguf)} --alias {job_id} --port {LLAMA_SERVER_PORT}",
                 "llama_server_url": f"http://127.0.0.1:{LLAMA_SERVER_PORT}/v1"},
        "chat": chat_commands(vllm_url, job_id),
        "chat_ollama": chat_commands(f"http://127.0.0.1:{OLLAMA_PORT}/v1", job_id),
        "chat_llama_server": chat_commands(f"http://127.0.0.1:{LLAMA_SERVER_PORT}/v1", job_id),
    }
    if method in ("lora", "qlora") and adapter is not None and base is not None:
        rank = f" --max-lora-rank {max_lora_rank(lora_rank)}" if lora_rank and lora_rank > 16 else ""
        result["vllm_lora"] = {
            "base": str(base), "adapter": str(adapter), "ready": (adapter / "adapter_config.json").is_file(),
            "command": f"vllm serve {_q(base)} --enable-lora --lora-modules {job_id}={_q(adapter)}{rank} "
                       f"--port {VLLM_PORT}",
        }
    next_steps = []
    if not result["vllm"]["ready"]:
        next_steps.append(f"stackwise jobs merge {job_id}")
    if not result["gguf"]["ready"]:
        next_steps.append(f"stackwise jobs export {job_id} --format gguf")
    result["next"] = next_steps
    return result


MADE_FROM = {"merge": "the LoRA adapter merged into its base model",
             "merged": "the model the training merged (RUN/merged)",
             "full": "the whole model a full fine-tune saved"}


def readme_text(job_id: str, served: dict[str, Any], made_from: str, base_model: str | None) -> str:
    """README.md of the vLLM folder: what it is and how to serve it."""
    lines = [f"# {job_id} — a fine-tuned model exported by stackwise", "",
             f"Made from {MADE_FROM.get(made_from, made_from)}" + (f"; base model {base_model}" if base_model else "")
             + ".",
             "This folder loads with `transformers.AutoModelForCausalLM.from_pretrained` and serves with vLLM as is.",
             "", "Serve it:", "", f"    {served['vllm']['command']}", "",
             "Chat with it from stackwise (its llm brain sends tool schemas; vLLM needs a tool parser for them):",
             "", f"    {served['vllm']['command_for_stackwise']}", f"    {served['chat']['shell']}", ""]
    return "\n".join(lines)
