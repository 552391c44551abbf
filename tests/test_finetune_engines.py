"""The training engine choice: stackwise's own path or unsloth (which needs a CUDA GPU, so on this machine the
asked-for unsloth falls back with a notice; the call into unsloth's API is checked with a stand-in module)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")

from tools.finetune.engines import choose_engine, load_unsloth  # noqa: E402
from tools.finetune.spec import FinetuneSpec  # noqa: E402
from tools.finetune.tiny import build_tiny_model  # noqa: E402
from tools.finetune.train import run  # noqa: E402
from tools.finetune.train_setup import Device, Job  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*is deprecated and will be removed in v6:FutureWarning")


def test_auto_uses_unsloth_only_where_it_can_run_and_asked_for_it_falls_back_with_the_reason():
    ok = {"cuda": True, "processes": 1, "model_type": "qwen2", "installed": True}
    assert choose_engine("auto", **ok).used == "unsloth"
    assert choose_engine("unsloth", **ok).to_dict() == {"requested": "unsloth", "used": "unsloth", "notice": None}
    assert choose_engine("transformers", **ok).used == "transformers"
    for change, reason in (({"installed": False}, "not installed on the worker"),
                           ({"cuda": False}, "needs a CUDA GPU"),
                           ({"processes": 2}, "data-parallel on 2 GPUs"),
                           ({"model_type": "gpt2"}, "does not support the model family 'gpt2'")):
        quiet = choose_engine("auto", **{**ok, **change})
        assert quiet.used == "transformers" and quiet.notice is None
        loud = choose_engine("unsloth", **{**ok, **change})
        assert loud.used == "transformers" and reason in loud.notice and "stackwise's own path" in loud.notice


def test_engine_unsloth_on_a_cpu_worker_trains_with_our_path_and_says_why(tmp_path):
    model = build_tiny_model(tmp_path / "tiny")
    run_dir = tmp_path / "run"
    (run_dir / "data").mkdir(parents=True)
    rows = [{"prompt": f"Q{i}? ", "completion": f"A{i % 3}", "question": f"Q{i}?", "reference": f"A{i % 3}"}
            for i in range(8)]
    (run_dir / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {"base_model": "tiny", "dataset": "d.jsonl", "method": "lora", "lora_rank": 4, "batch_size": 4,
            "max_seq_len": 64, "max_steps": 2, "engine": "unsloth"}
    (run_dir / "spec.json").write_text(json.dumps({**spec, "base_model_path": str(model), "job_id": "ft-1"}))
    outcome = run(run_dir)
    assert outcome.code == 0, outcome.summary
    engine = json.loads((run_dir / "summary.json").read_text())["engine"]
    assert engine["requested"] == "unsloth" and engine["used"] == "transformers"
    assert "unsloth" in engine["notice"]
    assert "engine: unsloth" in (run_dir / "train.log").read_text()


def test_the_unsloth_loader_passes_the_spec_to_fast_language_model(tmp_path, monkeypatch):
    calls = {}

    class FastLanguageModel:
        @staticmethod
        def from_pretrained(**kwargs):
            calls["load"] = kwargs
            return "base-model", types.SimpleNamespace(pad_token=None, eos_token="</s>")

        @staticmethod
        def get_peft_model(model, **kwargs):
            calls["peft"] = (model, kwargs)
            return "peft-model"

    monkeypatch.setitem(sys.modules, "unsloth", types.SimpleNamespace(FastLanguageModel=FastLanguageModel))
    spec = FinetuneSpec(base_model="m", dataset="d.jsonl", method="qlora", lora_rank=8, lora_dropout=0.0, seed=3)
    job = Job(spec=spec, base_model_path=Path("/models/qwen"), job_id="ft-1", gradient_checkpointing=True,
              train_rows=[])
    model, tokenizer = load_unsloth(job, Device(cuda=True, bf16=True), max_seq_len=2048)
    assert model == "peft-model" and tokenizer.pad_token == "</s>"
    load = calls["load"]
    assert load["model_name"] == "/models/qwen" and load["load_in_4bit"] and not load["full_finetuning"]
    assert load["max_seq_length"] == 2048 and load["dtype"] == torch.bfloat16 and load["local_files_only"]
    base, peft = calls["peft"]
    assert base == "base-model" and peft["r"] == 8 and peft["lora_alpha"] == 16 and peft["random_state"] == 3
    assert peft["use_gradient_checkpointing"] == "unsloth" and "down_proj" in peft["target_modules"]


def test_unsloth_is_imported_first_only_for_a_run_that_will_use_it(tmp_path, monkeypatch):
    from tools.finetune import engines

    model = build_tiny_model(tmp_path / "tiny")
    run_dir = tmp_path / "run"
    run_dir.mkdir()

    def spec(engine: str) -> list[str]:
        (run_dir / "spec.json").write_text(json.dumps({"engine": engine, "base_model_path": str(model)}))
        return [str(run_dir), "--resume"]

    asked = []
    real_choice = engines.choose_engine

    def choose(requested, **facts):
        asked.append(facts)
        return real_choice(requested, **facts)

    monkeypatch.setitem(sys.modules, "unsloth", types.SimpleNamespace())     # what `import unsloth` would bind
    monkeypatch.setattr(engines, "unsloth_installed", lambda: True)
    monkeypatch.setattr(engines, "choose_engine", choose)
    assert not engines.preload_for_run(spec("transformers")) and not asked     # never even considered
    assert not engines.preload_for_run(spec("unsloth"))                        # this machine has no CUDA
    assert asked[-1]["model_type"] == "llama" and asked[-1]["processes"] == 1 and not asked[-1]["cuda"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert engines.preload_for_run(spec("auto"))                                # a GPU: unsloth goes first
    monkeypatch.setattr(engines, "unsloth_installed", lambda: False)
    assert not engines.preload_for_run(spec("unsloth"))
    assert not engines.preload_for_run([str(tmp_path / "missing")]) and not engines.preload_for_run([])


def test_with_unsloth_our_kernels_step_aside_and_the_summary_says_so(monkeypatch):
    from tools.finetune import engines, train_setup
    from tools.finetune.speed import choose

    monkeypatch.setattr(engines, "load_unsloth", lambda job, device, max_seq_len: ("model", "tok"))
    spec = FinetuneSpec(base_model="m", dataset="d.jsonl", method="lora")
    job = Job(spec=spec, base_model_path=Path("/models/qwen"), job_id="ft-1", gradient_checkpointing=False,
              train_rows=[])
    job.speed = choose(None, total_params=7_615_616_512)
    job.speed.applied.append("liger")
    assert job.speed.liger and job.speed.fused_lora
    assert train_setup._load_unsloth(job, Device(cuda=True, bf16=True)) == ("model", "tok")
    assert not job.speed.liger and not job.speed.fused_lora and job.speed.applied == []
    assert "unsloth" in job.speed.skipped["liger"] and "unsloth" in job.speed.skipped["fused_lora"]
