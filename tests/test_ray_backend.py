"""The Ray job backend against a real Ray head, started by this module on loopback (CPU only, no GPUs).

One head serves the whole module (starting Ray takes seconds): ``ray start --head --block`` in a process
group of its own, every port chosen free on 127.0.0.1, its temp dir (sessions, logs, sockets) under a fresh
``/tmp/sw-ray-*`` folder. At the end the head gets SIGTERM (``--block`` then stops every Ray process it
started); whatever of its process tree is still alive after that is killed, and the module fails if a
process of this head — or a trainer of these tests — outlived it.

The jobs are real: a run directory per the contract (``ft_assets``' tiny Qwen2 model and chain-of-thought
rows, prepared as ``launch_finetune`` prepares them), queued into the real job store and run by the real
:class:`~tools.finetune.worker.Worker` on :class:`RayBackend` — Ray starts the real trainer.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("trl")
pytest.importorskip("peft")
pytest.importorskip("ray.job_submission")
psutil = pytest.importorskip("psutil")

from memory.jobs import JobStore  # noqa: E402
from tools.finetune.backends import BackendError, RayBackend  # noqa: E402
from tools.finetune.data import load_tokenizer, prepare_dataset  # noqa: E402
from tools.finetune.spec import FinetuneSpec  # noqa: E402
from tools.finetune.worker import Worker  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*is deprecated and will be removed in v6:FutureWarning")
ROOT = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).parent / "ray"
WORKER = {"poll_s": 0.2, "heartbeat_s": 0.2}  # every poll is a request to the dashboard: not too many
HEAD_START_S = 120


# --- the Ray head ---------------------------------------------------------------------------------------


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on loopback right now."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def ray_processes(temp: Path, root: psutil.Process | None) -> list[psutil.Process]:
    """The head's process tree, and every process that names its temp dir (workers Ray re-parented)."""
    found = {}
    if root is not None:
        try:
            found = {p.pid: p for p in [root, *root.children(recursive=True)]}
        except psutil.NoSuchProcess:
            pass
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if str(temp) in " ".join(proc.info["cmdline"] or ()):
            found.setdefault(proc.pid, proc)
    return list(found.values())


