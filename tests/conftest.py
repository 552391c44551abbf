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
    # trackers configured in a developer's shell would send test runs online: tests that track set their own
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_PROJECT", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    return home


@pytest.fixture
def cli_env(stackwise_home) -> dict[str, str]:
    """Environment for running the ``stackwise`` command in a subprocess."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STACKWISE_")}
    env["STACKWISE_HOME"] = str(stackwise_home)
    env["PYTHONWARNINGS"] = "ignore"
    return env


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    """The tiny random Llama-architecture model and its tokenizer (``tools/finetune/tiny.py``), built once for
    the whole session; the fine-tune tests read it or copy it, never write into it."""
    from tools.finetune.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")


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


# --- PostgreSQL ------------------------------------------------------------------------------------------
# ``pg_url``: a fresh, empty database on a real server for each test. The server is the one
# STACKWISE_TEST_POSTGRES_URL names (an admin URL), or else a throwaway cluster this session starts on
# 127.0.0.1 from the initdb/pg_ctl it finds (PATH or /usr/lib/postgresql/*/bin); with neither the tests skip,
# unless STACKWISE_REQUIRE_POSTGRES=1 (set by .ci/run), where a missing server fails them.


def _no_postgres(reason: str):
    if os.environ.get("STACKWISE_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"STACKWISE_REQUIRE_POSTGRES=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def _pg_bindir() -> Path | None:
    import glob
    import shutil

    found = [shutil.which("initdb")] + sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    for initdb in filter(None, found):
        bindir = Path(initdb).resolve().parent
        if (bindir / "pg_ctl").exists() and (bindir / "postgres").exists():
            return bindir
    return None


def _throwaway_cluster(bindir: Path):
    """Start a cluster in a tmp folder on 127.0.0.1 and a free port; yields its admin URL, stops it after.
    As root, the server runs as the ``postgres`` user (or ``nobody``): postgres refuses to run as root."""
    import pwd
    import shutil
    import socket
    import subprocess
    import tempfile

    user = None
    if os.geteuid() == 0:
        for name in ("postgres", "nobody"):
            try:
                user = pwd.getpwnam(name)
                break
            except KeyError:
                continue
        if user is None:
            _no_postgres("running as root and there is no postgres or nobody user to run a test server as")
    as_user = {} if user is None else {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    root = Path(tempfile.mkdtemp(prefix="stackwise-pg-"))  # under /tmp: the server's user can reach it
    if user is not None:
        os.chown(root, user.pw_uid, user.pw_gid)
    data, log = root / "data", root / "server.log"
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "HOME": str(root), "LC_ALL": "C", "TZ": "UTC"}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(bindir / args[0]), *args[1:]], env=env, capture_output=True, text=True,
                              timeout=120, **as_user)

    started = False
    try:
        done = run("initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C",
                   "--no-sync")
        if done.returncode != 0:
            _no_postgres(f"initdb failed: {done.stderr.strip()[-800:]}")
        for _ in range(3):  # the free port may be taken between finding and binding it: try another
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            settings = (f"listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{root}'\n"
                        "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nmax_connections = 200\n")
            (data / "postgresql.auto.conf").write_text(settings)
            done = run("pg_ctl", "-D", str(data), "-l", str(log), "-w", "-t", "60", "start")
            if done.returncode == 0:
                started = True
                break
        if not started:
            tail = log.read_text(errors="replace")[-800:] if log.exists() else done.stderr
            _no_postgres(f"the test PostgreSQL server did not start: {tail.strip()}")
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        if started:
            run("pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server():
    """An admin URL of a running PostgreSQL server for this session (see the note above ``_no_postgres``)."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _no_postgres("psycopg is not installed (pip install 'stackwise[postgres]')")
    if url := os.environ.get("STACKWISE_TEST_POSTGRES_URL"):
        yield url
        return
    bindir = _pg_bindir()
    if bindir is None:
        _no_postgres("no PostgreSQL server: set STACKWISE_TEST_POSTGRES_URL or install postgresql (initdb, pg_ctl)")
    yield from _throwaway_cluster(bindir)


@pytest.fixture
def pg_url(pg_server) -> str:
    """A URL of a fresh, empty database of its own for this test, dropped after it."""
    import uuid

    from memory import pg

    name = f"stackwise_test_{uuid.uuid4().hex[:16]}"
    with pg.connect(pg_server, what="test PostgreSQL server") as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    yield pg.with_database(pg_server, name)
    with pg.connect(pg_server, what="test PostgreSQL server") as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # PostgreSQL 13+


@pytest.fixture(autouse=True)
def _no_database_url(monkeypatch):
    """No test reaches a database the developer's shell names (STACKWISE_DATABASE_URL); ``pg_url`` gives a test
    a database of its own."""
    monkeypatch.delenv("STACKWISE_DATABASE_URL", raising=False)
