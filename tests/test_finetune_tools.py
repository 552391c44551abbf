"""The three fine-tune tools on a tiny local model: the confirmation through ``Agent.ask`` (preflight in the
preview, nothing queued before "yes"), the run directory per ft_contract.md, bad inputs through
``stackwise tool`` (a clear error and nothing queued), status with a loss plot, cancel, and model look-up
in an offline Hugging Face cache."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from runs import fake_hub_cache

from agent import Agent, Settings
from bots.cli import main
from memory.jobs import JobStore
from tools.base import ToolContext, ToolError
from tools.finetune.launch import resolve_model
from tools.finetune.tiny import build_tiny_model
from tools.registry import ToolRegistry

FIXTURE = Path(__file__).parent / "fixtures" / "finetune" / "medical_cot.jsonl"
ROWS = [json.loads(line) for line in FIXTURE.read_text(encoding="utf-8").splitlines()]
PNG = b"\x89PNG\r\n\x1a\n"
CONTRACT_ROW = {"prompt", "completion", "question", "reference"}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A working directory (an allowed root once we chdir into it) with a tiny model and a CoT data set."""
    root = tmp_path_factory.mktemp("ft-work")
    build_tiny_model(root / "tiny-model")
    write_jsonl(root / "data.jsonl", ROWS)
    return root


@pytest.fixture
def cwd(work, monkeypatch) -> Path:
    monkeypatch.chdir(work)
    return work


@pytest.fixture(scope="module")
def agent_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ft-agent-home")


@pytest.fixture(scope="module")
def agent(agent_home):
    bot = Agent.from_settings(Settings.from_env({"STACKWISE_HOME": str(agent_home)}))
    yield bot
    bot.close()


def tool(capsys, name: str, args: dict | str, user: str = "alice") -> tuple[int, dict]:
    """``stackwise tool NAME --args JSON --json`` in process: exit code and the tool-call record."""
    raw = args if isinstance(args, str) else json.dumps(args)
    code = main(["tool", name, "--args", raw, "--json", "--user", user])
    out = capsys.readouterr().out
    return code, json.loads(out)


def jobs_of(home: Path) -> list:
    with JobStore.for_home(home) as store:
        return store.list(None)


def launch(capsys, user: str = "alice", **extra) -> dict:
    code, record = tool(capsys, "launch_finetune",
                        {"base_model": "./tiny-model", "dataset": "data.jsonl", "lora_rank": 8} | extra, user)
    assert code == 0 and record["ok"], record
    return record["result"]


# ---- the confirmation path --------------------------------------------------------------------------------

