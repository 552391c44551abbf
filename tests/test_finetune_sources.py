"""Where a base model comes from (tools/finetune/sources.py): a local folder, a Hugging Face id or
``modelscope:org/name`` — found offline at launch, where spec.json records how it was named, and again on the
worker when the launch-time folder is not there: from that machine's cache, or downloaded into it; offline
and absent is one clear line naming the command to run. Nothing here touches the network: the Hub is offline
(conftest sets HF_HUB_OFFLINE) or a closed loopback port, and ModelScope is absent or a stand-in package."""

from __future__ import annotations

import json
import shutil
import socket
import sys
from pathlib import Path

import pytest
import runs

from tools.base import ToolContext, ToolError
from tools.finetune.launch import queue_job
from tools.finetune.rundir import RunPaths
from tools.finetune.sources import fetch_model, resolve_model
from tools.finetune.spec import FinetuneSpec
from tools.finetune.train import main
from tools.finetune.train_setup import TrainError, load_job

FIXTURE = Path(__file__).parent / "fixtures" / "finetune" / "medical_cot.jsonl"
HUB_ID = "Qwen/Qwen2.5-0.5B"
MS_ID = "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"


@pytest.fixture
def work(tiny, tmp_path, monkeypatch) -> Path:
    """The working directory (an allowed root) with a local model and a data set."""
    folder = tmp_path / "work"
    shutil.copytree(tiny, folder / "tiny-model")
    shutil.copy(FIXTURE, folder / "data.jsonl")
    monkeypatch.chdir(folder)
    return folder


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """This machine's Hugging Face cache (empty), offline as conftest set it up."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture
def ms_cache(tmp_path, monkeypatch) -> Path:
    """This machine's ModelScope cache (empty) and no modelscope package."""
    cache = tmp_path / "ms-cache"
    cache.mkdir()
    monkeypatch.setenv("MODELSCOPE_CACHE", str(cache))
    monkeypatch.delenv("MODELSCOPE_OFFLINE", raising=False)
    monkeypatch.setitem(sys.modules, "modelscope", None)     # not installed, whatever this venv holds
    return cache


def fake_hub_cache(root: Path, repo_id: str, model: Path) -> Path:
    """The hub cache layout holding a copy of ``model`` (another commit than the tools tests' caches)."""
    return runs.fake_hub_cache(root, repo_id, model, commit="1" * 40)


def worker_run(root: Path, source: dict | str | None, *, path: str = "/nowhere/on/this/worker") -> Path:
    """A run directory as a launch on another machine wrote it: its base_model_path is not here."""
    run_dir = root / "ft-1"
    (run_dir / "data").mkdir(parents=True)
    row = {"prompt": "Say red twice.\n", "completion": "red red", "question": "Say red twice.", "reference": "red red"}
    (run_dir / "data" / "train.jsonl").write_text(json.dumps(row) + "\n")
    spec = {"base_model": "whatever", "dataset": "data.jsonl", "method": "lora", "base_model_path": path,
            "job_id": "ft-1"}
    if source is not None:
        spec["base_model_source"] = source
    (run_dir / "spec.json").write_text(json.dumps(spec))
    return run_dir


def fails_with_one_line(run_dir: Path, capsys) -> str:
    """The training entry point fails before loading anything: its one-line error (summary.json and stderr)."""
    assert main([str(run_dir)]) == 1
    summary = json.loads(RunPaths(run_dir).summary.read_text())
    err = capsys.readouterr().err.strip().splitlines()
    assert summary["status"] == "failed" and "\n" not in summary["error"]
    assert len(err) == 1 and summary["error"] in err[0]
    return summary["error"]


def launch(base_model: str, home: Path, **extras) -> dict:
    """Queue a job the way ``launch_finetune`` does after "yes"; spec.json of its run directory."""
    ctx = ToolContext(home=home, user_id="alice", extras=extras)
    result = queue_job(FinetuneSpec(base_model=base_model, dataset="data.jsonl"), ctx)
    return json.loads(RunPaths(Path(result["run_dir"])).spec.read_text())


