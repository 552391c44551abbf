"""The fine-tune job store: ids, owners, the lifecycle, exclusive claims, reaping dead workers, and
clear errors on a damaged or locked database — all on real SQLite files under a tmp STACKWISE_HOME."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from memory.jobs import JobNotFound, JobStateError, JobStore, StoreError

ROOT = Path(__file__).resolve().parents[1]
SPEC = {"base_model": "Qwen/Qwen2.5-0.5B", "dataset": "cot.jsonl", "method": "lora", "lora_rank": 16}
PREFLIGHT = {"rows": 120, "vram_gb": 6.5, "warnings": []}


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1_800_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store(stackwise_home):
    with JobStore.for_home(stackwise_home) as s:
        yield s


def new(store: JobStore, owner: str = "alice") -> str:
    return store.create(owner, SPEC, PREFLIGHT, f"/runs/{owner}").id


def statuses(job) -> list[str]:
    return [h.status for h in job.history]


# --- ids ---------------------------------------------------------------------------------------


def test_ids_increase_and_are_never_reused(stackwise_home):
    store = JobStore.for_home()  # $STACKWISE_HOME from the environment
    assert store.path == stackwise_home / "jobs.sqlite"
    assert [new(store) for _ in range(3)] == ["ft-1", "ft-2", "ft-3"]
    store.delete("ft-3", owner="alice")
    with pytest.raises(JobNotFound):
        store.get("ft-3", owner="alice")
    assert new(store, "bob") == "ft-4"
    store.close()
    with JobStore.for_home() as again:
        again.delete("ft-4", owner="bob")
        assert new(again) == "ft-5"


def test_concurrent_creates_get_distinct_ids(stackwise_home):
    ids: list[str] = []

    def make() -> None:
        with JobStore.for_home() as mine:
            ids.extend(new(mine) for _ in range(5))

    threads = [threading.Thread(target=make) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(ids, key=lambda i: int(i[3:])) == [f"ft-{n}" for n in range(1, 21)]


# --- owners ------------------------------------------------------------------------------------


def test_owner_isolation_reads_like_a_missing_job(store):
    mine = new(store, "alice")
    new(store, "bob")
    with pytest.raises(JobNotFound) as theirs:
        store.get(mine, owner="bob")
    with pytest.raises(JobNotFound) as missing:
        store.get("ft-99", owner="bob")
    assert str(theirs.value) == f"There is no job {mine}." and str(missing.value) == "There is no job ft-99."
    for action in (store.request_cancel, store.resume):
        with pytest.raises(JobNotFound):
            action(mine, "bob")
    with pytest.raises(JobNotFound):
        store.delete(mine, owner="bob")
    assert store.get(" FT-1 ", owner="alice").owner == "alice"
    assert store.get(mine, admin=True).owner == "alice"
    assert [j.id for j in store.list("bob")] == ["ft-2"]
    assert [j.id for j in store.list()] == ["ft-2", "ft-1"]  # admin view: everyone, newest first
    assert store.latest("alice").id == mine and store.latest("carol") is None
    with pytest.raises(ValueError, match="whose job"):
        store.get(mine)
    with pytest.raises(JobNotFound, match="look like ft-12"):
        store.get("job-1", owner="alice")


def test_list_filters_by_status_and_limit(store):
    for _ in range(4):
        new(store)
    store.claim("w1")
    store.request_cancel("ft-2", "alice")
    assert [j.id for j in store.list("alice", status="queued")] == ["ft-4", "ft-3"]
    assert [j.id for j in store.list("alice", status=["running", "cancelled"])] == ["ft-2", "ft-1"]
    assert [j.id for j in store.list("alice", limit=1)] == ["ft-4"]
    with pytest.raises(ValueError, match="unknown job status"):
        store.list(status="done")


# --- the lifecycle -----------------------------------------------------------------------------

ACTIONS = ("claim", "cancel", "resume", "succeeded", "failed", "cancelled", "interrupted")
# What each action does from each status: the new status, "error" (JobStateError), or None (claim finds nothing).
EXPECTED = {
    "queued":      ("running", "cancelled", "error", "error", "error", "error", "error"),
    "running":     (None, "cancelling", "error", "succeeded", "failed", "cancelled", "interrupted"),
    "cancelling":  (None, "cancelling", "error", "succeeded", "failed", "cancelled", "interrupted"),
    "succeeded":   (None, "error", "error", "error", "error", "error", "error"),
    "failed":      (None, "error", "queued", "error", "error", "error", "error"),
    "cancelled":   (None, "error", "queued", "error", "error", "error", "error"),
    "interrupted": (None, "error", "queued", "error", "error", "error", "error"),
}


def drive_to(store: JobStore, status: str) -> str:
    job_id = new(store)
    if status != "queued":
        store.claim("w1")
    if status == "cancelling":
        store.request_cancel(job_id, "alice")
    elif status not in ("queued", "running"):
        store.finish(job_id, status)
    assert store.get(job_id, owner="alice").status == status
    return job_id


@pytest.mark.parametrize("start", list(EXPECTED))
@pytest.mark.parametrize("action", ACTIONS)
def test_every_transition(store, start, action):
    job_id = drive_to(store, start)
    before = store.get(job_id, owner="alice")
    expected = EXPECTED[start][ACTIONS.index(action)]
    run = {"claim": lambda: store.claim("w2"), "cancel": lambda: store.request_cancel(job_id, "alice"),
           "resume": lambda: store.resume(job_id, "alice")}.get(action, lambda: store.finish(job_id, action))
    if expected == "error":
        with pytest.raises(JobStateError, match=job_id):
            run()
        assert store.get(job_id, owner="alice") == before  # nothing changed, not even the history
        return
    result = run()
    after = store.get(job_id, owner="alice")
    if expected is None:
        assert result is None and after == before
        return
    assert after.status == expected and result.status == expected
    grew = expected != start  # a repeated cancel while cancelling changes nothing
    assert statuses(after) == statuses(before) + ([expected] if grew else [])


def test_state_errors_say_what_happened(store):
    job_id = drive_to(store, "succeeded")
    with pytest.raises(JobStateError, match=r"^ft-1 already succeeded; nothing to cancel\.$"):
        store.request_cancel(job_id, "alice")
    with pytest.raises(JobStateError, match=r"^ft-1 already succeeded; nothing to resume\.$"):
        store.resume(job_id, "alice")
    with pytest.raises(JobStateError, match="ft-1 already succeeded; it cannot become failed"):
        store.finish(job_id, "failed")
    with pytest.raises(ValueError, match="finishes as one of"):
        store.finish(job_id, "done")


def test_claim_takes_the_oldest_and_marks_it_running(stackwise_home):
    clock = Clock()
    with JobStore.for_home(clock=clock) as store:
        assert store.claim("w1") is None
        first, second = new(store), new(store, "bob")
        clock.now += 5
        job = store.claim("w1")
        assert (job.id, job.status, job.worker, job.backend) == (first, "running", "w1", "local")
        assert job.worker_pid == os.getpid() and job.pid is None and job.attempts == 1
        assert job.started_at == job.heartbeat_at == clock.now and job.history[-1].note.startswith("claimed by w")
        assert store.claim("w2", backend="ray").id == second
        assert store.claim("w3") is None


def test_claim_is_exclusive_across_threads(stackwise_home):
    with JobStore.for_home() as setup:
        created = {new(setup) for _ in range(20)}
    claimed: list[tuple[str, str]] = []
    start = threading.Barrier(6)

    def work(name: str) -> None:
        with JobStore.for_home() as mine:
            start.wait()
            while (job := mine.claim(name)) is not None:
                claimed.append((job.id, name))
                time.sleep(0.001)

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = [job_id for job_id, _ in claimed]
    assert len(ids) == 20 and set(ids) == created
    assert len({w for _, w in claimed}) >= 2
    with JobStore.for_home() as check:
        assert all(check.get(j, admin=True).worker == w for j, w in claimed)


CLAIMER = """
import sys, time
from pathlib import Path
from memory.jobs import JobStore
db, name, go = sys.argv[1:]
store = JobStore(db)
Path(go + "." + name).touch()
while not Path(go).exists():
    time.sleep(0.001)
