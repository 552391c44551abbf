"""Where a base model comes from — a local folder, a Hugging Face id, or ``modelscope:org/name`` — and how
each side of a fine-tune finds it.

- **At launch** (``launch_finetune``, on the bot's machine) :func:`resolve_model` looks offline only, because
  the preflight needs the model's config and tokenizer: a folder inside the allowed roots; a hub id (or a
  bare name such as ``Qwen2.5-0.5B`` matching one cached ``models--*--Qwen2.5-0.5B``) in the Hugging Face
  cache (``ctx.extras["hf_cache_dir"]`` overrides it); ``modelscope:org/name`` in the ModelScope cache
  (``ctx.extras["modelscope_cache_dir"]``, else ``$MODELSCOPE_CACHE``, else ``~/.cache/modelscope/hub``).
  A model that is not there is a ``model_not_found`` error naming the command that fetches it.
- **On the worker** (the training process) :func:`fetch_model` finds the model that ``spec.json`` records in
  ``base_model_source`` when the launch-time ``base_model_path`` is not on that machine: from the usual
  caches (``HF_HOME`` / ``HF_HUB_CACHE``, ``MODELSCOPE_CACHE``), downloading into them when the worker may go
  online (``HF_HUB_OFFLINE`` / ``MODELSCOPE_OFFLINE`` say it may not). Offline and absent is a one-line error
  naming the command to run.

Both raise :class:`~tools.base.ToolError`; the training process turns it into its ``TrainError``.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from tools.base import ToolContext, ToolError
from tools.finetune.data import TOKENIZER_FILES
from tools.paths import resolve_user_path

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}(?:/[A-Za-z0-9][\w.-]{0,95})?$")
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")
# Files transformers never loads: other frameworks' weights and the original (non-transformers) checkpoints some
# repos carry next to the safetensors. Downloads skip them; the offline look-up must use the same list, or a
# snapshot downloaded here would count as incomplete.
NOT_NEEDED = ["*.pth", "*.pt", "*.gguf", "*.onnx", "*.onnx_data", "*.msgpack", "*.h5", "*.tflite", "*.ot",
              "original/*"]
ORG_GUESSES = {"qwen": "Qwen", "deepseek": "deepseek-ai", "llama": "meta-llama", "meta-llama": "meta-llama",
               "mistral": "mistralai", "gemma": "google", "phi": "microsoft", "smollm": "HuggingFaceTB"}
SOURCES = ("local", "huggingface", "modelscope")
TRUE = ("1", "true", "yes", "on")
log = logging.getLogger("stackwise.finetune")


@dataclass(frozen=True)
class ResolvedModel:
    """Where a base model was found: a local folder, and how it was named and looked up."""

    path: Path
    source: str          # "local", "huggingface" or "modelscope"
    ref: str             # what the user asked for, or the full hub id it resolved to

    def record(self) -> dict[str, str]:
        """``spec.json``'s ``base_model_source``: what the worker looks for when ``base_model_path`` is not there."""
        return {"source": self.source, "ref": self.ref}


def fetch_command(source: str, ref: str) -> str:
    """The shell command that puts ``ref`` into this machine's cache."""
    if source == "modelscope":
        return f"modelscope download --model {ref}"
    return f"hf download {ref}"


# ---- at launch: offline look-ups ---------------------------------------------------------------------------

def resolve_model(raw: str, ctx: ToolContext) -> ResolvedModel:
    """The local folder of ``raw`` (a path, a hub id, or ``modelscope:org/name``); ``ToolError`` otherwise."""
    raw = raw.strip()
    if raw.lower().startswith("modelscope:"):
        return _from_modelscope_cache(raw.split(":", 1)[1].strip(), ctx)
    if raw.startswith(("/", "~", ".")) or "\\" in raw or raw.count("/") > 1 or not HUB_ID.match(raw):
        try:
            return ResolvedModel(model_folder(resolve_user_path(raw, ctx), raw), "local", raw)
        except ToolError as e:
            if e.type != "not_found":
                raise
            raise ToolError("model_not_found", f"I can't find the model folder {raw!r} in your uploads or the "
                                               "working directory.") from None
    try:
        local = resolve_user_path(raw, ctx)
    except ToolError as e:
        if e.type != "not_found":
            raise
    else:
        if local.is_dir():
            return ResolvedModel(model_folder(local, raw), "local", raw)
    return _from_hf_cache(raw, ctx)


