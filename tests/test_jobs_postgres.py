"""The fine-tune job store on a real PostgreSQL server (``pg_url``: a fresh database per test, see conftest):
the SQLite store's behaviour tests run again here unchanged, against Postgres; then what only a server store
has to get right — several connections claiming at once (exactly one wins), row locks, schema set-up by
processes starting together, clear errors for a bad URL or an unreachable server (never the password) — and
the store reached through the settings by the jobs service, the worker and the launch tool."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest
from test_jobs_store import (  # noqa: F401 - collected here again: the same tests, against the Postgres store
    CLAIMER,
    PREFLIGHT,
    ROOT,
    SPEC,
    Clock,
    claim_in_processes,
    new,
    statuses,
    test_cancel_a_queued_job_is_immediate,
    test_cancel_a_running_job_asks_the_worker,
    test_every_transition,
    test_list_filters_by_status_and_limit,
    test_owner_isolation_reads_like_a_missing_job,
    test_progress_heartbeat_and_finish_are_recorded,
    test_reap_a_job_whose_process_died,
    test_resume_keeps_the_run_and_runs_again,
    test_state_errors_say_what_happened,
)

from agent.jobs import JobsService
from agent.settings import Settings
from memory import pg
from memory.jobs import JobNotFound, JobStore, StoreError
from memory.jobs_sql import SCHEMA_VERSION
from tools.base import ToolContext
from tools.finetune.backends import LocalBackend
from tools.finetune.status import open_jobs
from tools.finetune.worker import Worker

try:
    import psycopg
except ImportError:  # pg_url skips (or, with STACKWISE_REQUIRE_POSTGRES=1, fails) every test that needs it
    psycopg = None


@pytest.fixture
def store(pg_url):
    """The store the imported SQLite tests run against: here, a Postgres one."""
    with JobStore(pg_url) as s:
        assert s.dialect == "postgres" and s.path is None
        yield s


def run_together(n: int, work) -> list:
    """``work(i)`` in ``n`` threads released at once; their results in order (an exception is re-raised)."""
    results: list = [None] * n
    errors: list[BaseException] = []
    start = threading.Barrier(n)

    def one(i: int) -> None:
        try:
            start.wait()
            results[i] = work(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0]
    return results


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- ids, owners and persistence --------------------------------------------------------------------------


def test_ids_increase_and_are_never_reused(pg_url):
    with JobStore(pg_url) as store:
        assert [new(store) for _ in range(3)] == ["ft-1", "ft-2", "ft-3"]
        store.delete("ft-3", owner="alice")
        with pytest.raises(JobNotFound):
            store.get("ft-3", owner="alice")
        assert new(store, "bob") == "ft-4"
    with JobStore(pg_url) as again:
        again.delete("ft-4", owner="bob")
        assert new(again) == "ft-5"
        assert [j.id for j in again.list()] == ["ft-5", "ft-2", "ft-1"]


def test_concurrent_creates_on_several_connections_get_distinct_ids(pg_url):
    stores = [JobStore(pg_url) for _ in range(4)]
    try:
        made = run_together(4, lambda i: [new(stores[i], f"user{i}") for _ in range(5)])
    finally:
        for s in stores:
            s.close()
    ids = [job_id for batch in made for job_id in batch]
    assert sorted(ids, key=lambda i: int(i[3:])) == [f"ft-{n}" for n in range(1, 21)]
    with JobStore(pg_url) as check:
        assert all(len(check.list(f"user{i}")) == 5 for i in range(4))


def test_records_survive_a_reopen_and_read_back_exactly(pg_url):
    with JobStore(pg_url) as store:
        job_id = new(store)
        store.claim("w1")
        store.set_progress(job_id, {"step": 3, "total": 9, "loss": 1.25, "note": "naïve 中文 \u2028 %s :x"})
        before = store.get(job_id, owner="alice")
    with JobStore(pg_url) as store:
        after = store.get(job_id, owner="alice")
        assert after == before and after.spec == SPEC and after.preflight == PREFLIGHT
        assert after.progress["note"] == "naïve 中文 \u2028 %s :x"  # placeholders inside values stay values
        assert new(store) == "ft-2"


def test_a_nul_character_in_a_value_does_not_fail_the_write(store):
    job_id = new(store)
    store.claim("w1")
    done = store.finish(job_id, "failed", error="Traceback\x00\x00 CUDA error", worker_id="w1")
    assert done.error == "Traceback\ufffd\ufffd CUDA error" and done.status == "failed"


# --- claims: exclusive across connections, processes and (so) machines ---------------------------------


def test_claim_takes_the_oldest_and_marks_it_running(pg_url):
    clock = Clock()
    with JobStore(pg_url, clock=clock) as store:
        assert store.claim("w1") is None
        first, second = new(store), new(store, "bob")
        clock.now += 5
        job = store.claim("w1")
        assert (job.id, job.status, job.worker, job.backend) == (first, "running", "w1", "local")
        assert job.worker_pid == os.getpid() and job.attempts == 1
        assert job.started_at == job.heartbeat_at == clock.now
        assert store.claim("w2", backend="ray").id == second
        assert store.claim("w3") is None


def test_two_workers_claiming_one_job_at_once_exactly_one_wins(pg_url):
    a, b = JobStore(pg_url), JobStore(pg_url)
    try:
        for round_ in range(15):
            job_id = new(a)
            got = run_together(2, lambda i: (a, b)[i].claim(f"w{i}"))
            winners = [job for job in got if job is not None]
            assert len(winners) == 1, f"round {round_}: {got}"
            job = a.get(job_id, admin=True)
            assert winners[0].id == job_id and job.worker == winners[0].worker and job.attempts == 1
            assert statuses(job) == ["queued", "running"]
            a.finish(job_id, "succeeded")
    finally:
        a.close()
        b.close()


def test_claim_is_exclusive_across_threads(pg_url):
    with JobStore(pg_url) as setup:
        created = {new(setup) for _ in range(20)}
    stores = [JobStore(pg_url) for _ in range(6)]

    def work(i: int) -> list[str]:
        got = []
        while (job := stores[i].claim(f"w{i}")) is not None:
            got.append(job.id)
            time.sleep(0.001)
        return got

    try:
        claimed = run_together(6, work)
    finally:
        for s in stores:
            s.close()
    ids = [job_id for got in claimed for job_id in got]
    assert len(ids) == 20 and set(ids) == created
    assert sum(1 for got in claimed if got) >= 2
    with JobStore(pg_url) as check:
        assert all(check.get(j, admin=True).worker == f"w{i}" for i, got in enumerate(claimed) for j in got)


def test_claim_is_exclusive_across_processes(pg_url, tmp_path):
    with JobStore(pg_url) as store:
        created = {new(store) for _ in range(20)}
    outs = claim_in_processes(pg_url, tmp_path, timeout=60)
    ids = [job_id for out in outs for job_id in out.split()]
    assert len(ids) == 20 and set(ids) == created
    assert sum(1 for out in outs if out.split()) >= 2


def test_a_claim_passes_over_a_job_another_worker_is_claiming(pg_url):
    with JobStore(pg_url, lock_timeout_s=10) as store:
        first, second = new(store), new(store)
        with psycopg.connect(pg_url) as other:  # another machine's worker, mid-claim on the oldest job
            other.execute("SELECT number FROM jobs WHERE id = %s FOR UPDATE", [first])
            started = time.monotonic()
            job = store.claim("w1")
            assert job.id == second and time.monotonic() - started < 2  # skipped, not waited for
            assert store.claim("w2") is None
        assert store.claim("w3").id == first  # released: now it can be claimed


def test_a_row_held_too_long_is_a_clear_error_and_nothing_changes(pg_url):
    with JobStore(pg_url, lock_timeout_s=0.2) as store:
        job_id = new(store)
        store.claim("w1")
        with psycopg.connect(pg_url) as other:
            other.execute("SELECT number FROM jobs WHERE id = %s FOR UPDATE", [job_id])
            with pytest.raises(StoreError, match=r"job database at 127\.0\.0\.1:\d+ .* is locked by another "
                                                 r"process \(waited 0\.2 s\)"):
                store.request_cancel(job_id, "alice")
        job = store.get(job_id, owner="alice")
        assert job.status == "running" and statuses(job) == ["queued", "running"]
        assert store.request_cancel(job_id, "alice").status == "cancelling"  # the connection still works


def test_cancel_and_finish_racing_leave_one_consistent_history(pg_url):
    for _ in range(10):
        with JobStore(pg_url) as a, JobStore(pg_url) as b:
            job_id = new(a)
            a.claim("w1")
            racers = (lambda: a.request_cancel(job_id, "alice"),  # noqa: B023 - called before the loop moves on
                      lambda: b.finish(job_id, "succeeded", worker_id="w1"))  # noqa: B023
            outcome = run_together(2, lambda i: _try(racers[i]))  # noqa: B023
            job = a.get(job_id, owner="alice")
            history = statuses(job)
            assert job.status == history[-1]
            # whichever came second saw the first's result: never both "cancelling" and "succeeded" from "running"
            assert history in (["queued", "running", "cancelling", "succeeded"],
                               ["queued", "running", "succeeded"]), (history, outcome)
            if history[-1] == "succeeded" and len(history) == 3:
                assert "JobStateError" in outcome[0]  # the cancel came too late: nothing to cancel


def _try(fn) -> str:
    try:
        return fn().status
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


# --- dead workers ------------------------------------------------------------------------------------------


def test_reap_a_job_whose_heartbeat_is_old(pg_url):
    clock = Clock()
    with JobStore(pg_url, clock=clock) as store:
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
        assert store.resume(cancelling, "alice").status == "queued"
        assert store.claim("w3").attempts == 2


# --- the schema and the connection ----------------------------------------------------------------------


def test_schema_set_up_by_many_processes_starting_at_once(pg_url):
    stores = run_together(8, lambda i: JobStore(pg_url))
    try:
        ids = run_together(8, lambda i: new(stores[i]))
    finally:
        for s in stores:
            s.close()
    assert sorted(ids, key=lambda i: int(i[3:])) == [f"ft-{n}" for n in range(1, 9)]
    with psycopg.connect(pg_url) as conn:
        tables = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
        meta = dict(conn.execute("SELECT name, value FROM job_meta").fetchall())
    assert tables == {"jobs", "job_history", "job_meta"}
    assert meta == {"schema_version": SCHEMA_VERSION, "last_job_number": 8}


def test_a_newer_schema_is_refused(pg_url):
    JobStore(pg_url).close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("UPDATE job_meta SET value = 99 WHERE name = 'schema_version'")
    with pytest.raises(StoreError, match=r"written by a newer stackwise \(schema 99\)"):
        JobStore(pg_url)


def test_the_store_reconnects_after_the_server_dropped_it(pg_url):
    with JobStore(pg_url) as store:
        new(store)
        with psycopg.connect(pg_url, autocommit=True) as admin:
            killed = admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                   "WHERE datname = current_database() AND pid <> pg_backend_pid()").fetchall()
        assert killed == [(True,)]
        assert store.get("ft-1", owner="alice").status == "queued"  # found dropped: connected again
        assert new(store) == "ft-2"


def test_an_unreachable_server_is_a_clear_error_without_the_password():
    port = free_port()
    url = f"postgresql://bot:s3cr3t-pw@127.0.0.1:{port}/jobs"
    started = time.monotonic()
    with pytest.raises(StoreError) as err:
        JobStore.open("/unused", url)
    message = str(err.value)
    assert f"Cannot connect to the job database at 127.0.0.1:{port} (database jobs, user bot)" in message
    assert "refused" in message.lower() and "STACKWISE_DATABASE_URL" in message
    assert "s3cr3t" not in message and time.monotonic() - started < 10


def test_a_missing_database_is_a_clear_error_without_the_password(pg_url):
    url = pg.with_database(pg_url, "no_such_db").replace("postgres@", "postgres:pw-XYZZY@")
    with pytest.raises(StoreError) as err:
        JobStore(url)
    message = str(err.value)
    assert "job database at 127.0.0.1:" in message and 'database "no_such_db" does not exist' in message
    assert "XYZZY" not in message


@pytest.mark.parametrize(("url", "words"), [
    ("postgresql://bot:s3cr3t@db.example:notaport/jobs", "not valid"),
    ("postgresql://bot@db.example:5432/jobs?password=s3cr3t&nonsense=1", "not valid"),
    ("mysql://bot:s3cr3t@db.example/jobs", "not a PostgreSQL URL"),
])
def test_a_malformed_url_is_a_clear_error_without_the_password(url, words):
    with pytest.raises(StoreError, match=words) as err:
        JobStore.open("/unused", url)
    assert "s3cr3t" not in str(err.value) and "db.example" in str(err.value)


def test_redact_and_describe_never_show_the_password():
    assert pg.redact("postgresql://u:p%40ss@h:1/d?sslmode=require") == "postgresql://u:***@h:1/d?sslmode=require"
    assert pg.redact("postgresql://u@h/d?password=pw&x=1") == "postgresql://u@h/d?password=***&x=1"
    assert pg.describe("postgresql://u:pw@h/d") == "h:5432 (database d, user u)"
    assert pg.with_database("postgresql://u:pw@h:7/d?sslmode=disable", "e") == "postgresql://u:pw@h:7/e?sslmode=disable"


# --- reached through the settings: the jobs service, the worker, the launch tool ---------------------------


def test_open_picks_sqlite_without_a_url_and_postgres_with_one(pg_url, stackwise_home):
    for empty in (None, "", "  "):
        with JobStore.open(stackwise_home, empty) as local:
            assert local.dialect == "sqlite" and local.path == stackwise_home / "jobs.sqlite"
    with JobStore.open(stackwise_home, pg_url.replace("postgres@", "postgres:pw-XYZZY@")) as remote:
        assert remote.dialect == "postgres" and remote.location == pg_url.replace("postgres@", "postgres:***@")
        assert new(remote) == "ft-1"
    with JobStore.open(stackwise_home, None) as local:
        assert local.list() == []  # the job went to the server, not to the file


def test_jobs_service_uses_the_database_url(pg_url, stackwise_home):
    with JobStore(pg_url) as store:
        mine, theirs = new(store, "alice"), new(store, "bob")
    settings = Settings.from_env({"STACKWISE_HOME": str(stackwise_home), "STACKWISE_DATABASE_URL": pg_url})
    service = JobsService(settings)
    try:
        assert service.store.dialect == "postgres"
        assert [row["id"] for row in service.list("alice")] == [mine]
        assert [row["id"] for row in service.list("alice", admin=True)] == [theirs, mine]
        assert service.cancel(mine, "alice")["status"] == "cancelled"
        assert service.show(mine, "alice")["history"][-1]["note"] == "cancelled by alice before it started"
    finally:
        service.close()
    assert not (stackwise_home / "jobs.sqlite").exists()


def test_the_worker_cli_reaches_the_same_store(pg_url, stackwise_home, cli_env):
    with JobStore(pg_url, clock=Clock(time.time() - 3600)) as store:
        job_id = new(store)
        store.claim("gone-worker")  # an hour without a heartbeat: its worker died
    env = {**cli_env, "STACKWISE_DATABASE_URL": pg_url}
    done = subprocess.run([sys.executable, "-m", "tools.finetune.worker", "--home", str(stackwise_home), "--drain",
                           "--poll-s", "0.05"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"{job_id}: its worker is gone" in done.stderr
    with JobStore(pg_url) as store:
        assert store.get(job_id, owner="alice").status == "interrupted"
    assert not (stackwise_home / "jobs.sqlite").exists()
    bad = subprocess.run([sys.executable, "-m", "tools.finetune.worker", "--drain", "--database-url",
                          f"postgresql://w:pw-XYZZY@127.0.0.1:{free_port()}/jobs"], cwd=ROOT, env=cli_env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "Cannot connect to the job database at 127.0.0.1" in bad.stderr
    assert "XYZZY" not in bad.stderr and "Traceback" not in bad.stderr


def test_launch_and_status_tools_and_the_worker_share_the_postgres_store(pg_url, stackwise_home, tmp_path,
                                                                          monkeypatch):
    from tools.finetune.tiny import build_tiny_model
    from tools.registry import ToolRegistry

    work = tmp_path / "work"
    build_tiny_model(work / "tiny-model")
    shutil.copy(ROOT / "tests" / "fixtures" / "finetune" / "medical_cot.jsonl", work / "data.jsonl")
    monkeypatch.chdir(work)
    ctx = ToolContext(home=stackwise_home, user_id="alice", extras={"worker_gpu": None, "database_url": pg_url})
    reg = ToolRegistry.default(plugins=False)
    record = reg.call("launch_finetune", {"base_model": "./tiny-model", "dataset": "data.jsonl"}, ctx)
    assert record["ok"], record
    job_id = record["result"]["job_id"]
    assert not (stackwise_home / "jobs.sqlite").exists()
    with open_jobs(ctx) as jobs:
        assert jobs.dialect == "postgres" and jobs.get(job_id, owner="alice").status == "queued"
    status = reg.call("finetune_status", {"job_id": job_id}, ctx)
    assert status["ok"] and status["result"]["status"] == "queued", status
    with Worker(stackwise_home, backend=LocalBackend(), database_url=pg_url) as worker:
        claimed = worker.store.claim(worker.worker_id)
        assert claimed.id == job_id and claimed.spec["job_id"] == job_id and claimed.status == "running"