got = []
while (job := store.claim(name)) is not None:
    got.append(job.id)
    time.sleep(0.002)  # a worker starts its job before asking again, letting the others in
store.close()
print(" ".join(got))
"""


def claim_in_processes(location: str, tmp_path: Path, *, n: int = 3, timeout: float = 30) -> list[str]:
    """Start ``n`` processes that claim from the store at ``location`` until it is empty, all at one signal;
    each one's claimed ids (a process that failed fails the test)."""
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-c", CLAIMER, location, f"p{i}", str(go)], cwd=ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(n)]
    try:
        for i in range(n):
            ready = Path(f"{go}.p{i}")
            while not ready.exists():
                assert procs[i].poll() is None, procs[i].communicate()[1]
                time.sleep(0.005)
        go.touch()
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    return [out for out, _ in outs]


def test_claim_is_exclusive_across_processes(store, tmp_path):
    created = {new(store) for _ in range(20)}
    outs = claim_in_processes(str(store.path), tmp_path)
    ids = [job_id for out in outs for job_id in out.split()]
    assert len(ids) == 20 and set(ids) == created
    assert sum(1 for out in outs if out.split()) >= 2  # it was a race, not one process taking all


# --- cancel, heartbeat, progress, finish -------------------------------------------------------


def test_cancel_a_queued_job_is_immediate(store):
    job = store.request_cancel(new(store), "alice")
    assert job.status == "cancelled" and job.finished_at is not None and not job.cancel_requested
    assert store.claim("w1") is None