def test_launch_waits_for_yes_and_then_queues_a_ready_run(agent, agent_home, cwd):
    reply = agent.ask("fine-tune ./tiny-model on data.jsonl with lora rank 8", thread_id="c1", user_id="u1")
    assert reply.pending is not None and reply.pending.tool == "launch_finetune"
    assert reply.pending.args["base_model"] == "./tiny-model" and reply.pending.args["lora_rank"] == 8
    preview = reply.pending.preview
    assert "30 rows (28 train, 2 eval)" in preview
    assert "VRAM: ≈" in preview and "GiB" in preview and "trainable" in preview
    assert "tiny_dataset" not in preview and "Only 30 rows" in preview       # warnings as sentences
    assert reply.tool_calls == [] and jobs_of(agent_home) == []

    done = agent.ask("yes", thread_id="c1", user_id="u1")
    [call] = done.tool_calls
    assert call.ok, call.error
    result = call.result
    assert (result["job_id"], result["status"]) == ("ft-1", "queued")
    assert "ft-1" in done.answer and "stackwise worker" in done.answer and "status of ft-1" in done.answer
    run = agent_home / "jobs" / "u1" / "ft-1"
    assert Path(result["run_dir"]) == run
    spec = json.loads((run / "spec.json").read_text(encoding="utf-8"))
    assert spec["job_id"] == "ft-1" and spec["lora_rank"] == 8 and spec["gradient_checkpointing"] is False
    assert Path(spec["base_model_path"]) == cwd / "tiny-model"
    train = [json.loads(x) for x in (run / "data" / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    held = [json.loads(x) for x in (run / "data" / "eval.jsonl").read_text(encoding="utf-8").splitlines()]
    assert (len(train), len(held)) == (28, 2)
    for row in train + held:
        assert set(row) == CONTRACT_ROW
        assert row["prompt"].endswith("<|assistant|>\n")
        assert row["completion"].startswith("<think>\n") and row["completion"].endswith("</s>")
    [job] = jobs_of(agent_home)
    assert (job.id, job.owner, job.status, job.run_dir) == ("ft-1", "u1", "queued", str(run))
    assert job.preflight["rows"]["total"] == 30 and job.spec["base_model_path"] == spec["base_model_path"]
    assert not list((agent_home / "jobs" / "u1").glob(".staging-*"))


def test_no_queues_nothing(agent, agent_home, cwd):
    reply = agent.ask("fine-tune ./tiny-model on data.jsonl with lora rank 8", thread_id="c2", user_id="u2")
    assert reply.pending is not None
    declined = agent.ask("no", thread_id="c2", user_id="u2")
    assert declined.tool_calls[0].error["type"] == "declined"
    assert [j for j in jobs_of(agent_home) if j.owner == "u2"] == []
    assert not (agent_home / "jobs" / "u2").exists()


def test_a_failing_preflight_is_a_failed_call_not_a_question(agent, cwd):
    reply = agent.ask("fine-tune ./tiny-model on missing.jsonl with lora rank 8", thread_id="c3", user_id="u3")
    assert reply.pending is None
    [call] = reply.tool_calls
    assert (call.tool, call.ok, call.error["type"]) == ("launch_finetune", False, "not_found")
    assert "missing.jsonl" in call.error["message"]


# ---- bad inputs through `stackwise tool` ------------------------------------------------------------------

@pytest.mark.parametrize(("args", "kind", "words"), [
    ({"lora_rank": 1e15}, "invalid_args", ["lora_rank", "1024"]),
    ({"method": "dora"}, "invalid_args", ["method", "qlora"]),
    ({"learning_rate": "fast"}, "invalid_args", ["learning_rate"]),
    ({"dataset": "nope.jsonl"}, "not_found", ["nope.jsonl"]),
    ({"dataset": "/etc/passwd"}, "forbidden_path", ["/etc/passwd", "outside"]),
    ({"dataset": "bad/malformed.jsonl"}, "bad_data", ["malformed.jsonl line 2", "not valid JSON"]),
    ({"dataset": "bad/fields.jsonl"}, "bad_data",
     ["fields.jsonl line 1", "missing field 'Complex_CoT'", "Question, Complex_CoT, Response"]),
    ({"dataset": "bad/empty.jsonl"}, "bad_data", ["empty.jsonl is empty"]),
    ({"base_model": "stackwise-test/no-such-model-7B"}, "model_not_found",
     ["stackwise-test/no-such-model-7B", "huggingface-cli download stackwise-test/no-such-model-7B", "local folder"]),
    ({"base_model": "./no-model-here"}, "model_not_found", ["./no-model-here"]),
    ({"base_model": "./bad"}, "bad_model", ["config.json"]),
])
def test_bad_launches_fail_clearly_and_queue_nothing(capsys, cwd, stackwise_home, args, kind, words):
    (cwd / "bad").mkdir(exist_ok=True)
    (cwd / "bad" / "malformed.jsonl").write_text(json.dumps(ROWS[0]) + "\n{\"Question\": oops}\n", encoding="utf-8")
    write_jsonl(cwd / "bad" / "fields.jsonl", [{"Question": "Why?", "Response": "Because."}])
    (cwd / "bad" / "empty.jsonl").write_text("\n", encoding="utf-8")
    code, record = tool(capsys, "launch_finetune", {"base_model": "./tiny-model", "dataset": "data.jsonl"} | args)
    assert code == 1 and record["ok"] is False
    assert record["error"]["type"] == kind, record["error"]
    for word in words:
        assert word in record["error"]["message"]
    assert jobs_of(stackwise_home) == []
    assert not any((stackwise_home / "jobs").glob("*/*"))


def test_error_level_preflight_findings_stop_the_launch(cwd, stackwise_home):
    reg = ToolRegistry.default(plugins=False)
    args = {"base_model": "./tiny-model", "dataset": "data.jsonl"}
    cpu = ToolContext(home=stackwise_home, user_id="alice", extras={"worker_gpu": None})
    with pytest.raises(ToolError) as err:
        reg.preflight("launch_finetune", args | {"method": "qlora"}, cpu)
    assert err.value.type == "qlora_needs_gpu"
    small = ToolContext(home=stackwise_home, user_id="alice", extras={"worker_gpu": {"name": "T4", "memory_gb": 1}})
    record = reg.call("launch_finetune", args, small)
    assert record["error"]["type"] == "no_fit" and "GiB" in record["error"]["message"]
    assert jobs_of(stackwise_home) == []
    big = ToolContext(home=stackwise_home, user_id="alice", lang="zh",
                      extras={"worker_gpu": {"name": "NVIDIA H200", "memory_gb": 139}})
    shown = reg.preflight("launch_finetune", args | {"method": "qlora"}, big)
    assert "放得下 NVIDIA H200" in shown["显存"] and "30 行" in shown["数据"]
    unknown = ToolContext(home=stackwise_home, user_id="alice")
    shown = reg.preflight("launch_finetune", args | {"method": "qlora"}, unknown)
    assert any("CUDA GPU on the worker" in w for w in shown["warnings"]) and "unknown" in shown["VRAM"]


def test_a_job_that_fits_by_recomputing_the_mlp_carries_that_into_its_run(capsys, cwd, monkeypatch):
    """When the preflight makes a job fit by having the MLPs compute their down projection's input again
    (tools/finetune/preflight.py; the tiny model here never needs it), the queued run's spec.json asks the
    trainer for it; otherwise the run has no speed options of its own."""
    from tools.finetune import launch as launcher

    plain = launch(capsys)
    assert "speed" not in json.loads((Path(plain["run_dir"]) / "spec.json").read_text(encoding="utf-8"))
    original = launcher.check_job

    def tight(spec, ctx):
        checked = original(spec, ctx)
        checked.report["recompute_mlp"] = True
        return checked

    monkeypatch.setattr(launcher, "check_job", tight)
    lean = launch(capsys)
    spec = json.loads((Path(lean["run_dir"]) / "spec.json").read_text(encoding="utf-8"))
    assert spec["speed"] == {"recompute_mlp": True} and spec["gradient_checkpointing"] is False


# ---- status ---------------------------------------------------------------------------------------------

def test_status_of_a_queued_job_and_of_the_latest(capsys, cwd):
    first = launch(capsys)
    second = launch(capsys, epochs=2)
    launch(capsys, user="bob")
    code, record = tool(capsys, "finetune_status", {"job_id": first["job_id"]})
    assert code == 0 and record["result"]["status"] == "queued" and record["result"]["progress"] is None
    assert record["result"]["attachments"] == []
    code, record = tool(capsys, "finetune_status", {})
    assert record["result"]["job_id"] == second["job_id"]
    code, record = tool(capsys, "finetune_status", {}, user="carol")
    assert code == 1 and record["error"]["type"] == "not_found" and "no fine-tune jobs" in record["error"]["message"]


def test_another_users_job_does_not_exist_for_you(capsys, cwd):
    job = launch(capsys, user="alice")
    code, record = tool(capsys, "finetune_status", {"job_id": job["job_id"]}, user="mallory")
    assert code == 1 and record["error"] == {"type": "not_found", "message": f"There is no job {job['job_id']}."}
    code, record = tool(capsys, "cancel_finetune", {"job_id": job["job_id"]}, user="mallory")
    assert code == 1 and record["error"]["type"] == "not_found"
    code, record = tool(capsys, "finetune_status", {"job_id": "ft-77"})
    assert record["error"]["message"] == "There is no job ft-77."


def test_status_of_a_running_job_reads_progress_and_draws_the_loss(capsys, cwd, stackwise_home):
    job = launch(capsys)
    with JobStore.for_home(stackwise_home) as store:
        assert store.claim("w1").id == job["job_id"]
    now = time.time()
    lines = [{"time": now - 30 + i, "step": 10 * (i + 1), "total": 500, "epoch": 0.1 * i, "loss": 2.0 - 0.2 * i,
              "eval_loss": 1.9 - 0.1 * i if i % 2 else None, "lr": 2e-4, "tokens_per_s": 5200.0,
              "eta_s": 360.0, "gpu_mem_gb": None} for i in range(4)]
    progress = Path(job["run_dir"]) / "progress.jsonl"
    progress.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 5', encoding="utf-8")
    code, record = tool(capsys, "finetune_status", {"job_id": job["job_id"]})
    result = record["result"]
    assert result["status"] == "running"
    p = result["progress"]
    assert (p["step"], p["total"], p["percent"]) == (40, 500, 8.0)
    assert p["loss"] == pytest.approx(1.4) and p["eval_loss"] == pytest.approx(1.6)
    assert 300 <= p["eta_s"] <= 360
    [attachment] = result["attachments"]
    assert attachment["kind"] == "image" and attachment["path"] == str(Path(job["run_dir"]) / "loss.png")
    assert Path(attachment["path"]).read_bytes()[:8] == PNG
    text = ToolRegistry.default(plugins=False).get("finetune_status").render(result, "en")
    assert f"{job['job_id']} is running: step 40/500 (8 %), loss 1.4" in text and "ETA 6 min" in text
    zh = ToolRegistry.default(plugins=False).get("finetune_status").render(result, "zh")
    assert "正在运行" in zh and "第 40/500 步" in zh


def test_a_succeeded_job_shows_the_adapter_and_the_comparison_and_cannot_be_cancelled(capsys, cwd, stackwise_home):
    job = launch(capsys)
    run = Path(job["run_dir"])
    (run / "comparison.json").write_text(json.dumps([{"question": "Q1?", "reference": "R1", "before": "B1",
                                                      "after": "A1"}]), encoding="utf-8")
    with JobStore.for_home(stackwise_home) as store:
        store.claim("w1")
        store.finish(job["job_id"], "succeeded", artifacts={"adapter": str(run / "adapter"), "merged": None,
                                                            "comparison": str(run / "comparison.json")},
                     summary={"status": "succeeded", "steps": 500, "final_loss": 0.87})
    code, record = tool(capsys, "finetune_status", {"job_id": job["job_id"]})
    result = record["result"]
    assert result["comparison"] == {"question": "Q1?", "reference": "R1", "before": "B1", "after": "A1"}
    text = ToolRegistry.default(plugins=False).get("finetune_status").render(result, "en")
    assert "succeeded: 500 steps, final loss 0.87" in text and str(run / "adapter") in text
    assert "Before: B1" in text and "After: A1" in text
    code, record = tool(capsys, "cancel_finetune", {"job_id": job["job_id"]})
    assert code == 1 and record["error"]["type"] == "invalid_state"
    assert record["error"]["message"] == f"{job['job_id']} already succeeded; nothing to cancel."


# ---- cancel ---------------------------------------------------------------------------------------------

def test_cancel_a_queued_job_and_a_running_one(capsys, cwd, stackwise_home):
    queued = launch(capsys)
    code, record = tool(capsys, "cancel_finetune", {"job_id": queued["job_id"]})
    assert code == 0 and record["result"]["status"] == "cancelled"
    running = launch(capsys)
    with JobStore.for_home(stackwise_home) as store:
        store.claim("w1")
    code, record = tool(capsys, "cancel_finetune", {"job_id": running["job_id"]})
    assert record["result"]["status"] == "cancelling" and record["result"]["cancel_requested"] is True
    text = ToolRegistry.default(plugins=False).get("cancel_finetune").render(record["result"], "en")
    assert text.startswith(f"Cancelling {running['job_id']}")


# ---- models from an offline cache -------------------------------------------------------------------------

def test_hub_ids_resolve_from_the_local_cache_only(cwd, tmp_path, stackwise_home):
    snapshot = fake_hub_cache(tmp_path / "hub", "Qwen/Qwen2.5-0.5B", cwd / "tiny-model")
    ctx = ToolContext(home=stackwise_home, extras={"hf_cache_dir": str(tmp_path / "hub")})
    found = resolve_model("Qwen/Qwen2.5-0.5B", ctx)
    assert (found.path, found.source, found.ref) == (snapshot, "huggingface", "Qwen/Qwen2.5-0.5B")
    assert resolve_model("qwen2.5-0.5b", ctx).ref == "Qwen/Qwen2.5-0.5B"     # a bare name, any case
    with pytest.raises(ToolError) as err:
        resolve_model("Qwen2.5-7B", ctx)
    assert err.value.type == "model_not_found"
    assert "huggingface-cli download Qwen/Qwen2.5-7B" in err.value.message
    assert str(tmp_path / "hub") in err.value.message
    modelscope = ToolContext(home=stackwise_home, extras={"modelscope_cache_dir": str(tmp_path / "ms")})
    with pytest.raises(ToolError) as err:
        resolve_model("modelscope:qwen/Qwen2.5-0.5B", modelscope)
    assert err.value.type == "model_not_found" and "modelscope download --model qwen/Qwen2.5-0.5B" in err.value.message
    shutil.copytree(cwd / "tiny-model", tmp_path / "ms" / "models" / "qwen" / "Qwen2___5-0___5B")
    found = resolve_model("modelscope:qwen/Qwen2.5-0.5B", modelscope)
    assert (found.source, found.path.name) == ("modelscope", "Qwen2___5-0___5B")
    with pytest.raises(ToolError) as err:
        resolve_model("/etc", ctx)
    assert err.value.type == "forbidden_path"


def test_the_toolbox_tells_launches_the_workers_gpu_and_the_job_database(stackwise_home, monkeypatch):
    from agent.settings import Settings
    from agent.toolbox import Toolbox

    def extras(**env) -> dict:
        settings = Settings.from_env({"STACKWISE_HOME": str(stackwise_home), **env})
        return Toolbox(settings).context("alice").extras

    probes = []
    monkeypatch.setattr("agent.toolbox.local_gpu", lambda: probes.append(1) or {"name": "H200", "memory_gb": 139.8})
    auto = extras()
    assert probes == [] and callable(auto["worker_gpu"])          # probing waits until a launch needs it
    assert auto["worker_gpu"]() == auto["worker_gpu"]() == {"name": "H200", "memory_gb": 139.8} and probes == [1]
    assert extras(STACKWISE_WORKER_GPU="none") == {"worker_gpu": None}
    assert extras(STACKWISE_WORKER_GPU="RTX 4090:24")["worker_gpu"] == {"name": "RTX 4090", "memory_gb": 24.0,
                                                                              "count": 1}
    assert extras(STACKWISE_WORKER_GPU="unknown") == {}
    assert extras(STACKWISE_JOB_BACKEND="ray") == {}               # ray workers are other machines
    assert extras(STACKWISE_JOB_BACKEND="ray", STACKWISE_WORKER_GPU="A100:80")["worker_gpu"]["memory_gb"] == 80
    url = "postgresql://sw@127.0.0.1:5/jobs"
    assert extras(STACKWISE_DATABASE_URL=url, STACKWISE_WORKER_GPU="unknown") == {"database_url": url}
