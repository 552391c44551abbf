"""Hermetic test set-up: a tmp STACKWISE_HOME per test, one BLAS thread, no network for models."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[var] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["ANONYMIZED_TELEMETRY"] = "False"

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# A third-party tool "installed" for the tests only: its folder holds the package and a .dist-info
# with the ``stackwise.tools`` entry point, so importlib.metadata finds it exactly as it finds an
# installed plugin — in this process and, through PYTHONPATH, in every CLI subprocess — without
# touching the venv a user chats from.
PLUGIN_DIR = ROOT / "tests" / "fixtures" / "stackwise_plugin_demo"
sys.path.insert(0, str(PLUGIN_DIR))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(PLUGIN_DIR), os.environ.get("PYTHONPATH")) if p)


@pytest.fixture(autouse=True)
def stackwise_home(tmp_path, monkeypatch) -> Path:
    """Every test gets its own data folder, and no stray config file."""
    home = tmp_path / "home"
    monkeypatch.setenv("STACKWISE_HOME", str(home))
    monkeypatch.delenv("STACKWISE_CONFIG", raising=False)
    monkeypatch.delenv("STACKWISE_DATA_ROOTS", raising=False)
    monkeypatch.delenv("STACKWISE_BRAIN", raising=False)
    return home


@pytest.fixture
def cli_env(stackwise_home) -> dict[str, str]:
    """Environment for running the ``stackwise`` command in a subprocess."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STACKWISE_")}
    env["STACKWISE_HOME"] = str(stackwise_home)
    env["PYTHONWARNINGS"] = "ignore"
    return env


@pytest.fixture(scope="session")
def stackwise_bin() -> str:
    return str(BIN / "stackwise")


@pytest.fixture(scope="session")
def shared_agent_settings(tmp_path_factory):
    """Settings for tests that share one Agent (model loading is the slow part)."""
    from agent.settings import Settings

    return Settings.from_env({"STACKWISE_HOME": str(tmp_path_factory.mktemp("shared-home"))})


@pytest.fixture(scope="session")
def kb_seed(tmp_path_factory) -> Path:
    """A home whose knowledge base has the shipped cards indexed (the slow part, once per session);
    tests copy it (``seed_home``) before changing anything."""
    from memory.kb.store import KnowledgeBase

    home = tmp_path_factory.mktemp("kb-seed")
    kb = KnowledgeBase(home)
    kb.ensure_ready()
    kb.close()
    return home


@pytest.fixture
def seed_home(kb_seed, stackwise_home) -> Path:
    """This test's STACKWISE_HOME, starting with the shipped cards already indexed."""
    import shutil

    shutil.copytree(kb_seed, stackwise_home, dirs_exist_ok=True)
    return stackwise_home


@pytest.fixture(scope="session")
def ft_assets(tmp_path_factory) -> Path:
    """A tiny Qwen2-architecture model saved as ``Qwen2.5-0.5B/`` and chain-of-thought data sets under
    the names the conversation tests use (built once per session; ``ft_workdir`` copies them)."""
    import pandas as pd

    from tools.finetune.tiny import build_tiny_model

    folder = tmp_path_factory.mktemp("ft-assets")
    build_tiny_model(folder / "Qwen2.5-0.5B", arch="qwen2")
    rows = (ROOT / "tests" / "fixtures" / "finetune" / "medical_cot.jsonl").read_text(encoding="utf-8")
    for name in ("data.jsonl", "medical_cot.jsonl", "med.jsonl", "cot.jsonl"):
        (folder / name).write_text(rows, encoding="utf-8")
    pd.read_json(folder / "data.jsonl", lines=True).to_parquet(folder / "train.parquet")
    return folder


@pytest.fixture
def ft_workdir(ft_assets, tmp_path, monkeypatch) -> Path:
    """Run the test from a folder holding a local model and data sets, so fine-tune requests in the
    conversation ("fine-tune Qwen2.5-0.5B on data.jsonl") pass their preflight and ask for confirmation."""
    import shutil

    work = tmp_path / "work"
    shutil.copytree(ft_assets, work)
    monkeypatch.chdir(work)
    return work