def test_a_local_folder_is_recorded_as_local_and_used_as_is(work, stackwise_home):
    spec = launch("./tiny-model", stackwise_home)
    assert spec["base_model_source"] == {"source": "local", "ref": "./tiny-model"}
    assert spec["base_model_path"] == str(work / "tiny-model")
    run_dir = stackwise_home / "jobs" / "alice" / spec["job_id"]
    assert load_job(RunPaths(run_dir)).base_model_path == work / "tiny-model"
    shutil.move(work / "tiny-model", work / "moved")          # a local folder cannot be fetched again
    with pytest.raises(TrainError, match=r"^base model not found: .*tiny-model has no config.json$"):
        load_job(RunPaths(run_dir))


def test_a_hub_id_offline_and_absent_fails_clearly_at_launch_and_on_the_worker(work, hub_cache, tmp_path, capsys,
                                                                               stackwise_home):
    with pytest.raises(ToolError) as err:
        resolve_model("stackwise-test/absent-7B", ToolContext(home=stackwise_home))
    assert err.value.type == "model_not_found"
    assert "`hf download stackwise-test/absent-7B`" in err.value.message and str(hub_cache) in err.value.message

    run_dir = worker_run(tmp_path, {"source": "huggingface", "ref": "stackwise-test/absent-7B"})
    error = fails_with_one_line(run_dir, capsys)
    assert error.startswith("base model not found: stackwise-test/absent-7B is not in this worker's Hugging Face "
                            f"cache ({hub_cache}) and HF_HUB_OFFLINE is set")
    assert "`hf download stackwise-test/absent-7B`" in error


def test_a_hub_id_in_the_cache_resolves_at_launch_and_again_on_the_worker(work, hub_cache, tmp_path,
                                                                          stackwise_home):
    bot_cache = tmp_path / "bot-hf-cache"
    at_launch = fake_hub_cache(bot_cache, HUB_ID, work / "tiny-model")
    found = resolve_model(HUB_ID, ToolContext(home=stackwise_home, extras={"hf_cache_dir": str(bot_cache)}))
    assert (found.path, found.source, found.ref) == (at_launch, "huggingface", HUB_ID)
    spec = launch(HUB_ID, stackwise_home, hf_cache_dir=str(bot_cache))
    assert spec["base_model_source"] == {"source": "huggingface", "ref": HUB_ID}
    assert spec["base_model_path"] == str(at_launch)

    # The worker is another machine: the bot's snapshot folder is not there, its own cache has the model.
    run_dir = stackwise_home / "jobs" / "alice" / spec["job_id"]
    shutil.rmtree(bot_cache)
    on_worker = fake_hub_cache(hub_cache, HUB_ID, work / "tiny-model")
    assert load_job(RunPaths(run_dir)).base_model_path == on_worker


def test_an_unreachable_hub_is_a_clear_error_naming_the_command(hub_cache, monkeypatch):
    from huggingface_hub import constants

    with socket.socket() as sock:          # a loopback port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(ToolError) as err:
        fetch_model("huggingface", HUB_ID)
    assert err.value.type == "model_not_found"
    assert f"{HUB_ID} is not in this worker's Hugging Face cache ({hub_cache}) and the Hub cannot be reached " \
           "(ConnectError" in err.value.message
    assert f"`hf download {HUB_ID}`" in err.value.message


def test_a_modelscope_id_without_the_package_is_a_clear_error(work, ms_cache, tmp_path, capsys, stackwise_home):
    with pytest.raises(ToolError) as err:
        resolve_model(f"modelscope:{MS_ID}", ToolContext(home=stackwise_home))
    assert err.value.type == "model_not_found" and str(ms_cache) in err.value.message
    assert "pip install modelscope" in err.value.message and f"modelscope download --model {MS_ID}" in \
        err.value.message

    run_dir = worker_run(tmp_path, {"source": "modelscope", "ref": MS_ID})
    error = fails_with_one_line(run_dir, capsys)
    assert error.startswith(f"base model not found: modelscope:{MS_ID} is not in this worker's ModelScope cache "
                            f"({ms_cache}) and the modelscope package is not installed here — `pip install "
                            "modelscope` on the worker")
    assert f"`modelscope download --model {MS_ID}`" in error


