"""Experiment tracking through the real training entry point on a tiny model, on CPU: TensorBoard event files
always; a W&B offline run (named after the job, the spec as its config) and an MLflow run (file store) when
configured, both linked from summary.json, shown by ``finetune_status`` and ``stackwise jobs show``, and
continued when the job is resumed; a tracker that is missing or fails is dropped with a notice while the job
succeeds. Nothing here touches the network: W&B runs offline, MLflow writes files (or meets a closed loopback
port), telemetry is off, and W&B's service process is gone once training ends."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
from runs import write_run

torch = pytest.importorskip("torch")
pytest.importorskip("trl")
pytest.importorskip("peft")

from memory.jobs import JobStore  # noqa: E402
from tools.finetune.tracking import wanted_trackers  # noqa: E402
from tools.finetune.train import run  # noqa: E402

WORDS = ("red", "blue", "green")
TRACKER_ENV = ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DISABLED", "WANDB_PROJECT", "WANDB_RUN_ID", "WANDB_RESUME",
               "WANDB_ENTITY", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID",
               "DISABLE_MLFLOW_INTEGRATION", "TENSORBOARD_LOGGING_DIR")


@pytest.fixture
def quiet_trackers(tmp_path, monkeypatch) -> Path:
    """No tracker settings from the developer's shell; W&B's own folders and MLflow's telemetry kept local."""
    for var in TRACKER_ENV:
        monkeypatch.delenv(var, raising=False)
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("DO_NOT_TRACK", "true")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    return tmp_path


def make_run(root: Path, model: Path, job_id: str = "ft-1", **spec) -> Path:
    """A run directory per the contract (spec.json, prepared data/train.jsonl and data/eval.jsonl)."""
    write_run(root / job_id, model, rows=16, eval_rows=2, job_id=job_id, words=WORDS,
              **{"dataset": "words.jsonl", "max_steps": 4, **spec})
    return root / job_id


def wandb_records(path: Path) -> list:
    """The protobuf records of a W&B transaction log (``run-<id>.wandb``: a LevelDB-style log in 32 KiB blocks,
    each chunk behind a 7-byte header — checksum, length, type — after the file's own 7-byte header)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, head = path.read_bytes(), 32768, 7
    assert data[:4] == b":W&B"
    pos, records, parts = head, [], []
    while pos + head <= len(data):
        if block - pos % block < head:          # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + head:pos + head + length], pos + head + length
        if kind in (1, 2):                      # full, first
            parts = [chunk]
        elif kind in (3, 4):                    # middle, last
            parts.append(chunk)
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(b"".join(parts))
            records.append(record)
    return records


def scalars(folder: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return [(e.step, round(e.value, 5)) for e in events.Scalars(tag)], events


def wandb_children() -> list[str]:
    """This process's W&B service processes still alive (waiting briefly for them to exit)."""
    import psutil

    deadline = time.monotonic() + 10
    while True:
        alive = [p for p in psutil.Process().children(recursive=True) if "wandb" in " ".join(p.cmdline()).lower()]
        if not alive or time.monotonic() > deadline:
            return [" ".join(p.cmdline()) for p in alive]
        time.sleep(0.2)


def test_which_trackers_run_follows_the_environment():
    assert wanted_trackers({}) == ["tensorboard"]
    assert wanted_trackers({"WANDB_API_KEY": "k" * 40}) == ["tensorboard", "wandb"]
    assert wanted_trackers({"WANDB_MODE": "offline"}) == ["tensorboard", "wandb"]
    assert wanted_trackers({"WANDB_MODE": "online"}) == ["tensorboard"]          # no key: nowhere to send it
    assert wanted_trackers({"WANDB_MODE": "offline", "WANDB_DISABLED": "true"}) == ["tensorboard"]
    assert wanted_trackers({"WANDB_API_KEY": "k", "WANDB_MODE": "disabled"}) == ["tensorboard"]
    assert wanted_trackers({"MLFLOW_TRACKING_URI": "http://mlflow:5000"}) == ["tensorboard", "mlflow"]
    assert wanted_trackers({"MLFLOW_TRACKING_URI": "http://x", "DISABLE_MLFLOW_INTEGRATION": "TRUE"}) == \
        ["tensorboard"]


