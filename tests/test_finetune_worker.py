"""The fine-tune worker and the jobs service/CLI, on a tiny local model, on CPU, with the real trainer.

Run directories are written by hand per ``ft_contract.md`` (spec.json + prepared rows); jobs are queued
straight into the real SQLite job store. A run is a real ``python -m tools.finetune.train`` subprocess,
so each one costs a few seconds of imports: the tests keep runs short and few.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from runs import write_run

pytest.importorskip("torch")
pytest.importorskip("trl")
pytest.importorskip("peft")

from agent.jobs import JobsError, JobsService  # noqa: E402
from agent.settings import Settings  # noqa: E402
from bots.jobs_commands import add_jobs_parsers, cmd_jobs  # noqa: E402
from memory.jobs import JobStore, pid_alive  # noqa: E402
from tools.finetune.backends import LocalBackend  # noqa: E402
from tools.finetune.worker import Worker  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*is deprecated and will be removed in v6:FutureWarning")
ROOT = Path(__file__).resolve().parents[1]
FAST = {"poll_s": 0.05, "heartbeat_s": 0.2}


@pytest.fixture
def store(stackwise_home):
    with JobStore.for_home(stackwise_home) as s:
        yield s


@pytest.fixture
def spawned():
    """Processes a test started (workers) or learned of (their trainers): killed at teardown if a test failed
    before they ended."""
    started: list[subprocess.Popen | int] = []
    yield started
    for proc in started:
        if isinstance(proc, subprocess.Popen):
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        elif pid_alive(proc):
            os.kill(proc, signal.SIGKILL)


def queue(store: JobStore, home: Path, model: Path, owner: str = "alice", *, rows: int = 16, eval_rows: int = 2,
          **spec) -> str:
    """Write the next job's run dir (``jobs/<owner>/ft-N``) per the contract and queue it; its id."""
    job_id = f"ft-{len(store.list(limit=1000)) + 1}"
    run_dir = home / "jobs" / owner / job_id
    fields = write_run(run_dir, model, rows=rows, eval_rows=eval_rows, job_id=job_id,
                       **{"lora_rank": 4, "max_seq_len": 64, **spec})
    preflight = {"rows": {"train": rows, "eval": eval_rows, "total": rows + eval_rows}, "warnings": []}
    job = store.create(owner, fields, preflight, run_dir)
    assert job.id == job_id
    return job_id