def _from_hf_cache(name: str, ctx: ToolContext) -> ResolvedModel:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    cache = Path(ctx.extras.get("hf_cache_dir") or constants.HF_HUB_CACHE).expanduser()
    repo_id = name if "/" in name else _cached_repo_named(cache, name)
    if repo_id is not None:
        try:
            folder = Path(snapshot_download(repo_id, local_files_only=True, cache_dir=str(cache),
                                            ignore_patterns=NOT_NEEDED))
        except (LocalEntryNotFoundError, HFValidationError, OSError):
            pass
        else:
            return ResolvedModel(model_folder(folder, repo_id), "huggingface", repo_id)
    full = repo_id or guess_hub_id(name)
    what = f"{name!r}" if full == name else f"{name!r} (as {full})"
    raise ToolError("model_not_found", f"The base model {what} is not available offline: it is not a folder in "
                                       f"your uploads or the working directory, and not in the Hugging Face "
                                       f"cache ({cache}). On a machine with internet run "
                                       f"`{fetch_command('huggingface', full)}` (`huggingface-cli download {full}` "
                                       "with an older huggingface_hub) and copy the cache folder here, or give a "
                                       "local folder with config.json, tokenizer files and weights.")


def _cached_repo_named(cache: Path, name: str) -> str | None:
    """``org/name`` of the one cached hub model called ``name`` (any organisation, any case), or None."""
    want = name.casefold()
    try:
        found = [d.name[len("models--"):].split("--", 1) for d in cache.iterdir() if d.name.startswith("models--")]
    except OSError:
        return None
    matches = {"/".join(parts) for parts in found if len(parts) == 2 and parts[1].casefold() == want}
    return matches.pop() if len(matches) == 1 else None


def guess_hub_id(name: str) -> str:
    """``Qwen2.5-0.5B`` → ``Qwen/Qwen2.5-0.5B`` for the download hint (the name itself when unsure).

    Example:
        >>> guess_hub_id("deepseek-r1-distill-qwen-7b"), guess_hub_id("my-model")
        ('deepseek-ai/deepseek-r1-distill-qwen-7b', 'my-model')
    """
    if "/" in name:
        return name
    lower = name.casefold()
    org = next((org for prefix, org in ORG_GUESSES.items() if lower.startswith(prefix)), None)
    return f"{org}/{name}" if org else name


def _check_modelscope_id(model_id: str) -> None:
    if not HUB_ID.match(model_id) or "/" not in model_id:
        raise ToolError("model_not_found", f"{model_id!r} is not a ModelScope id (modelscope:org/name).")


def modelscope_cache_root(override: str | Path | None = None) -> Path:
    """The ModelScope cache: ``override``, else ``$MODELSCOPE_CACHE`` (the library's own setting, like HF_HOME),
    else ``~/.cache/modelscope/hub``."""
    return Path(override or os.environ.get("MODELSCOPE_CACHE") or "~/.cache/modelscope/hub").expanduser()


def cached_modelscope_model(model_id: str, root: Path) -> Path | None:
    """The folder of ``org/name`` in the ModelScope cache at ``root`` (newer and older layouts), or None."""
    org, name = model_id.split("/", 1)
    for base in (root / "models" / org, root / org):      # newer and older cache layouts; '.' may be '___'
        for folder in (base / name, base / name.replace(".", "___")):
            if (folder / "config.json").is_file():
                return folder
    return None


def _from_modelscope_cache(model_id: str, ctx: ToolContext) -> ResolvedModel:
    _check_modelscope_id(model_id)
    root = modelscope_cache_root(ctx.extras.get("modelscope_cache_dir"))
    folder = cached_modelscope_model(model_id, root)
    if folder is not None:
        return ResolvedModel(model_folder(folder, model_id), "modelscope", model_id)
    raise ToolError("model_not_found", f"The base model modelscope:{model_id} is not in the ModelScope cache "
                                       f"({root}). On a machine with internet run `pip install modelscope` and "
                                       f"`{fetch_command('modelscope', model_id)}`, and copy the cache folder here, "
                                       "or give a local folder.")


def model_folder(folder: Path, shown: str) -> Path:
    """``folder`` if it holds a loadable model (config, tokenizer, weights); ``ToolError`` saying what is missing."""
    if not folder.is_dir():
        raise ToolError("bad_model", f"{shown!r} is a file; the base model is a folder with config.json.")
    if not (folder / "config.json").is_file():
        raise ToolError("bad_model", f"{shown!r} has no config.json, so it is not a model folder.")
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise ToolError("bad_model", f"{shown!r} has no tokenizer files ({', '.join(TOKENIZER_FILES)}).")
    if not any(any(folder.glob(p)) for p in WEIGHT_PATTERNS):
        raise ToolError("bad_model", f"{shown!r} has no weights (*.safetensors or *.bin); the download may be "
                                     "incomplete.")
    return folder


# ---- on the worker: the cache, else a download ---------------------------------------------------------------

