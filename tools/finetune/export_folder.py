"""The export folder a serving stack loads as is: weights, the base's config and tokenizer, a chat template,
``serve.json`` and a README.

The config and tokenizer files are the base model's own (as downloaded), not the ones this process's
transformers would write: a vLLM, llama.cpp converter or older transformers on the serving machine reads them
exactly as it reads the base model (newer transformers write ``dtype`` for ``torch_dtype``, ``rope_parameters``
for ``rope_theta``, and a tokenizer class older versions do not know). The precision is set to the exported
weights'. A model without a chat template gets one that reproduces the plain ``### User:`` layout its prompts
were trained in (:func:`tools.finetune.data.render`), so a chat endpoint prompts it the way it learnt.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from tools.finetune.export_plan import ExportSource, read_config, weight_files

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json", "spiece.model", "sentencepiece.bpe.model")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# The layout of tools.finetune.data._plain_prompt, as a chat template.
PLAIN_TEMPLATE = (
    "{% set names = {'system': 'System', 'user': 'User', 'assistant': 'Assistant'} %}"
    "{% for message in messages %}### {{ names[message['role']] }}:\n{{ message['content'] }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}### Assistant:\n{% endif %}"
)


def link_weights(source: Path, target: Path) -> str:
    """Hard-link (or, across disks, copy) the weight files and their index from ``source`` into ``target``;
    ``"linked"`` or ``"copied"``."""
    how = "linked"
    target.mkdir(parents=True, exist_ok=True)
    files = [*weight_files(source), *(source / n for n in INDEX_FILES if (source / n).is_file())]
    for path in files:
        dest = target / path.name
        try:
            os.link(path, dest)
        except OSError:
            shutil.copy2(path, dest)
            how = "copied"
    return how


def has_chat_template(folder: Path) -> bool:
    """Whether the tokenizer files in ``folder`` carry a chat template (in any of the places transformers looks)."""
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and bool(config.get("chat_template"))


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)   # replaces a hard-linked file by a new one: the run's own copy is never changed


def finish_folder(folder: Path, source: ExportSource) -> dict[str, Any]:
    """Add the base's config (in the exported precision), generation config, tokenizer files and a chat template
    to ``folder`` (which holds the weights); returns what was done (``chat_template``: ``"base"`` / ``"added"``)."""
    config = read_config(source.base) or read_config(source.weights) or read_config(folder)
    if not config:
        raise OSError(f"no config.json in {source.base} or {source.weights}")
    config = dict(config)
    config["torch_dtype"] = source.dtype
    if "dtype" in config:
        config["dtype"] = source.dtype
    if source.kind != "merge" and not read_config(source.weights).get("quantization_config"):
        config.pop("quantization_config", None)
    _write_json(folder / "config.json", config)

    for name in ("generation_config.json",):
        for origin in (source.base, source.weights):
            if (origin / name).is_file():
                (folder / name).unlink(missing_ok=True)
                shutil.copyfile(origin / name, folder / name)
                break

    origin = next((f for f in (source.base, source.weights, source.adapter) if f is not None
                   and any((f / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "vocab.json"))), None)
    if origin is None:
        raise OSError(f"no tokenizer files in {source.base} or {source.weights}")
    for name in TOKENIZER_FILES:
        (folder / name).unlink(missing_ok=True)
        if (origin / name).is_file():
            shutil.copyfile(origin / name, folder / name)
    template = "base"
    if not has_chat_template(folder):
        # In tokenizer_config.json, where every transformers version (and vLLM through it) finds it.
        path = folder / "tokenizer_config.json"
        try:
            tok_config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            tok_config = {}
        _write_json(path, {**tok_config, "chat_template": PLAIN_TEMPLATE})
        template = "added"
    return {"chat_template": template, "tokenizer_from": str(origin)}


def eos_token(folder: Path) -> str | None:
    """The end-of-sequence token text of the tokenizer in ``folder`` (a stop word for Ollama)."""
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    eos = config.get("eos_token") if isinstance(config, dict) else None
    if isinstance(eos, dict):
        eos = eos.get("content")
    return eos if isinstance(eos, str) and eos else None