def test_cancel_a_running_job_asks_the_worker(store):
    job_id = new(store)
    store.claim("w1")
    job = store.request_cancel(job_id, "alice")
    assert job.status == "cancelling" and job.cancel_requested
    seen = store.heartbeat(job_id, "w1", pid=os.getpid())
    assert seen.cancel_requested and seen.pid == os.getpid()  # the worker learns it must stop
    assert store.request_cancel(job_id, "alice").history == job.history  # asking twice adds nothing
    done = store.finish(job_id, "cancelled", summary={"status": "cancelled", "steps": 7})
    assert done.status == "cancelled" and done.summary["steps"] == 7
    assert statuses(done) == ["queued", "running", "cancelling", "cancelled"]
    with pytest.raises(JobStateError, match="no longer holds"):
        store.heartbeat(job_id, "w1")


def test_progress_heartbeat_and_finish_are_recorded(store):
    job_id = new(store)
    store.claim("w1")
    store.set_progress(job_id, {"step": 1, "total": 10, "loss": 2.5})
    store.set_progress(job_id, {"step": 2, "total": 10, "loss": float("nan")})  # a diverged loss stays JSON
    job = store.heartbeat(job_id, "w1", 4321, backend_ref="raysubmit_abc")
    assert job.progress == {"step": 2, "total": 10, "loss": None}
    assert (job.pid, job.backend_ref) == (4321, "raysubmit_abc")
    with pytest.raises(JobStateError, match="on worker w1; worker w9 no longer holds it"):
        store.heartbeat(job_id, "w9")
    with pytest.raises(JobStateError, match="worker w9 no longer holds it"):
        store.finish(job_id, "succeeded", worker_id="w9")
    done = store.finish(job_id, "failed", error="CUDA out of memory", artifacts={"adapter": None}, worker_id="w1")
    assert done.error == "CUDA out of memory" and done.history[-1].note == "failed: CUDA out of memory"
    assert done.artifacts == {"adapter": None} and done.finished_at is not None
    record = done.to_dict()
    assert set(record) >= {"id", "owner", "status", "spec", "preflight", "run_dir", "progress", "artifacts", "error",
                           "history", "created_at", "started_at", "finished_at", "worker", "backend", "backend_ref"}
    assert json.loads(json.dumps(record, allow_nan=False)) == record
    assert record["history"][0] == {"status": "queued", "at": record["created_at"], "note": "queued by alice"}
    record["spec"]["lora_rank"] = 64  # a copy: the snapshot is not changed through it
    assert done.spec["lora_rank"] == 16


# --- dead workers and resume -------------------------------------------------------------------


def test_reap_a_job_whose_process_died(store):
    job_id = new(store)
    store.claim("w1")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    store.heartbeat(job_id, "w1", gone.pid)
    alive = new(store)
    store.claim("w2")
    store.heartbeat(alive, "w2", os.getpid())
    assert store.reap_stale() == [job_id]
    job = store.get(job_id, owner="alice")
    assert job.status == "interrupted" and f"training process {gone.pid}" in job.history[-1].note
    assert job.error == job.history[-1].note
    assert store.get(alive, owner="alice").status == "running"
    with pytest.raises(JobStateError, match="was interrupted; worker w1 no longer holds it"):
        store.heartbeat(job_id, "w1")