def fetch_model(source: str, ref: str, *, hf_cache_dir: str | Path | None = None,
                modelscope_cache_dir: str | Path | None = None, hf_offline: bool | None = None,
                modelscope_offline: bool | None = None) -> Path:
    """The folder of the model ``base_model_source`` names, on this machine, downloaded into the usual cache when
    it is missing and the machine may go online; ``ToolError`` with the command to run otherwise.

    ``hf_offline`` / ``modelscope_offline`` default to ``HF_HUB_OFFLINE`` / ``MODELSCOPE_OFFLINE``; the cache
    folders to the libraries' own (``HF_HUB_CACHE`` under ``HF_HOME``, ``MODELSCOPE_CACHE``).
    """
    if source == "huggingface":
        return _fetch_from_hub(ref, hf_cache_dir, hf_offline)
    if source == "modelscope":
        if modelscope_offline is None:
            modelscope_offline = os.environ.get("MODELSCOPE_OFFLINE", "").strip().lower() in TRUE
        return _fetch_from_modelscope(ref, modelscope_cache_dir, modelscope_offline)
    if source == "local":
        raise ToolError("model_not_found", f"base model not found: the local folder {ref!r} it was launched with "
                                           "is not on this machine — copy it here, or launch with a Hugging Face "
                                           "or modelscope: id so the worker can fetch it.")
    raise ToolError("bad_model", f"unknown base model source {source!r} (one of {', '.join(SOURCES)})")


def _one_line(exc: BaseException, limit: int = 300) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:limit]


def _fetch_from_hub(repo_id: str, cache_dir: str | Path | None, offline: bool | None) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if not HUB_ID.match(repo_id) or "/" not in repo_id:
        raise ToolError("model_not_found", f"{repo_id!r} is not a Hugging Face model id (org/name).")
    offline = bool(constants.HF_HUB_OFFLINE) if offline is None else offline
    cache = Path(cache_dir or constants.HF_HUB_CACHE).expanduser()
    how = (f"run `{fetch_command('huggingface', repo_id)}` on a machine with internet and copy its Hugging Face "
           f"cache to {cache} (or point HF_HOME at a copy), or give a local folder")
    try:
        folder = Path(snapshot_download(repo_id, cache_dir=str(cache), local_files_only=offline,
                                        ignore_patterns=NOT_NEEDED))
    except LocalEntryNotFoundError as exc:   # not cached (or cached in part) and no way to download it
        why = ("HF_HUB_OFFLINE is set on this worker" if offline else
               f"the Hub cannot be reached ({_one_line(exc.__cause__ or exc, 160)})")
        raise ToolError("model_not_found", f"base model not found: {repo_id} is not in this worker's Hugging Face "
                                           f"cache ({cache}) and {why} — {how}.") from None
    except GatedRepoError:
        raise ToolError("model_not_found", f"{repo_id} is gated on the Hugging Face Hub: accept its licence on its "
                                           "page and give this worker a token (HF_TOKEN or `hf auth login`).") from None
    except RepositoryNotFoundError:
        raise ToolError("model_not_found", f"{repo_id} is not on the Hugging Face Hub (or it is private and this "
                                           "worker has no token for it) — check the id.") from None
    except (RevisionNotFoundError, HfHubHTTPError, HFValidationError) as exc:
        raise ToolError("model_not_found", f"cannot download {repo_id}: {_one_line(exc)} — {how}.") from None
    except OSError as exc:                   # a full or read-only disk under the cache
        raise ToolError("model_not_found", f"cannot store {repo_id} in {cache}: {_one_line(exc)}") from None
    if not offline:
        log.info("base model %s is in the Hugging Face cache: %s", repo_id, folder)
    return model_folder(folder, repo_id)


def _fetch_from_modelscope(model_id: str, cache_dir: str | Path | None, offline: bool) -> Path:
    _check_modelscope_id(model_id)
    root = modelscope_cache_root(cache_dir)
    cached = cached_modelscope_model(model_id, root)
    if cached is not None:
        return model_folder(cached, f"modelscope:{model_id}")
    how = (f"run `{fetch_command('modelscope', model_id)}` on a machine with internet and copy its ModelScope "
           f"cache to {root} (or point MODELSCOPE_CACHE at a copy), or give a local folder")
    try:
        from modelscope.hub.snapshot_download import snapshot_download
    except ImportError:
        raise ToolError("model_not_found", f"base model not found: modelscope:{model_id} is not in this worker's "
                                           f"ModelScope cache ({root}) and the modelscope package is not installed "
                                           f"here — `pip install modelscope` on the worker so it can download it, "
                                           f"or {how}.") from None
    if offline:
        raise ToolError("model_not_found", f"base model not found: modelscope:{model_id} is not in this worker's "
                                           f"ModelScope cache ({root}) and MODELSCOPE_OFFLINE is set — {how}.")
    log.info("downloading modelscope:%s into %s", model_id, root)
    try:
        folder = snapshot_download(model_id, cache_dir=str(cache_dir)) if cache_dir else snapshot_download(model_id)
    except Exception as exc:   # the package raises requests, ValueError and its own errors with no common base
        raise ToolError("model_not_found", f"cannot download modelscope:{model_id}: {_one_line(exc)} — check the "
                                           f"id and the network, or {how}.") from None
    return model_folder(Path(folder), f"modelscope:{model_id}")