@pytest.mark.parametrize("layout", ["models/{org}/{name}", "{org}/{name}", "models/{org}/{dotted}"])
def test_a_modelscope_id_in_the_cache_resolves_at_launch_and_on_the_worker(work, ms_cache, tmp_path,
                                                                           stackwise_home, layout):
    org, name = "Qwen", "Qwen2.5-0.5B"
    folder = ms_cache / layout.format(org=org, name=name, dotted=name.replace(".", "___"))
    shutil.copytree(work / "tiny-model", folder)
    found = resolve_model(f"modelscope:{org}/{name}", ToolContext(home=stackwise_home))
    assert (found.path, found.source, found.ref) == (folder, "modelscope", f"{org}/{name}")
    spec = launch(f"modelscope:{org}/{name}", stackwise_home)
    assert spec["base_model_source"] == {"source": "modelscope", "ref": f"{org}/{name}"}

    run_dir = stackwise_home / "jobs" / "alice" / spec["job_id"]
    spec["base_model_path"] = str(tmp_path / "the-bot-machines-folder")
    RunPaths(run_dir).spec.write_text(json.dumps(spec))
    assert load_job(RunPaths(run_dir)).base_model_path == folder      # no package needed: it is cached


STAND_IN = '''"""A stand-in for the modelscope package: snapshot_download "downloads" from a folder into the cache."""
import os, shutil
CALLS = []
SOURCE = None


def snapshot_download(model_id, revision="master", cache_dir=None, local_files_only=False, **kwargs):
    CALLS.append({"model_id": model_id, "cache_dir": cache_dir, "local_files_only": local_files_only})
    root = cache_dir or os.environ.get("MODELSCOPE_CACHE") or os.path.expanduser("~/.cache/modelscope/hub")
    org, name = model_id.split("/")
    target = os.path.join(root, "models", org, name.replace(".", "___"))
    shutil.copytree(SOURCE, target)
    return target
'''


def test_a_modelscope_id_is_downloaded_through_the_package_when_it_is_installed(work, ms_cache, tmp_path,
                                                                                monkeypatch):
    package = tmp_path / "site" / "modelscope"
    (package / "hub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "hub" / "__init__.py").write_text("")
    (package / "hub" / "snapshot_download.py").write_text(STAND_IN)
    monkeypatch.delitem(sys.modules, "modelscope")          # "installed" now
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    try:
        from modelscope.hub import snapshot_download as stand_in

        stand_in.SOURCE = str(work / "tiny-model")
        monkeypatch.setenv("MODELSCOPE_OFFLINE", "1")
        with pytest.raises(ToolError, match="MODELSCOPE_OFFLINE is set"):
            fetch_model("modelscope", MS_ID)
        assert stand_in.CALLS == []

        monkeypatch.delenv("MODELSCOPE_OFFLINE")
        folder = fetch_model("modelscope", MS_ID)
        assert folder == ms_cache / "models" / "deepseek-ai" / "DeepSeek-R1-Distill-Qwen-1___5B"
        assert (folder / "config.json").is_file()
        assert stand_in.CALLS == [{"model_id": MS_ID, "cache_dir": None, "local_files_only": False}]
        assert fetch_model("modelscope", MS_ID) == folder and len(stand_in.CALLS) == 1    # cached now
    finally:
        for name in [m for m in sys.modules if m == "modelscope" or m.startswith("modelscope.")]:
            del sys.modules[name]


@pytest.mark.parametrize(("source", "message"), [
    ("hf", 'spec.json base_model_source must be {"source": …, "ref": …}'),
    ({"source": "huggingface"}, 'spec.json base_model_source must be {"source": …, "ref": …}'),
    ({"source": "gitee", "ref": "a/b"}, "unknown base model source 'gitee' (one of local, huggingface, modelscope)"),
    ({"source": "huggingface", "ref": "../../etc"}, "'../../etc' is not a Hugging Face model id (org/name)."),
])
def test_a_bad_base_model_source_is_one_clear_line(tmp_path, capsys, source, message):
    assert fails_with_one_line(worker_run(tmp_path, source), capsys) == message
