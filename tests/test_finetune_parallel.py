"""Data-parallel fine-tuning on CPU: two training processes through PyTorch's launcher (gloo), against one.

The checks the GPU run cannot make cheaply: with rows in file order (``sampling: sequential``) and no LoRA
dropout, one process at batch 4 and two processes at batch 2 see the same global batches, so their losses
and their trained adapters must agree; only rank 0 writes the run's files; a stop reaches both ranks, which
save one checkpoint that two processes resume from; the worker picks the process count from the spec and
the GPUs it sees.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from shapes import QWEN_7B

torch = pytest.importorskip("torch")
pytest.importorskip("trl")
pytest.importorskip("peft")

from memory.jobs import JobStore  # noqa: E402
from tools.finetune.backends import BackendError, LocalBackend, project_pythonpath  # noqa: E402
from tools.finetune.distributed import (  # noqa: E402
    Ranks,
    devices_for,
    launcher_env,
    peer_failure,
    processes_for,
    ranks,
    record_failure,
    train_argv,
    visible_gpus,
)
from tools.finetune.tiny import write_pattern_run  # noqa: E402
from tools.finetune.worker import Worker  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*is deprecated and will be removed in v6:FutureWarning")


# answers of 1–5 words, so batches hold different token counts: the loss must be averaged over the tokens of the
# whole global batch, not per process
write_run = write_pattern_run


def env(processes: int = 2) -> dict[str, str]:
    """The worker's environment for the trainer (launcher settings included), on CPU."""
    return {**os.environ, **launcher_env(processes), "PYTHONPATH": project_pythonpath(), "OMP_NUM_THREADS": "1",
            "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}


def logs_of(run_dir: Path) -> str:
    """The ends of every rank's log, for a failure message."""
    return "\n".join(f"== {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-15:])
                     for p in sorted(run_dir.glob("train*.log")))


def train(run_dir: Path, processes: int, *, resume: bool = False, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the trainer (through the launcher for several processes). A run that hangs fails the test with every
    rank's Python stack (SIGABRT + faulthandler) and the ends of their logs."""
    argv = train_argv(sys.executable, run_dir, processes=processes, resume=resume)
    proc = subprocess.Popen(argv, cwd=run_dir, env={**env(processes), "PYTHONFAULTHANDLER": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        import psutil

        for child in psutil.Process(proc.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                child.send_signal(signal.SIGABRT)
        time.sleep(3)
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"training did not end in {timeout:.0f} s\n{err[-6000:]}\n{logs_of(run_dir)}")
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def progress(run_dir: Path) -> list[dict]:
    path = run_dir / "progress.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def adapter(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def test_two_processes_at_batch_2_train_the_same_adapter_as_one_at_batch_4(tiny, tmp_path):
    """DDP on CPU; the two-process run also uses the fused LoRA layer (the GPU default, asked for here), so the
    one-process run with peft's own layers is the reference for both."""
    one = write_run(tmp_path / "one", tiny, batch_size=4, max_steps=6)
    two = write_run(tmp_path / "two", tiny, batch_size=2, max_steps=6, speed={"fused_lora": True})
    done = train(one, 1)
    assert done.returncode == 0, done.stderr[-2000:]
    done = train(two, 2)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "train[rank 1]:" in done.stderr    # the other rank's short lines are labelled

    a, b = summary(one), summary(two)
    assert a["status"] == b["status"] == "succeeded"
    assert (a["gpus"], a["global_batch"]) == (1, 4) and (b["gpus"], b["global_batch"]) == (2, 4)
    assert a["steps"] == b["steps"] == 6
    assert "fused_lora" in b["speed"]["applied"] and "fused_lora" not in a["speed"]["applied"]
    # the same global batches: the same loss at every step (fp32 on CPU: only summation order differs)
    losses_a, losses_b = [p["loss"] for p in progress(one)], [p["loss"] for p in progress(two)]
    assert [p["step"] for p in progress(two)] == list(range(1, 7))        # one line per step: rank 0 alone writes
    assert losses_a == pytest.approx(losses_b, rel=1e-4)
    assert abs(a["final_loss"] - b["final_loss"]) / a["final_loss"] <= 1e-4
    # ... and the same trained weights: DDP averaged the two halves' gradients into the one-process gradient
    wa, wb = adapter(one), adapter(two)
    assert wa.keys() == wb.keys() and wa
    moved = max(float(wa[k].abs().max()) for k in wa)
    assert moved > 1e-3                                                    # training changed them at all
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= 1e-4 * max(moved, 1.0)

    # rank 0 wrote the run's files; rank 1 only its own log, and no failure record
    assert (two / "train.log").is_file() and (two / "train.rank1.log").is_file()
    assert "succeeded: 6 steps" in (two / "train.log").read_text()
    assert "succeeded" not in (two / "train.rank1.log").read_text()
    assert not list(two.glob("failed.rank*.json"))
    assert json.loads((two / "comparison.json").read_text())


def test_a_stop_reaches_every_rank_which_save_one_checkpoint_that_two_processes_resume(tiny, tmp_path):
    run_dir = write_run(tmp_path / "run", tiny, batch_size=2, max_steps=60, rows=64)
    output = tmp_path / "launcher.out"
    with output.open("wb") as out:
        launcher = subprocess.Popen(train_argv(sys.executable, run_dir, processes=2, resume=False), cwd=run_dir,
                                    env=env(2), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while len(progress(run_dir)) < 2:
            assert launcher.poll() is None, output.read_text()[-2000:]
            assert time.monotonic() < deadline, "no progress"
            time.sleep(0.05)
        launcher.send_signal(signal.SIGTERM)      # what the worker sends: the launcher passes it to both ranks
        launcher.wait(timeout=90)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    stopped = summary(run_dir)
    assert stopped["status"] == "cancelled" and stopped["error"] is None, stopped
    steps = stopped["steps"]
    assert 2 <= steps < 60
    assert (run_dir / "checkpoints" / f"checkpoint-{steps}").is_dir()
    assert not list(run_dir.glob("failed.rank*.json"))

    done = train(run_dir, 2, resume=True)
    assert done.returncode == 0, done.stderr[-2000:]
    finished = summary(run_dir)
    assert finished["status"] == "succeeded" and finished["steps"] == 60 and finished["gpus"] == 2
    assert f"resuming from {run_dir / 'checkpoints' / f'checkpoint-{steps}'}" in (run_dir / "train.log").read_text()
    steps_logged = [p["step"] for p in progress(run_dir)]
    assert steps_logged == sorted(steps_logged) and steps_logged[-1] == 60


def test_the_worker_runs_a_two_gpu_job_with_the_launcher_and_refuses_more_gpus_than_it_has(tiny, stackwise_home):
    with JobStore.for_home(stackwise_home) as store:
        jobs = {}
        for name, gpus in (("fits", 2), ("too_many", 3)):
            job_id = f"ft-{len(jobs) + 1}"
            run_dir = write_run(stackwise_home / "jobs" / "alice" / job_id, tiny, batch_size=2, max_steps=3,
                                gpus=gpus)
            spec = json.loads((run_dir / "spec.json").read_text())
            assert store.create("alice", spec, {"rows": {"train": 32}, "warnings": []}, run_dir).id == job_id
            jobs[name] = job_id
        # two "GPUs" listed for the trainer: on this CPU machine they are two gloo processes
        backend = LocalBackend(env={"CUDA_VISIBLE_DEVICES": "0,1"}, threads=1)
        with Worker(stackwise_home, backend=backend, poll_s=0.05, heartbeat_s=0.2) as worker:
            assert worker.run(drain=True) == 2
        ran, refused = store.get(jobs["fits"], owner="alice"), store.get(jobs["too_many"], owner="alice")
    assert ran.status == "succeeded", ran.error
    assert ran.summary["gpus"] == 2 and ran.summary["global_batch"] == 4
    first_line = (Path(ran.run_dir) / "worker.log").read_text().splitlines()[0]
    assert "torch.distributed.run" in first_line and "--nproc-per-node=2" in first_line
    assert refused.status == "failed"
    assert "asks for 3 GPUs; this worker has only 2" in refused.error


def test_process_count_and_command_line():
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "0,1"}) == 2
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == 0
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "0,-1,2"}) == 1      # CUDA stops at the first invalid id
    assert processes_for(None, 0) == 1 and processes_for(None, 4) == 4 and processes_for(2, 4) == 2
    with pytest.raises(ValueError, match="asks for 2 GPUs; this worker has none"):
        processes_for(2, 0)
    assert train_argv("py", "/r", processes=1, resume=True) == ["py", "-m", "tools.finetune.train", "/r", "--resume"]
    assert train_argv("py", "/r", processes=2, resume=False) == [
        "py", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "tools.finetune.train", "/r"]
    # a job on fewer GPUs than the machine has sees only its own (one process seeing two would use DataParallel)
    def shown(processes: int, listed: str) -> str | None:
        return devices_for(processes, {"CUDA_VISIBLE_DEVICES": listed})

    assert shown(1, "0,1") == "0" and shown(1, "3,5") == "3"
    assert shown(2, "0,1") is None and shown(1, "") is None
    assert ranks({"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"}) == Ranks(1, 1, 2)
    assert ranks({}) == Ranks(0, 0, 1) and ranks({}).main and not ranks({}).distributed


def test_a_failed_peer_is_what_rank_0_and_the_worker_report(tmp_path, monkeypatch):
    from tools.finetune.train import _end, _Facts

    assert peer_failure(tmp_path) is None
    record_failure(tmp_path, 1, "out of memory: CUDA out of memory on GPU 1")
    assert peer_failure(tmp_path) == "rank 1: out of memory: CUDA out of memory on GPU 1"
    # rank 0 was stopped by the launcher because rank 1 died: that is a failure, not a cancellation
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    from tools.finetune.rundir import RunPaths

    outcome = _end(RunPaths(tmp_path), "cancelled", 3, _Facts())
    assert outcome.code == 1 and outcome.summary["status"] == "failed"
    assert "another GPU failed: rank 1: out of memory" in outcome.summary["error"]
    assert summary(tmp_path)["status"] == "failed"
    # a rank other than 0 never writes the summary; it records its failure
    (tmp_path / "summary.json").unlink()
    monkeypatch.setenv("RANK", "2")
    _end(RunPaths(tmp_path), "failed", 1, _Facts(), "boom")
    assert not (tmp_path / "summary.json").exists()
    assert json.loads((tmp_path / "failed.rank2.json").read_text()) == {"rank": 2, "error": "boom"}


def test_a_local_backend_with_fewer_gpus_than_asked_says_so(tiny, tmp_path):
    from memory.jobs_model import Job

    run_dir = write_run(tmp_path / "run", tiny, gpus=2)
    job = Job(id="ft-1", owner="alice", status="running", spec={}, preflight={}, run_dir=str(run_dir),
              created_at=0.0, queued_at=0.0, attempts=1)
    with pytest.raises(BackendError, match="asks for 2 GPUs; this worker has none"):
        LocalBackend(env={"CUDA_VISIBLE_DEVICES": ""}).start(job)




def test_the_preflight_counts_global_batches_per_gpu_memory_and_the_gpus_there_are():
    from tools.finetune.preflight import DP_EFFICIENCY, preflight
    from tools.finetune.spec import FinetuneSpec

    rows = {"train": [{"prompt": "x" * 400, "completion": "y" * 800}] * 800, "eval": [{"prompt": "a",
                                                                                        "completion": "b"}] * 20}

    def check(gpu, **fields):
        spec = FinetuneSpec(base_model="m", dataset="d.jsonl", batch_size=4, max_seq_len=2048, **fields)
        return preflight(spec, rows, None, QWEN_7B, gpu)

    two_h200 = {"name": "NVIDIA H200", "memory_gb": 139, "count": 2}
    one, both = check({"name": "NVIDIA H200", "memory_gb": 139}), check(two_h200)
    assert one["training"]["gpus"] == 1 and both["training"]["gpus"] == 2          # every GPU by default
    assert both["training"]["effective_batch"] == 8 and both["training"]["steps_per_epoch"] == 100
    assert one["training"]["steps_per_epoch"] == 200
    assert both["vram"]["per_gpu"] and both["vram"]["total_gb"] == one["vram"]["total_gb"]  # DDP: a copy each
    assert both["time"]["tokens_per_s"] == pytest.approx(one["time"]["tokens_per_s"] * 2 * DP_EFFICIENCY, rel=0.01)
    assert "on 2 GPUs" in both["time"]["basis"]
    pinned = check(two_h200, gpus=1)
    assert pinned["training"]["gpus"] == 1 and pinned["ok"]
    too_many = check(two_h200, gpus=4)
    assert not too_many["ok"]
    assert any(w["code"] == "not_enough_gpus" and "worker has 2 GPUs" in w["message"] for w in too_many["warnings"])
    on_cpu = check(None, gpus=2)
    assert any(w["code"] == "not_enough_gpus" and "has no GPU" in w["message"] for w in on_cpu["warnings"])


def test_a_full_fine_tune_too_big_for_one_gpu_is_sharded_over_the_gpus():
    from tools.finetune.preflight import preflight
    from tools.finetune.spec import FinetuneSpec

    rows = {"train": [{"prompt": "x" * 4000, "completion": "y" * 8000}] * 100, "eval": []}   # full 2048 tokens

    def check(gpu, **fields):
        spec = FinetuneSpec(base_model="m", dataset="d.jsonl", method="full", learning_rate=1e-5, batch_size=4,
                            max_seq_len=2048, **fields)
        return preflight(spec, rows, None, QWEN_7B, gpu)

    one = check({"name": "NVIDIA H200", "memory_gb": 139, "count": 1})
    assert not one["fits"] and not one["fsdp"]                 # 7B full: ~122 GiB of fp32 states + weights
    two = check({"name": "NVIDIA H200", "memory_gb": 139, "count": 2})
    assert two["fits"] and two["fsdp"] and two["vram"]["fsdp_shards"] == 2
    assert two["vram"]["total_gb"] < 0.95 * 139 < one["vram"]["total_gb"]
    assert any(w["code"] == "fsdp" for w in two["warnings"])
    small = preflight(FinetuneSpec(base_model="m", dataset="d.jsonl", batch_size=4, max_seq_len=2048), rows, None,
                      QWEN_7B, {"name": "NVIDIA H200", "memory_gb": 139, "count": 2})
    assert small["fits"] and not small["fsdp"]                  # LoRA fits one GPU: DDP


def test_a_sharded_full_run_saves_the_gathered_model_and_rank_0_reports_with_it(tiny, tmp_path):
    """On CPU accelerate runs FSDP as plain DDP (it shards only on GPUs), so this checks stackwise's side of a
    sharded run — every rank takes part in saving the whole model, rank 0 reads it back for the comparison and the
    evaluation — against one process."""
    one = write_run(tmp_path / "one", tiny, method="full", learning_rate=1e-3, batch_size=4, max_steps=4)
    two = write_run(tmp_path / "two", tiny, method="full", learning_rate=1e-3, batch_size=2, max_steps=4)
    spec = json.loads((two / "spec.json").read_text())
    (two / "spec.json").write_text(json.dumps({**spec, "fsdp": True}))
    assert train(one, 1).returncode == 0
    done = train(two, 2)
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = summary(one), summary(two)
    assert b["status"] == "succeeded" and b["gpus"] == 2
    # the sharded run's loss is the model's own (tools/finetune/train.py _sharded_trainer), the one-process run's
    # trl's fused LM head: the same numbers
    assert "the loss is the model's own" in (two / "train.log").read_text()
    assert "the loss is the model's own" not in (one / "train.log").read_text()
    assert a["final_loss"] == pytest.approx(b["final_loss"], rel=1e-4)
    assert a["evaluation"]["after"]["loss"] == pytest.approx(b["evaluation"]["after"]["loss"], rel=1e-4)
    from safetensors.torch import load_file

    wa, wb = load_file(one / "adapter" / "model.safetensors"), load_file(two / "adapter" / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= 1e-4
    assert (two / "adapter" / "tokenizer_config.json").is_file()
    assert json.loads((two / "comparison.json").read_text())
