"""GGUF for Ollama and llama.cpp: find llama.cpp's ``convert_hf_to_gguf.py``, run it on the export folder with a
time limit, and write an Ollama ``Modelfile`` next to the file.

The converter is found from the ``STACKWISE_LLAMA_CPP`` setting (a llama.cpp checkout, or the script itself;
passed in as ``ctx.extras["llama_cpp"]``), else as ``convert_hf_to_gguf.py`` / ``convert_hf_to_gguf`` on
``PATH``. A script from a checkout runs with this Python (it brings its own ``gguf-py``; it needs torch,
transformers and sentencepiece, which a stackwise with fine-tuning has); one on ``PATH`` runs as installed
(its own interpreter, through its ``#!`` line).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tools.base import ToolError
from tools.finetune.export_folder import PLAIN_TEMPLATE, eos_token

SCRIPT = "convert_hf_to_gguf.py"
GGUF_TYPES = ("f16", "bf16", "q8_0")
LOG_TAIL = 15
HOW_TO_GET = ("get llama.cpp's converter: `git clone https://github.com/ggml-org/llama.cpp` and "
              "`pip install -r llama.cpp/requirements/requirements-convert_hf_to_gguf.txt`, then set "
              "STACKWISE_LLAMA_CPP to the checkout (or put convert_hf_to_gguf.py on your PATH)")
# Ollama's Go-template form of the plain '### User:' layout (export_folder.PLAIN_TEMPLATE).
PLAIN_OLLAMA_TEMPLATE = (
    '{{- range .Messages }}### {{ if eq .Role "system" }}System{{ else if eq .Role "user" }}User'
    '{{ else }}Assistant{{ end }}:\n{{ .Content }}\n\n{{ end }}### Assistant:\n'
)


@dataclass(frozen=True)
class Converter:
    """How to run the converter: the command's first words, and where it was found."""

    argv: tuple[str, ...]
    where: str


def find_converter(setting: str | None) -> Converter | None:
    """The converter named by ``setting`` (a checkout or the script), else the one on ``PATH``; ``None``.

    A ``setting`` that names nothing usable is an error (the user asked for that one), not a silent fallback."""
    if setting:
        given = Path(setting).expanduser()
        script = given / SCRIPT if given.is_dir() else given
        if not script.is_file():
            raise ToolError("converter_missing", f"STACKWISE_LLAMA_CPP is {setting!r}, but there is no {SCRIPT} "
                                                 f"there. Point it at a llama.cpp checkout (the folder that holds "
                                                 f"{SCRIPT}) or at the script itself.")
        return Converter((sys.executable, str(script.resolve())), f"STACKWISE_LLAMA_CPP ({script})")
    for name in (SCRIPT, "convert_hf_to_gguf", "convert-hf-to-gguf"):
        found = shutil.which(name)
        if found:
            return Converter((found,), f"PATH ({found})")
    return None


def missing_message(job_id: str, vllm_folder: Path | None, lang: str) -> str:
    """What to do when there is no converter; says whether the vLLM folder is ready."""
    if lang == "zh":
        head = (f"没有找到 llama.cpp 的 {SCRIPT}，所以没有生成 GGUF。获取方法："
                "`git clone https://github.com/ggml-org/llama.cpp`，"
                "`pip install -r llama.cpp/requirements/requirements-convert_hf_to_gguf.txt`，"
                "然后设置 STACKWISE_LLAMA_CPP 指向该目录（或把 convert_hf_to_gguf.py 放到 PATH 上）。")
        ready = (f"vLLM 可直接使用的文件夹已就绪：{vllm_folder}" if vllm_folder else
                 f"不需要转换器也能导出给 vLLM：`stackwise jobs merge {job_id}`。")
        return head + ready
    head = f"No GGUF: llama.cpp's {SCRIPT} is not available — {HOW_TO_GET}."
    ready = (f" The vLLM folder is ready: {vllm_folder}" if vllm_folder else
             f" The vLLM folder needs no converter: `stackwise jobs merge {job_id}`.")
    return head + ready


def gguf_command(converter: Converter, folder: Path, outfile: Path, gguf_type: str) -> list[str]:
    """The converter's command line for ``folder`` → ``outfile``."""
    if gguf_type not in GGUF_TYPES:
        raise ToolError("invalid_args", f"gguf_type must be one of {', '.join(GGUF_TYPES)}, not {gguf_type!r}")
    return [*converter.argv, str(folder), "--outfile", str(outfile), "--outtype", gguf_type]


def run_converter(command: list[str], log_path: Path, timeout_s: float) -> None:
    """Run the converter with its output in ``log_path``; ``ToolError`` on failure or timeout (its whole
    process group is stopped, so no half-finished converter keeps running)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as out:
        out.write(f"$ {shlex.join(command)}\n".encode())
        out.flush()
        try:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        except OSError as exc:
            raise ToolError("converter_failed", f"cannot start the GGUF converter {command[0]}: {exc}") from None
        try:
            code = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _stop(process)
            raise ToolError("timeout", f"the GGUF conversion took longer than {timeout_s:.0f} s and was stopped; "
                                       f"its log: {log_path}") from None
        except BaseException:
            _stop(process)
            raise
    if code != 0:
        tail = _tail(log_path)
        kind = "disk_full" if "No space left" in tail else "converter_failed"
        raise ToolError(kind, f"the GGUF converter failed (exit {code}); the end of {log_path}:\n{tail}")


def _stop(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def _tail(path: Path) -> str:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-LOG_TAIL:])


def modelfile_text(job_id: str, gguf_name: str, folder: Path, plain_template: bool) -> str:
    """An Ollama Modelfile for the GGUF file next to it (``ollama create JOB -f Modelfile``)."""
    lines = [f"# Ollama model {job_id}, exported by stackwise: ollama create {job_id} -f Modelfile",
             f"FROM ./{gguf_name}"]
    if plain_template:
        lines.append(f'TEMPLATE """{PLAIN_OLLAMA_TEMPLATE}"""')
        lines.append('PARAMETER stop "### User:"')
    else:
        lines.append("# The chat template is read from the GGUF file (the model's own tokenizer template).")
    eos = eos_token(folder)
    if eos:
        lines.append(f"PARAMETER stop {_quoted(eos)}")
    return "\n".join(lines) + "\n"


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def is_plain_template(folder: Path) -> bool:
    """Whether the export carries the plain layout stackwise added (not the model's own template)."""
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("chat_template") == PLAIN_TEMPLATE