@pytest.fixture(scope="module")
def ray_head():
    """The dashboard address (``http://127.0.0.1:PORT``) of a Ray head that lives as long as this module."""
    temp = Path(tempfile.mkdtemp(prefix="sw-ray-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    (dashboard, gcs, client, agent_http, agent_grpc, node_manager, object_manager, runtime_env,
     metrics) = free_ports(9)
    command = [str(RAY), "start", "--head", "--block", "--disable-usage-stats", "--num-cpus=2", "--num-gpus=0",
               "--node-ip-address=127.0.0.1", f"--port={gcs}", "--include-dashboard=true",
               "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
               f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
               f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
               f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
               f"--temp-dir={temp}", "--object-store-memory=100000000"]
    # The head hands its environment to the jobs: leave out what the runtime env must bring itself.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("STACKWISE_", "RAY_")) and k not in ("OMP_NUM_THREADS", "HF_HUB_OFFLINE")}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    with (temp / "head.log").open("wb") as out:
        head = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    root = psutil.Process(head.pid)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + HEAD_START_S
        while not (answers(f"{address}/api/version") and answers(f"{address}/api/jobs/")):
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the Ray head did not come up:\n{(temp / 'head.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield address
    finally:
        leftovers = stop_head(head, root, temp)
        shutil.rmtree(temp, ignore_errors=True)
    assert not leftovers, f"Ray processes outlived the head: {leftovers}"


def stop_head(head: subprocess.Popen, root: psutil.Process, temp: Path) -> list[str]:
    """Stop the head and its whole process tree; what had to be killed after the head itself had ended."""
    tree = ray_processes(temp, root)
    if head.poll() is None:
        head.send_signal(signal.SIGTERM)  # --block: Ray stops the processes it started
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=10)
    _, alive = psutil.wait_procs([p for p in tree if p.pid != head.pid], timeout=10)
    alive += [p for p in ray_processes(temp, None) if p not in alive]
    described = []
    for proc in alive:
        try:
            described.append(f"{proc.pid} {' '.join(proc.cmdline())[:120]}")
            proc.kill()
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(alive, timeout=10)
    return described


# --- jobs -----------------------------------------------------------------------------------------------


@pytest.fixture
def store(stackwise_home):
    with JobStore.for_home(stackwise_home) as s:
        yield s


def queue(store: JobStore, home: Path, assets: Path, owner: str = "alice", **fields) -> str:
    """Write a run dir (``jobs/<owner>/ft-N``: spec.json + the prepared rows of ``assets/data.jsonl`` for the
    tiny model) and queue it; its id."""
    model = assets / "Qwen2.5-0.5B"
    spec = FinetuneSpec(base_model="Qwen2.5-0.5B", dataset="data.jsonl", lora_rank=4, learning_rate=5e-3,
                        batch_size=4, max_seq_len=64, seed=7, eval_fraction=0.1, **fields)
    job_id = f"ft-{len(store.list(limit=1000)) + 1}"
    run_dir = home / "jobs" / owner / job_id
    stats = prepare_dataset(spec, assets / "data.jsonl", load_tokenizer(model), run_dir / "data")
    values = spec.model_dump()
    (run_dir / "spec.json").write_text(json.dumps({**values, "base_model_path": str(model), "job_id": job_id}))
    preflight = {"rows": {"train": stats["train_rows"], "eval": stats["eval_rows"], "total": stats["rows"]},
                 "warnings": []}
    job = store.create(owner, values, preflight, run_dir, backend="ray")
    assert job.id == job_id
    return job_id


def backend_for(address: str, home: Path, cls: type[RayBackend] = RayBackend, **options) -> RayBackend:
    """The backend as a CPU-only test cluster needs it: no GPU asked for, this venv's python, this checkout."""
    defaults = {"num_gpus": 0, "python": sys.executable, "project_dir": ROOT, "home": home, "threads": 1,
                "stop_grace_s": 30}
    return cls(address, **{**defaults, **options})


def trainers(run_dir: Path) -> list[psutil.Process]:
    """Training processes of ``run_dir`` still alive."""
    return [p for p in psutil.process_iter(["cmdline"])
            if "tools.finetune.train" in (p.info["cmdline"] or ()) and str(run_dir) in (p.info["cmdline"] or ())]


def wait_for(condition, timeout: float = 90, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return value


def progress_steps(run_dir: Path) -> list[int]:
    path = run_dir / "progress.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


# --- the tests --------------------------------------------------------------------------------------------


def test_a_job_runs_on_ray_to_succeeded_and_a_second_submit_attaches(ray_head, ft_assets, stackwise_home, store):
    class SubmitsTwice(RayBackend):
        """A worker that starts the same attempt twice (a retry after a lost answer) must get one run."""

        refs: list[str]

        def start(self, job):
            first = super().start(job)
            again = super().start(job)
            self.refs = [first.ref, again.ref]
            return again

    job_id = queue(store, stackwise_home, ft_assets, max_steps=4)
    backend = backend_for(ray_head, stackwise_home, SubmitsTwice)
    with Worker(stackwise_home, backend=backend, **WORKER) as worker:
        assert worker.run(drain=True) == 1

    job = store.get(job_id, owner="alice")
    run_dir = Path(job.run_dir)
    assert job.status == "succeeded", job.error
    assert job.summary["status"] == "succeeded" and job.summary["steps"] == 4
    assert (run_dir / "adapter").is_dir() and job.artifacts["adapter"] == str(run_dir / "adapter")
    assert job.artifacts["checkpoint"] == str(run_dir / "checkpoints" / "checkpoint-4")
    assert job.progress["step"] == job.progress["total"] == 4
    assert progress_steps(run_dir) == [1, 2, 3, 4]  # one run, not two

    sid = backend.submission_id(job)
    assert sid.startswith(f"stackwise-{job_id}-1-") and backend.refs == [sid, sid] and job.backend_ref == sid
    client = backend.client()
    mine = [j for j in client.list_jobs() if (j.metadata or {}).get("run_dir") == str(run_dir)]
    assert [j.submission_id for j in mine] == [sid]  # the second start attached, it did not submit
    info = client.get_job_info(sid)
    assert str(info.status) == "SUCCEEDED" and info.driver_exit_code == 0
    assert info.metadata["stackwise_job"] == job_id
    env = info.runtime_env["env_vars"]
    assert env["STACKWISE_HOME"] == str(stackwise_home.resolve()) and env["PYTHONPATH"] == str(ROOT)
    assert env["HF_HUB_OFFLINE"] == "1" and env["OMP_NUM_THREADS"] == "1" and env["RAY_JOB_STOP_WAIT_TIME_S"] == "30"

    starts = [line for line in (run_dir / "worker.log").read_text().splitlines() if line.startswith("--- ")]
    assert len(starts) == 3, starts
    assert f"submitted to the Ray cluster at {ray_head} as {sid}" in starts[0]
    assert f"attached to the Ray job {sid}" in starts[1]
    assert f"the Ray job {sid} ended SUCCEEDED (exit code 0)" in starts[2]
    assert "train: succeeded: 4 steps" in (run_dir / "worker.log").read_text()  # Ray's log, kept in the run dir

    # The log through Ray: its last lines, as Ray has them.
    text = client.get_job_logs(sid)
    assert "train: succeeded: 4 steps" in text
    assert backend.logs(job, tail=3) == "\n".join(text.splitlines()[-3:])
    assert "train: succeeded: 4 steps" in backend.logs(job, tail=50)
    assert backend.logs(job, tail=0) == ""


def test_cancel_while_running_stops_the_ray_job(ray_head, ft_assets, stackwise_home, store):
    job_id = queue(store, stackwise_home, ft_assets, max_steps=5000)
    backend = backend_for(ray_head, stackwise_home)
    worker = Worker(stackwise_home, backend=backend, **WORKER)
    thread = threading.Thread(target=worker.run, kwargs={"drain": True}, daemon=True)
    thread.start()
    run_dir = Path(store.get(job_id, owner="alice").run_dir)
    try:
        wait_for(lambda: progress_steps(run_dir), what="the first progress line")
        assert store.request_cancel(job_id, "alice").status == "cancelling"
        thread.join(timeout=60)
        assert not thread.is_alive(), "the worker did not finish the cancelled job"
    finally:
        worker.request_stop(force=True)
        thread.join(timeout=30)
        worker.close()

    job = store.get(job_id, owner="alice")
    assert job.status == "cancelled" and job.error is None
    sid = backend.submission_id(job)
    assert job.backend_ref == sid and str(backend.client().get_job_status(sid)) == "STOPPED"  # stopped by Ray
    steps = job.summary["steps"]
    assert job.summary["status"] == "cancelled" and 1 <= steps < 5000  # the trainer got SIGTERM and said so
    assert job.artifacts["checkpoint"] == str(run_dir / "checkpoints" / f"checkpoint-{steps}")
    assert not (run_dir / "adapter").exists()
    assert [h.status for h in job.history] == ["queued", "running", "cancelling", "cancelled"]
    worker_log = (run_dir / "worker.log").read_text()
    assert f"the Ray job {sid} ended STOPPED" in worker_log and "train: cancelled (SIGTERM)" in worker_log
    assert not trainers(run_dir)


def test_a_run_that_fails_on_ray_fails_the_job_with_the_end_of_rays_log(ray_head, ft_assets, stackwise_home,
                                                                         store):
    job_id = queue(store, stackwise_home, ft_assets, max_steps=2)
    backend = backend_for(ray_head, stackwise_home, python=str(stackwise_home / "no-such-python"))
    with Worker(stackwise_home, backend=backend, **WORKER) as worker:
        assert worker.run(drain=True) == 1

    job = store.get(job_id, owner="alice")
    sid = backend.submission_id(job)
    info = backend.client().get_job_info(sid)
    assert str(info.status) == "FAILED" and info.driver_exit_code == 127  # the shell found no such python
    assert job.status == "failed" and "exited with code 127 without writing summary.json" in job.error
    assert "no-such-python" in job.error  # the end of Ray's log, copied into worker.log
    assert "no-such-python" in backend.logs(job, tail=2)
    with pytest.raises(BackendError, match="the log of stackwise-ft-99"):
        backend.logs(dataclasses.replace(job, backend_ref="stackwise-ft-99-1-0"))


def test_num_gpus_goes_to_ray_so_a_gpu_job_waits_on_a_cpu_head(ray_head, ft_assets, stackwise_home, store):
    queue(store, stackwise_home, ft_assets, max_steps=2)
    job = store.claim("test-worker", backend="ray")
    backend = backend_for(ray_head, stackwise_home, num_gpus=1)  # a real cluster's default; this head has none
    handle = backend.start(job)
    for _ in range(10):
        assert backend.poll(handle) is None
        time.sleep(0.3)
    assert str(backend.client().get_job_status(handle.ref)) == "PENDING"
    assert not (Path(job.run_dir) / "progress.jsonl").exists() and not trainers(Path(job.run_dir))


def test_the_gpus_a_spec_asks_for_go_to_ray_with_one_trainer_process_each(ray_head, ft_assets, stackwise_home,
                                                                           store):
    queue(store, stackwise_home, ft_assets, max_steps=2, gpus=2)
    job = store.claim("test-worker", backend="ray")
    backend = backend_for(ray_head, stackwise_home, num_gpus=0)   # the spec's gpus win over the default
    client, sent = backend.client(), {}
    submit = client.submit_job

    def recording_submit(**kwargs):
        sent.update(kwargs)
        return submit(**kwargs)

    client.submit_job = recording_submit
    handle = backend.start(job)
    try:
        assert sent["entrypoint_num_gpus"] == 2
        info = client.get_job_info(handle.ref)
        assert "torch.distributed.run --standalone --nproc-per-node=2 -m tools.finetune.train" in info.entrypoint
        assert "TORCH_ELASTIC_SHUTDOWN_TIMEOUT=" in info.entrypoint
        time.sleep(1.0)
        assert str(backend.client().get_job_status(handle.ref)) == "PENDING"   # this head has no GPU
    finally:
        backend.stop(handle, 0)


def test_an_unreachable_ray_address_is_a_clear_error_at_once(ft_assets, stackwise_home, store):
    job_id = queue(store, stackwise_home, ft_assets, max_steps=2)
    (port,) = free_ports(1)  # nothing listens there
    started = time.monotonic()
    backend = RayBackend(f"http://127.0.0.1:{port}", num_gpus=0, timeout_s=2)
    with Worker(stackwise_home, backend=backend, **WORKER) as worker:
        assert worker.run(drain=True) == 1
    job = store.get(job_id, owner="alice")
    assert job.status == "failed"
    assert job.error.startswith(f"cannot reach the Ray cluster at http://127.0.0.1:{port}")
    assert "the address of the Ray dashboard" in job.error
    with pytest.raises(BackendError, match="cannot reach the Ray cluster"):
        backend.logs(job)
    assert time.monotonic() - started < 10

    # A host that takes the connection but never answers: the request times out instead of hanging.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        started = time.monotonic()
        with pytest.raises(BackendError, match="cannot reach the Ray cluster.*timed out"):
            RayBackend(f"http://127.0.0.1:{silent.getsockname()[1]}", timeout_s=1).client()
        assert time.monotonic() - started < 5
    finally:
        silent.close()