def test_reap_a_job_whose_heartbeat_is_old(stackwise_home):
    clock = Clock()
    with JobStore.for_home(clock=clock) as store:
        running, cancelling = new(store), new(store)
        store.claim("w1")
        store.claim("w2")
        store.request_cancel(cancelling, "alice")
        assert store.reap_stale(now=clock.now + 59, timeout_s=60) == []
        clock.now += 50
        store.heartbeat(running, "w1")
        assert store.reap_stale(now=clock.now + 30, timeout_s=60) == [cancelling]
        assert store.reap_stale(now=clock.now + 61, timeout_s=60) == [running]
        job = store.get(cancelling, owner="alice")
        assert job.status == "interrupted" and "no heartbeat for 80 s" in job.history[-1].note


def test_resume_keeps_the_run_and_runs_again(store):
    job_id = new(store)
    store.claim("w1", backend="ray")
    store.set_progress(job_id, {"step": 40, "total": 100})
    store.finish(job_id, "interrupted", error="worker gone")
    job = store.resume(job_id, "alice")
    assert job.status == "queued" and job.run_dir == "/runs/alice" and job.progress == {"step": 40, "total": 100}
    assert job.error is None and job.finished_at is None and job.worker is None and job.backend == "ray"
    assert store.claim("w2") is None  # a resumed job goes back to the backend that holds its checkpoints
    again = store.claim("w3", backend="ray")
    assert (again.id, again.attempts) == (job_id, 2)
    assert statuses(again) == ["queued", "running", "interrupted", "queued", "running"]
    assert "resumed by alice (was interrupted)" in again.history[3].note


# --- persistence and damaged files -------------------------------------------------------------


def test_records_survive_a_reopen(stackwise_home):
    with JobStore.for_home() as store:
        job_id = new(store)
        store.claim("w1")
        store.set_progress(job_id, {"step": 3, "total": 9, "loss": 1.25})
        before = store.get(job_id, owner="alice")
    with JobStore.for_home() as store:
        assert store.get(job_id, owner="alice") == before
        assert new(store) == "ft-2"


def test_a_damaged_file_is_a_clear_error_and_left_untouched(stackwise_home):
    path = stackwise_home / "jobs.sqlite"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"this is not a database, just bytes " * 200)
    with pytest.raises(StoreError) as err:
        JobStore.for_home()
    message = str(err.value)
    assert "job database" in message and str(path) in message and "damaged" in message
    assert path.read_bytes() == b"this is not a database, just bytes " * 200


def test_a_locked_file_is_a_clear_error(stackwise_home):
    with JobStore.for_home(lock_timeout_s=0.05) as store:
        holder = sqlite3.connect(str(store.path), isolation_level=None)
        try:
            holder.execute("BEGIN IMMEDIATE")
            with pytest.raises(StoreError, match="job database .* is locked by another process"):
                new(store)
            holder.execute("ROLLBACK")
        finally:
            holder.close()
        assert new(store) == "ft-1"  # nothing half-done was left behind


# --- schema upgrades -------------------------------------------------------------------------------


def test_a_schema_1_database_is_upgraded_in_place_and_keeps_its_jobs(stackwise_home):
    with JobStore.for_home(stackwise_home) as s:
        old = new(s)
    path = stackwise_home / "jobs.sqlite"
    with sqlite3.connect(path) as conn:     # what a database written before job origins looks like
        for column in ("origin", "origin_channel", "announced_at"):
            conn.execute(f"ALTER TABLE jobs DROP COLUMN {column}")
        conn.execute("UPDATE job_meta SET value = 1 WHERE name = 'schema_version'")
    with JobStore.for_home(stackwise_home) as s:
        job = s.get(old, owner="alice")
        assert job.origin is None and job.announced_at is None and statuses(job) == ["queued"]
        launched = s.create("alice", SPEC, PREFLIGHT, "/runs/a", origin={"channel": "slack", "thread_id": "C1/1"})
        assert s.get(launched.id, owner="alice").origin == {"channel": "slack", "thread_id": "C1/1"}
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT value FROM job_meta WHERE name = 'schema_version'").fetchone() == (2,)


def test_an_origin_must_name_its_channel(store):
    for origin in ({}, {"thread_id": "t"}, {"channel": ""}, {"channel": 3}):
        with pytest.raises(ValueError, match="names its channel"):
            store.create("alice", SPEC, PREFLIGHT, "/runs/a", origin=origin)
    assert store.list("alice") == []