def test_tensorboard_wandb_and_mlflow_are_written_linked_shown_and_continued_on_resume(
        tiny, quiet_trackers, tmp_path, monkeypatch, stackwise_home, capsys):
    import mlflow

    mlruns = tmp_path / "mlruns"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlruns.as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")     # mlflow 3 asks for this to use a plain folder
    run_dir = make_run(tmp_path / "jobs", tiny)

    outcome = run(run_dir)
    assert outcome.code == 0, outcome.summary
    summary = json.loads((run_dir / "summary.json").read_text())
    tracking = summary["tracking"]
    assert set(tracking) == {"tensorboard", "wandb", "mlflow"}          # nothing skipped

    # TensorBoard: readable event files with the train loss of every logged step.
    board = Path(tracking["tensorboard"]["dir"])
    assert board == run_dir / "tensorboard" and tracking["tensorboard"]["command"] == f"tensorboard --logdir {board}"
    progress = [json.loads(line) for line in (run_dir / "progress.jsonl").read_text().splitlines()]
    losses, events = scalars(board, "train/loss")
    assert losses == [(p["step"], round(p["loss"], 5)) for p in progress] and len(losses) == 4
    assert "eval/loss" in events.Tags()["scalars"]
    [spec_text] = events.Tensors("stackwise/spec/text_summary")
    assert '"lora_rank": 8' in spec_text.tensor_proto.string_val[0].decode()

    # W&B offline: a run folder inside RUN, named after the job, the spec as its config, the losses logged.
    wandb = tracking["wandb"]
    folder = Path(wandb["dir"])
    assert (wandb["mode"], wandb["project"], wandb["name"], wandb["url"]) == ("offline", "stackwise", "ft-1", None)
    assert folder.parent == run_dir / "wandb" and folder.name.startswith("offline-run-")
    assert wandb["sync"] == f"wandb sync {folder}"
    [log_file] = folder.glob(f"run-{wandb['run_id']}.wandb")
    records = wandb_records(log_file)
    [started] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (started.display_name, started.project, started.run_id) == ("ft-1", "stackwise", wandb["run_id"])
    config = {item.key: json.loads(item.value_json) for r in records if r.WhichOneof("record_type") in ("run", "config")
              for item in (r.run.config if r.WhichOneof("record_type") == "run" else r.config).update}
    assert config["job_id"] == "ft-1"
    assert config["spec"]["method"] == "lora" and config["spec"]["lora_rank"] == 8
    assert config["spec"]["dataset"] == "words.jsonl" and config["spec"]["max_steps"] == 4
    logged = [json.loads(item.value_json) for r in records if r.WhichOneof("record_type") == "history"
              for item in r.history.item if "train/loss" in (item.key, "/".join(item.nested_key))]
    assert [round(v, 5) for v in logged] == [loss for _, loss in losses]
    assert wandb_children() == []                      # W&B's service process ended with the training

    # MLflow: a finished run named after the job, the spec as params, the loss as a metric.
    client = mlflow.MlflowClient(tracking_uri=mlruns.as_uri())
    record = client.get_run(tracking["mlflow"]["run_id"])
    assert tracking["mlflow"]["uri"] == mlruns.as_uri() and tracking["mlflow"]["experiment"] == "stackwise"
    assert (record.info.run_name, record.info.status) == ("ft-1", "FINISHED")
    assert record.data.params["spec.method"] == "lora" and record.data.params["spec.lora_rank"] == "8"
    assert record.data.params["spec.base_model"] == "tiny-llama" and record.data.tags["stackwise.job_id"] == "ft-1"
    history = client.get_metric_history(record.info.run_id, "loss")
    assert [(m.step, round(m.value, 5)) for m in history] == losses

    # The job's record links the runs: `finetune_status` and `stackwise jobs show` show them.
    from bots.cli import main
    from tools.registry import ToolRegistry

    with JobStore.for_home(stackwise_home) as store:
        job = store.create("alice", {"base_model": "tiny-llama", "dataset": "words.jsonl", "method": "lora"},
                           {}, run_dir)
        store.claim("w1")
        store.finish(job.id, "succeeded", summary=summary, artifacts=summary["artifacts"])
    capsys.readouterr()                                # what training printed
    assert main(["tool", "finetune_status", "--args", json.dumps({"job_id": job.id}), "--json",
                 "--user", "alice"]) == 0
    result = json.loads(capsys.readouterr().out)["result"]
    text = ToolRegistry.default(plugins=False).get("finetune_status").render(result, "en")
    assert f"TensorBoard: `tensorboard --logdir {board}`" in text
    assert f"W&B (offline): {folder}; upload it with `wandb sync {folder}`" in text
    assert f"MLflow: {mlruns.as_uri()} (run {record.info.run_id})" in text
    assert "训练曲线" in ToolRegistry.default(plugins=False).get("finetune_status").render(result, "zh")
    assert main(["jobs", "show", job.id, "--user", "alice"]) == 0
    shown = capsys.readouterr().out
    assert f"tracking  TensorBoard: tensorboard --logdir {board}" in shown
    assert f"W&B (offline): {folder}  upload: wandb sync {folder}" in shown
    assert f"MLflow: {mlruns.as_uri()}  run {record.info.run_id}" in shown
    assert main(["jobs", "show", job.id, "--user", "alice", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["summary"]["tracking"] == tracking

    # Resumed, the job continues the same W&B and MLflow runs (the final checkpoint: nothing left to train).
    again = run(run_dir, resume=True)
    assert again.code == 0, again.summary
    tracking_again = json.loads((run_dir / "summary.json").read_text())["tracking"]
    assert tracking_again["wandb"]["run_id"] == wandb["run_id"]
    assert tracking_again["mlflow"]["run_id"] == record.info.run_id
    sessions = sorted((run_dir / "wandb").glob(f"offline-run-*-{wandb['run_id']}"))
    assert len(sessions) == 2 and tracking_again["wandb"]["sync"] == "wandb sync " + " ".join(map(str, sessions))
    assert client.get_run(record.info.run_id).info.status == "FINISHED"
    assert [r.info.run_id for r in client.search_runs([record.info.experiment_id])] == [record.info.run_id]
    assert wandb_children() == []


def test_a_tracker_that_is_missing_or_fails_is_skipped_with_a_notice_and_the_job_succeeds(
        tiny, quiet_trackers, tmp_path, monkeypatch):
    import socket

    from transformers.integrations import TensorBoardCallback

    with socket.socket() as sock:          # a loopback port nobody listens on: the MLflow server is down
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setitem(sys.modules, "wandb", None)          # wandb is not installed on this worker

    def full_disk(self, args, state, control, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(TensorBoardCallback, "on_save", full_disk)   # TensorBoard fails mid-run
    run_dir = make_run(tmp_path / "jobs", tiny)
    outcome = run(run_dir)

    assert outcome.code == 0, outcome.summary
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "succeeded" and summary["error"] is None
    tracking = summary["tracking"]
    assert set(tracking) == {"tensorboard", "skipped"}      # TensorBoard ran (until it failed), the others did not
    skipped = tracking["skipped"]
    assert set(skipped) == {"wandb", "mlflow", "tensorboard"}
    assert skipped["wandb"] == "the wandb package is not installed on this worker: `pip install wandb` there"
    assert skipped["mlflow"].startswith("could not start: ") and str(port) in skipped["mlflow"]
    assert skipped["tensorboard"] == "stopped (on_save): OSError: [Errno 28] No space left on device"
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert not (run_dir / "wandb").exists()
    log = (run_dir / "train.log").read_text()
    for name in ("wandb", "mlflow", "tensorboard"):
        [notice] = [line for line in log.splitlines() if f"tracking: {name} skipped — " in line]
        assert skipped[name] in notice


def test_a_plain_folder_mlflow_store_without_its_opt_in_says_how_to_allow_it(tiny, quiet_trackers, tmp_path,
                                                                            monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    run_dir = make_run(tmp_path / "jobs", tiny, max_steps=1)
    outcome = run(run_dir)
    assert outcome.code == 0, outcome.summary
    assert "MLFLOW_ALLOW_FILE_STORE=true" in outcome.summary["tracking"]["skipped"]["mlflow"]


def test_disabled_trackers_do_not_run(tiny, quiet_trackers, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DISABLED", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("DISABLE_MLFLOW_INTEGRATION", "TRUE")
    run_dir = make_run(tmp_path / "jobs", tiny, max_steps=1)
    outcome = run(run_dir)
    assert outcome.code == 0, outcome.summary
    assert set(outcome.summary["tracking"]) == {"tensorboard"}
    assert not (run_dir / "wandb").exists() and not (tmp_path / "mlruns").exists()


def test_a_fresh_start_of_a_run_directory_does_not_mix_in_the_curves_of_an_earlier_try(tiny, quiet_trackers,
                                                                                       tmp_path):
    run_dir = make_run(tmp_path / "jobs", tiny, max_steps=2)
    assert run(run_dir).code == 0
    assert run(run_dir).code == 0                          # not resumed: starts over
    losses, _ = scalars(run_dir / "tensorboard", "train/loss")
    assert [step for step, _ in losses] == [1, 2]


def test_a_running_job_points_at_its_live_tensorboard_folder(tmp_path):
    from tools.finetune.status import tracking_text

    running = {"job_id": "ft-3", "status": "running", "run_dir": str(tmp_path), "summary": None}
    assert tracking_text(running, False) == ""                       # nothing logged yet
    live = tmp_path / "tensorboard"
    live.mkdir()
    assert tracking_text(running, False) == f"\nTracking:\n- TensorBoard: `tensorboard --logdir {live}`"
