"""The training entry point (``python -m tools.finetune.train RUN``) on a tiny local model, on CPU.

Runs write prepared rows themselves (the contract's prompt/completion/question/reference), so
these tests do not depend on the data-preparation module. LoRA, full and failure runs happen
in-process (one import of torch/transformers/trl); cancel and resume go through the real CLI.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from runs import write_run

torch = pytest.importorskip("torch")
pytest.importorskip("trl")
pytest.importorskip("peft")

from tools.finetune.train import main, run  # noqa: E402
from tools.finetune.train_config import plan_schedule  # noqa: E402

# peft 0.21 still calls transformers' renamed ``is_gradient_checkpointing`` when loading an adapter.
pytestmark = pytest.mark.filterwarnings("ignore:.*is deprecated and will be removed in v6:FutureWarning")
ROOT = Path(__file__).resolve().parents[1]
PROGRESS_KEYS = {"time", "step", "total", "epoch", "loss", "eval_loss", "lr", "tokens_per_s", "eta_s", "gpu_mem_gb"}
SUMMARY_KEYS = {"status", "speed", "steps", "total_steps", "final_loss", "eval_loss", "train_seconds", "tokens_per_s",
                "peak_gpu_mem_gb", "trainable_params", "total_params", "error", "artifacts", "gpus", "global_batch",
                "engine", "evaluation", "tracking"}


def make_run(root: Path, model: Path, *, rows: int = 40, eval_rows: int = 4, **spec) -> Path:
    """A run directory per the contract: spec.json and prepared data/train.jsonl, data/eval.jsonl."""
    write_run(root / "run", model, rows=rows, eval_rows=eval_rows, **spec)
    return root / "run"


def read_progress(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "progress.jsonl").read_text().splitlines()]


def read_summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits.float()


def sample_ids(tiny: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    text = tok.apply_chat_template([{"role": "user", "content": "Say dog twice."}], tokenize=False,
                                   add_generation_prompt=True) + "dog dog"
    return tok(text, return_tensors="pt")["input_ids"]


def cli(run_dir: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "tools.finetune.train", str(run_dir), *extra], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_lora_run_learns_and_writes_the_contract_files(tiny, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir = make_run(tmp_path, tiny, max_steps=30)
    outcome = run(run_dir)
    assert outcome.code == 0, outcome.summary

    lines = read_progress(run_dir)
    assert 10 <= len(lines) <= 51
    assert all(set(line) == PROGRESS_KEYS for line in lines)
    assert [line["step"] for line in lines] == sorted({line["step"] for line in lines})
    assert lines[0]["step"] == 1 and lines[-1]["step"] == 30
    assert {line["total"] for line in lines} == {30}
    assert all(line["gpu_mem_gb"] is None for line in lines)  # CPU
    assert all(line["tokens_per_s"] > 0 and line["lr"] > 0 and line["eta_s"] >= 0 for line in lines)
    assert lines[-1]["eval_loss"] is not None and lines[-1]["eta_s"] == 0
    assert lines[-1]["loss"] < lines[0]["loss"] * 0.95, (lines[0]["loss"], lines[-1]["loss"])
    evals = [line["eval_loss"] for line in lines if line["eval_loss"] is not None]
    assert len(evals) >= 3 and evals[-1] < evals[0]

    summary = read_summary(run_dir)
    assert set(summary) == SUMMARY_KEYS
    assert summary["status"] == "succeeded" and summary["error"] is None
    assert summary["steps"] == summary["total_steps"] == 30
    assert summary["final_loss"] == lines[-1]["loss"] and summary["eval_loss"] == lines[-1]["eval_loss"]
    assert 0 < summary["trainable_params"] < summary["total_params"]
    assert summary["tokens_per_s"] > 0 and summary["train_seconds"] > 0 and summary["peak_gpu_mem_gb"] is None
    assert summary["speed"] == {"liger": False, "fused_adamw": False, "fp8": False, "compile": False,
                                "fused_lora": False, "cuda_graphs": False, "recompute_mlp": False, "applied": [],
                                "skipped": {}}                                         # CPU: no default speed-up
    assert summary["artifacts"] == {"adapter": str(run_dir / "adapter"), "merged": None,
                                    "comparison": str(run_dir / "comparison.json")}
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").glob("checkpoint-*"))
    assert len(checkpoints) == 2 and "checkpoint-30" in checkpoints  # keeps the last two
    assert "train.log" in os.listdir(run_dir) and not (run_dir / "merged").exists()

    comparison = json.loads((run_dir / "comparison.json").read_text())
    assert len(comparison) == 3
    assert all(set(row) == {"question", "reference", "before", "after"} for row in comparison)
    assert comparison[0]["question"] == "Say red twice." and comparison[0]["reference"] == "red red"

    # The saved adapter, loaded back onto the base, is the model that was trained.
    ids = sample_ids(tiny)
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny), run_dir / "adapter")
    torch.testing.assert_close(logits(reloaded, ids), logits(outcome.model, ids), atol=1e-5, rtol=1e-5)
    base = AutoModelForCausalLM.from_pretrained(tiny)
    assert not torch.allclose(logits(base, ids), logits(reloaded, ids), atol=1e-3)


def test_full_finetune_with_checkpointing_saves_the_whole_model(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    run_dir = make_run(tmp_path, tiny, method="full", max_steps=3, merge=True)
    spec = json.loads((run_dir / "spec.json").read_text())  # the launcher's preflight asked for checkpointing
    (run_dir / "spec.json").write_text(json.dumps({**spec, "preflight": {"gradient_checkpointing": True}}))
    outcome = run(run_dir)
    assert outcome.code == 0, outcome.summary
    assert any(getattr(m, "gradient_checkpointing", False) for m in outcome.model.modules())
    summary = read_summary(run_dir)
    assert summary["steps"] == 3 and summary["trainable_params"] == summary["total_params"] > 0
    assert summary["artifacts"]["merged"] is None  # nothing to merge: adapter/ holds the model
    ids = sample_ids(tiny)
    saved = AutoModelForCausalLM.from_pretrained(run_dir / "adapter")
    torch.testing.assert_close(logits(saved, ids), logits(outcome.model, ids), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits(AutoModelForCausalLM.from_pretrained(tiny), ids), logits(saved, ids), atol=1e-3)
    assert len(json.loads((run_dir / "comparison.json").read_text())) == 3


def test_qlora_without_a_gpu_fails_before_loading(tiny, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    run_dir = make_run(tmp_path, tiny, method="qlora")
    assert main([str(run_dir)]) == 1
    summary = read_summary(run_dir)
    assert summary["status"] == "failed" and "QLoRA needs a CUDA GPU" in summary["error"]
    err = capsys.readouterr().err
    assert "QLoRA needs a CUDA GPU" in err and "Traceback" not in err
    assert not (run_dir / "progress.jsonl").exists() and not (run_dir / "checkpoints").exists()


@pytest.mark.parametrize(("breakage", "message"), [
    ("not json", "spec.json is not valid JSON"),
    ("bad field", "lora_rank"),
    ("unknown field", "lora_rnak"),
    ("no base model", "base model not found"),
    ("no data", "missing prepared data"),
    ("bad row", "train.jsonl line 2 needs string fields"),
])
def test_broken_run_directory_fails_with_one_clear_line(tiny, tmp_path, capsys, breakage, message):
    run_dir = make_run(tmp_path, tiny, rows=3, eval_rows=0)
    spec = json.loads((run_dir / "spec.json").read_text())
    if breakage == "not json":
        (run_dir / "spec.json").write_text('{"base_model": "tiny", ')
    elif breakage == "bad field":
        (run_dir / "spec.json").write_text(json.dumps({**spec, "lora_rank": 0}))
    elif breakage == "unknown field":
        (run_dir / "spec.json").write_text(json.dumps({**spec, "lora_rnak": 8}))
    elif breakage == "no base model":
        (run_dir / "spec.json").write_text(json.dumps({**spec, "base_model_path": str(tmp_path / "nope")}))
    elif breakage == "no data":
        (run_dir / "data" / "train.jsonl").unlink()
    else:
        first = (run_dir / "data" / "train.jsonl").read_text().splitlines()[0]
        (run_dir / "data" / "train.jsonl").write_text(first + '\n{"prompt": "only a prompt"}\n')
    assert main([str(run_dir)]) == 1
    summary = read_summary(run_dir)
    assert summary["status"] == "failed" and message in summary["error"] and "\n" not in summary["error"]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_unexpected_error_keeps_the_traceback_in_the_log(tiny, tmp_path, capsys, monkeypatch):
    import tools.finetune.train as train

    def boom(job, device):
        raise ZeroDivisionError("kaboom")

    monkeypatch.setattr(train, "load_model", boom)
    run_dir = make_run(tmp_path, tiny, rows=3, eval_rows=0)
    assert main([str(run_dir)]) == 1
    summary = read_summary(run_dir)
    assert summary["status"] == "failed" and summary["error"].startswith("internal error: ZeroDivisionError: kaboom")
    err = capsys.readouterr().err
    assert "Traceback" not in err and sum("kaboom" in line for line in err.splitlines()) == 1
    log = (run_dir / "train.log").read_text()
    assert "Traceback (most recent call last)" in log and "ZeroDivisionError: kaboom" in log


def test_out_of_memory_is_an_expected_failure_with_a_hint(tiny, tmp_path, capsys, monkeypatch):
    import tools.finetune.train as train

    def oom(job, device):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(train, "load_model", oom)
    run_dir = make_run(tmp_path, tiny, rows=3, eval_rows=0)
    assert main([str(run_dir)]) == 1
    error = read_summary(run_dir)["error"]
    assert error.startswith("out of memory: CUDA out of memory") and "batch_size" in error
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Traceback" not in (run_dir / "train.log").read_text()


def test_cancel_saves_a_checkpoint_and_resume_finishes_with_a_merged_model(tiny, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir = make_run(tmp_path, tiny, max_steps=60, merge=True)
    proc = cli(run_dir)
    progress = run_dir / "progress.jsonl"
    deadline = time.monotonic() + 120
    while not (progress.exists() and progress.read_text().strip()) and proc.poll() is None:
        assert time.monotonic() < deadline, "no progress line"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err
    summary = read_summary(run_dir)
    assert summary["status"] == "cancelled" and summary["error"] is None
    assert 1 <= summary["steps"] < 60 and summary["total_steps"] == 60
    assert (run_dir / "checkpoints" / f"checkpoint-{summary['steps']}").is_dir()
    assert "Traceback" not in err and not (run_dir / "adapter").exists()

    proc = cli(run_dir, "--resume")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "resuming from" in err
    summary = read_summary(run_dir)
    assert summary["status"] == "succeeded" and summary["steps"] == summary["total_steps"] == 60
    lines = read_progress(run_dir)
    assert {line["total"] for line in lines} == {60} and lines[-1]["step"] == 60
    steps = [line["step"] for line in lines]
    assert steps == sorted(set(steps))  # the resumed run continues, it does not start over
    assert summary["artifacts"]["merged"] == str(run_dir / "merged")

    # merged == base + adapter
    ids = sample_ids(tiny)
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "merged")
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny), run_dir / "adapter")
    torch.testing.assert_close(logits(merged, ids), logits(adapted, ids), atol=1e-4, rtol=0)
    assert (run_dir / "merged" / "tokenizer_config.json").exists()


def test_schedule_logs_about_fifty_times_and_checkpoints_every_tenth():
    s = plan_schedule(1000, batch_size=4, grad_accum=2, epochs=2, max_steps=None)
    assert s.total == 250 and s.logging_steps == 5 and s.save_steps == 25 and s.eval_steps % s.logging_steps == 0
    assert plan_schedule(10, batch_size=4, grad_accum=1, epochs=1, max_steps=None).total == 3
    big = plan_schedule(10, batch_size=1, grad_accum=1, epochs=1, max_steps=5000)
    assert big.total == 5000 and big.logging_steps == 100 and big.save_steps == 50


def test_speed_choices_follow_the_measured_defaults_and_say_why_not():
    from tools.finetune.speed import choose, flops_per_token, mfu, speedups

    assert choose(None, total_params=7_615_616_512).liger            # 1.13× measured at the 7B shape
    small = choose(None, total_params=494_032_768)                   # LoRA on a GPU: the fused layer, with Liger
    assert small.fused_lora and small.liger                          # (1.95× together at the 0.5B shape)
    assert not choose(None, total_params=494_032_768, method="qlora").liger     # Liger alone: 0.85× there, off
    on_cpu = choose(None, total_params=494_032_768, cuda=False)
    assert not on_cpu.fused_lora and not on_cpu.liger
    assert choose({"fused_lora": True}, total_params=1, cuda=False).fused_lora  # asked for: on, even on CPU
    assert not choose({"fused_lora": False}, total_params=494_032_768).liger
    assert not choose({"liger": False}, total_params=7_615_616_512).liger
    assert choose({"liger": True}, total_params=1).liger
    for bad, message in (({"turbo": True}, "unknown speed option"), ({"liger": "yes"}, "true or false")):
        with pytest.raises(ValueError, match=message):
            speedups(bad)
    qwen7b = {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
              "num_key_value_heads": 4, "vocab_size": 152064}
    per_token = flops_per_token(qwen7b, seq_len=2048, trainable=40_370_176, full=False)
    # 4 × 7.07e9 linear parameters (embeddings excluded) + 2 × adapters + attention ≈ 2.98e10 FLOPs per token
    assert 2.9e10 < per_token < 3.1e10
    assert mfu(10_000, per_token, "NVIDIA H200") == pytest.approx(10_000 * per_token / 989e12)
    assert mfu(10_000, per_token, "Some GPU") is None


def test_off_by_default_switches_reach_the_trainer_only_where_they_apply(tiny, tmp_path):
    from tools.finetune.rundir import RunPaths
    from tools.finetune.speed import speedups
    from tools.finetune.train_config import _speed_args
    from tools.finetune.train_setup import Device, Job, load_job

    assert not any((speedups().compile, speedups().fp8, speedups().fused_adamw))
    job: Job = load_job(RunPaths(make_run(tmp_path, tiny)))
    job.speed = speedups({"compile": True, "fused_adamw": True})
    gpu = _speed_args(job, Device(cuda=True, bf16=True))
    assert gpu["torch_compile"] is True and gpu["optim"] == "adamw_torch_fused"
    assert job.speed.applied == ["fused_adamw", "compile"]
    job.speed = speedups({"compile": True, "fused_adamw": True})
    cpu = _speed_args(job, Device(cuda=False, bf16=False))
    assert "torch_compile" not in cpu and cpu["optim"] == "adamw_torch"
    assert set(job.speed.skipped) == {"compile", "fused_adamw"} and not job.speed.applied