def wait_for(condition, timeout: float = 90, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


def progress_steps(run_dir: str | Path) -> list[int]:
    path = Path(run_dir) / "progress.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


def in_thread(worker: Worker) -> threading.Thread:
    thread = threading.Thread(target=worker.run, kwargs={"drain": True}, daemon=True)
    thread.start()
    return thread


# --- the worker ---------------------------------------------------------------------------------------------


def test_a_queued_job_runs_to_succeeded_with_progress_and_artifacts(tiny, stackwise_home, store):
    job_id = queue(store, stackwise_home, tiny, max_steps=6)
    finished = []
    with Worker(stackwise_home, backend=LocalBackend(), on_finished=finished.append, **FAST) as worker:
        assert worker.run(drain=True) == 1

    job = store.get(job_id, owner="alice")
    assert job.status == "succeeded" and job.error is None and job.attempts == 1
    assert [j.id for j in finished] == [job_id] and finished[0].status == "succeeded"
    run_dir = Path(job.run_dir)
    assert job.progress is not None and job.progress["step"] == job.progress["total"] == 6  # the last line
    assert job.summary["status"] == "succeeded" and job.summary["steps"] == 6
    assert job.artifacts["adapter"] == str(run_dir / "adapter") and (run_dir / "adapter").is_dir()
    assert job.artifacts["comparison"] == str(run_dir / "comparison.json")
    assert job.artifacts["checkpoint"] == str(run_dir / "checkpoints" / "checkpoint-6")
    assert job.pid and not pid_alive(job.pid) and job.worker == worker.worker_id
    assert "--- " in (run_dir / "worker.log").read_text()
    assert "succeeded: 6 steps" in (run_dir / "train.log").read_text()
    assert [h.status for h in job.history] == ["queued", "running", "succeeded"]


def test_the_trainer_finds_the_project_without_an_installed_package(tiny, stackwise_home, store, tmp_path,
                                                                    monkeypatch):
    # Run from a checkout (no pip install): the trainer's `-m tools.finetune.train` in the run directory
    # must still import the project, so the backend puts the project first on PYTHONPATH.
    fake_python = tmp_path / "python"
    fake_python.write_text('#!/bin/sh\nprintf %s "$PYTHONPATH" > pythonpath.txt\nexit 1\n')
    fake_python.chmod(0o755)
    monkeypatch.setenv("PYTHONPATH", "/opt/extra")
    job_id = queue(store, stackwise_home, tiny, max_steps=1)
    with Worker(stackwise_home, backend=LocalBackend(python=str(fake_python)), **FAST) as worker:
        worker.run(drain=True)
    run_dir = Path(store.get(job_id, owner="alice").run_dir)
    root = str(Path(__file__).resolve().parents[1])
    assert (run_dir / "pythonpath.txt").read_text().split(os.pathsep) == [root, "/opt/extra"]


def test_drain_with_an_empty_queue_exits_at_once(stackwise_home):
    started = time.monotonic()
    with Worker(stackwise_home, backend=LocalBackend(), **FAST) as worker:
        assert worker.run(drain=True) == 0
    assert time.monotonic() - started < 2


def test_a_run_that_dies_without_a_summary_fails_with_the_end_of_its_log(tiny, stackwise_home, store):
    class Crashing(LocalBackend):
        def command(self, job):
            return [sys.executable, "-c", "import sys; print('segfault-ish: out of cheese', file=sys.stderr); "
                                          "sys.exit(7)"]

    crashed = queue(store, stackwise_home, tiny, max_steps=2)
    missing = queue(store, stackwise_home, tiny, max_steps=2)
    (stackwise_home / "jobs" / "alice" / missing / "spec.json").unlink()
    with Worker(stackwise_home, backend=Crashing(), **FAST) as worker:
        assert worker.run(drain=True) == 2
    job = store.get(crashed, owner="alice")
    assert job.status == "failed" and "exited with code 7 without writing summary.json" in job.error
    assert "out of cheese" in job.error
    job = store.get(missing, owner="alice")
    assert job.status == "failed" and "has no spec.json" in job.error


def test_cancel_a_running_job_stops_it_with_its_checkpoint_kept(tiny, stackwise_home, store):
    job_id = queue(store, stackwise_home, tiny, max_steps=400)
    worker = Worker(stackwise_home, backend=LocalBackend(), **FAST)
    thread = in_thread(worker)
    run_dir = Path(store.get(job_id, owner="alice").run_dir)
    wait_for(lambda: progress_steps(run_dir), what="the first progress line")
    service = JobsService(Settings.from_env(home=str(stackwise_home)))
    assert service.cancel(job_id, "alice")["status"] == "cancelling"
    thread.join(timeout=60)
    assert not thread.is_alive()
    worker.close()

    job = service.store.get(job_id, owner="alice")
    service.close()
    assert job.status == "cancelled" and job.error is None
    steps = job.summary["steps"]
    assert job.summary["status"] == "cancelled" and 1 <= steps < 400 and job.summary["total_steps"] == 400
    assert job.artifacts["checkpoint"] == str(run_dir / "checkpoints" / f"checkpoint-{steps}")
    assert (run_dir / "checkpoints" / f"checkpoint-{steps}").is_dir() and not (run_dir / "adapter").exists()
    assert [h.status for h in job.history] == ["queued", "running", "cancelling", "cancelled"]


def test_sigterm_to_the_worker_interrupts_the_run_resumably(tiny, stackwise_home, store, spawned):
    job_id = queue(store, stackwise_home, tiny, max_steps=400)
    worker = subprocess.Popen([sys.executable, "-m", "tools.finetune.worker", "--home", str(stackwise_home),
                               "--poll-s", "0.05", "--heartbeat-s", "0.2"], cwd=ROOT, stderr=subprocess.PIPE,
                              text=True)
    spawned.append(worker)
    run_dir = Path(store.get(job_id, owner="alice").run_dir)
    wait_for(lambda: progress_steps(run_dir), what="the first progress line")
    worker.send_signal(signal.SIGTERM)
    _, err = worker.communicate(timeout=60)
    assert worker.returncode == 0, err
    job = store.get(job_id, owner="alice")
    assert job.status == "interrupted" and "was stopped; resume continues" in job.error
    assert job.summary["status"] == "cancelled"  # what the trainer wrote; the job says why it stopped
    assert (run_dir / "checkpoints" / f"checkpoint-{job.summary['steps']}").is_dir()
    assert "interrupted" in err


def test_kill_9_of_the_worker_is_reaped_and_resume_finishes_from_the_checkpoint(tiny, stackwise_home, store,
                                                                                spawned):
    job_id = queue(store, stackwise_home, tiny, max_steps=200)
    worker = subprocess.Popen([sys.executable, "-m", "tools.finetune.worker", "--home", str(stackwise_home),
                               "--drain", "--poll-s", "0.05", "--heartbeat-s", "0.2"], cwd=ROOT,
                              stderr=subprocess.DEVNULL)
    spawned.append(worker)
    run_dir = Path(store.get(job_id, owner="alice").run_dir)
    wait_for(lambda: (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir()),
             what="a first checkpoint")
    trainer = store.get(job_id, owner="alice").pid
    assert trainer and pid_alive(trainer)
    spawned.append(trainer)
    worker.kill()
    worker.wait(timeout=10)
    if sys.platform.startswith("linux"):  # the trainer was told (PDEATHSIG) and stops after its checkpoint
        wait_for(lambda: not pid_alive(trainer), timeout=60, what="the orphaned trainer to stop")
    else:
        os.kill(trainer, signal.SIGKILL)
        wait_for(lambda: not pid_alive(trainer), timeout=10, what="the trainer to die")

    assert store.get(job_id, owner="alice").status == "running"  # nobody has noticed yet
    assert store.reap_stale() == [job_id]
    job = store.get(job_id, owner="alice")
    assert job.status == "interrupted" and "is gone" in job.error
    stopped_at = max(progress_steps(run_dir))
    assert stopped_at < 200

    service = JobsService(Settings.from_env(home=str(stackwise_home)))
    assert service.resume(job_id, "alice")["status"] == "queued"
    done = []
    assert service.run_worker(drain=True, on_finished=done.append, **FAST) == 0
    job = service.store.get(job_id, owner="alice")
    service.close()
    assert [j.id for j in done] == [job_id]
    assert job.status == "succeeded" and job.attempts == 2
    assert job.summary["steps"] == job.summary["total_steps"] == 200
    steps = progress_steps(run_dir)
    assert steps == sorted(set(steps)) and steps[-1] == 200  # continued, not started over
    assert "resuming from" in (run_dir / "train.log").read_text()
    starts = [line for line in (run_dir / "worker.log").read_text().splitlines() if line.startswith("--- ")]
    assert len(starts) == 2 and "attempt 2:" in starts[1] and starts[1].endswith("--resume")


# --- the jobs service and CLI ---------------------------------------------------------------------------------


def test_other_users_cannot_see_or_touch_a_job(tiny, stackwise_home, store):
    job_id = queue(store, stackwise_home, tiny)
    service = JobsService(Settings.from_env(home=str(stackwise_home)))
    try:
        for call in (service.show, service.logs, service.cancel, service.resume):
            with pytest.raises(JobsError) as caught:
                call(job_id, "bob")
            assert caught.value.type == "not_found" and caught.value.message == f"There is no job {job_id}."
        assert service.list("bob") == [] and [r["id"] for r in service.list("bob", admin=True)] == [job_id]
        assert service.show(job_id, "alice")["preflight"]["rows"]["train"] == 16
        with pytest.raises(JobsError) as caught:
            service.resume(job_id, "alice")
        assert caught.value.type == "invalid_state" and "nothing to resume" in caught.value.message
        assert service.cancel(job_id, "alice")["status"] == "cancelled"
        with pytest.raises(JobsError) as caught:
            service.cancel(job_id, "alice")
        assert caught.value.type == "invalid_state"
        with pytest.raises(JobsError) as caught:
            service.show("ft-99", "alice")
        assert caught.value.type == "not_found"
    finally:
        service.close()


def jobs_cli(home: Path, *argv: str) -> int:
    parser = argparse.ArgumentParser(prog="stackwise")
    parser.add_argument("--home")
    add_jobs_parsers(parser.add_subparsers(dest="command"))
    return cmd_jobs(parser.parse_args(["--home", str(home), "jobs", *argv]))


def one_json(capsys) -> dict:
    out = capsys.readouterr().out
    assert out.count("\n") == 1, out
    return json.loads(out)


def test_jobs_commands_list_show_logs_cancel_resume(tiny, stackwise_home, store, capsys):
    first = queue(store, stackwise_home, tiny)
    second = queue(store, stackwise_home, tiny, owner="bob")
    (Path(store.get(first, owner="alice").run_dir) / "worker.log").write_text("line one\nline two\n")

    assert jobs_cli(stackwise_home, "list", "--user", "alice", "--json") == 0
    listing = one_json(capsys)
    assert [r["id"] for r in listing["jobs"]] == [first] and listing["jobs"][0]["status"] == "queued"
    assert jobs_cli(stackwise_home, "list", "--all", "--json") == 0
    assert [r["id"] for r in one_json(capsys)["jobs"]] == [second, first]
    assert jobs_cli(stackwise_home, "list", "--user", "alice") == 0
    assert first in capsys.readouterr().out

    assert jobs_cli(stackwise_home, "show", first, "--user", "alice", "--json") == 0
    shown = one_json(capsys)
    assert shown["id"] == first and shown["spec"]["base_model"] == "tiny-llama" and shown["history"]
    assert jobs_cli(stackwise_home, "show", first, "--user", "alice") == 0
    assert "16 train / 2 eval rows" in capsys.readouterr().out

    assert jobs_cli(stackwise_home, "logs", first, "--user", "alice", "--tail", "1") == 0
    assert capsys.readouterr().out == "==> worker.log <==\nline two\n"
    assert jobs_cli(stackwise_home, "logs", first, "--user", "alice", "--tail", "0", "--json") == 2
    assert one_json(capsys)["error"]["type"] == "usage"

    assert jobs_cli(stackwise_home, "cancel", first, "--user", "alice", "--json") == 0
    assert one_json(capsys)["status"] == "cancelled"
    assert jobs_cli(stackwise_home, "resume", first, "--user", "alice") == 0
    assert "queued again" in capsys.readouterr().out

    assert jobs_cli(stackwise_home, "cancel", second, "--user", "alice", "--json") == 1
    assert one_json(capsys) == {"error": {"type": "not_found", "message": f"There is no job {second}."}}
    assert jobs_cli(stackwise_home, "show", "nope", "--user", "alice") == 1
    assert "job ids look like ft-12" in capsys.readouterr().err


def test_stackwise_jobs_list_json_through_the_installed_command(tiny, stackwise_home, store, stackwise_bin, cli_env):
    job_id = queue(store, stackwise_home, tiny, owner="carol")
    proc = subprocess.run([stackwise_bin, "jobs", "list", "--user", "carol", "--json"], env=cli_env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert [r["id"] for r in json.loads(proc.stdout)["jobs"]] == [job_id]
    proc = subprocess.run([stackwise_bin, "jobs", "cancel", "ft-77", "--user", "carol", "--json"], env=cli_env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and json.loads(proc.stdout)["error"]["type"] == "not_found"
    proc = subprocess.run([stackwise_bin, "worker", "--drain"], env={**cli_env, "STACKWISE_JOB_BACKEND": "nope"},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "'nope'" in proc.stderr and "Traceback" not in proc.stderr
