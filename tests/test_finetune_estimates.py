"""The preflight's VRAM and speed estimates against what the H200 runs measured (evals/gpu/README.md)."""

from __future__ import annotations

import pytest
from shapes import QWEN_05B, QWEN_7B

from tools.finetune.preflight import count_params, estimate_vram, preflight
from tools.finetune.spec import FinetuneSpec

H200 = {"name": "NVIDIA H200", "memory_gb": 139}


@pytest.mark.parametrize(("config", "method", "liger", "dropout", "measured_gb"), [
    (QWEN_7B, "lora", True, 0.05, 65.1),   # through the worker, Liger on (the default from 3B parameters)
    (QWEN_7B, "lora", True, 0.0, 56.05),   # the data-parallel check's runs: no LoRA dropout (1 and 2 H200s)
    (QWEN_7B, "qlora", True, 0.05, 54.6),
    (QWEN_7B, "lora", False, 0.05, 76.27),  # the same job before Liger
    (QWEN_7B, "qlora", False, 0.05, 65.85),
    (QWEN_05B, "lora", False, 0.05, 14.60),  # below 3B parameters Liger stays off (it is slower there)
])
def test_vram_estimates_are_within_15_percent_of_the_measured_peaks(config, method, liger, dropout, measured_gb):
    params = count_params(config, method, 16, None)
    estimate = estimate_vram(params, method, 4, 2048, checkpointing=False, liger=liger,
                             lora_dropout=dropout)["total_gb"]
    assert abs(estimate - measured_gb) / measured_gb <= 0.15


@pytest.mark.parametrize(("config", "batch", "every", "measured_gb"), [
    (QWEN_7B, 4, 1, 49.09),    # speed bench, Liger + fused LoRA, dropout 0.05 (evals/gpu/README.md)
    (QWEN_7B, 4, 4, 41.02),    # the same with every 4th layer checkpointed
    (QWEN_05B, 8, 1, 16.17),
    (QWEN_05B, 4, 1, 8.86),    # through the worker (worker_check.py), batch 4
])
def test_fused_lora_vram_estimates_are_within_15_percent(config, batch, every, measured_gb):
    params = count_params(config, "lora", 16, None)
    estimate = estimate_vram(params, "lora", batch, 2048, checkpointing=every > 1, every=every, liger=True,
                             lora_dropout=0.05, fused_lora=True)
    assert estimate["fused_lora"] and abs(estimate["total_gb"] - measured_gb) / measured_gb <= 0.15
    assert estimate_vram(params, "qlora", batch, 2048, checkpointing=False, liger=True,
                         fused_lora=True)["fused_lora"] is False          # QLoRA keeps peft's layers


def test_the_preflight_assumes_the_speedups_exactly_where_the_worker_uses_them():
    rows = {"train": [{"prompt": "x" * 4000, "completion": "y" * 8000}] * 40, "eval": []}

    def report(config, gpu, **fields):
        spec = FinetuneSpec(base_model="m", dataset="d.jsonl", max_seq_len=2048, **{"batch_size": 4, **fields})
        return preflight(spec, rows, None, config, gpu)

    big = report(QWEN_7B, H200)
    assert big["vram"]["liger"] and big["vram"]["fused_lora"] and "fused LoRA" in big["time"]["basis"]
    measured_7b = 16_557            # speed bench, 7B LoRA, Liger + fused LoRA, 4 × 2048 (GPU-bound)
    assert abs(big["time"]["tokens_per_s"] - measured_7b) / measured_7b <= 0.15
    assert "host" not in big["time"]["basis"]
    # at the 0.5B shape the step waits on the host's kernel launches, so the estimate follows the batch size
    small = report(QWEN_05B, H200, batch_size=8)
    assert small["vram"]["liger"] and small["vram"]["fused_lora"]     # with the fused layer Liger pays at 0.5B
    assert "capped by the host" in small["time"]["basis"]
    measured_05b = 82_047           # the same at the 0.5B shape, 8 × 2048
    assert abs(small["time"]["tokens_per_s"] - measured_05b) / measured_05b <= 0.15
    worker_05b = 37_388             # through the worker (worker_check.py), 4 × 2048, 40 steps
    at_4 = report(QWEN_05B, H200)["time"]["tokens_per_s"]
    assert abs(at_4 - worker_05b) / worker_05b <= 0.15 and at_4 < small["time"]["tokens_per_s"] * 0.6
    qlora = report(QWEN_7B, H200, method="qlora")
    assert qlora["vram"]["liger"] and not qlora["vram"]["fused_lora"]
    assert qlora["time"]["tokens_per_s"] == pytest.approx(9_900 * 1.16 * 0.9, rel=0.02)    # Liger alone
    assert not report(QWEN_05B, H200, method="qlora")["vram"]["liger"]   # below 3B without the fused layer: off
    assert not report(QWEN_7B, None)["vram"]["liger"]                    # no GPU, no Liger, no fused layer
    assert not report(QWEN_7B, None)["vram"]["fused_lora"]
    unsloth = report(QWEN_7B, H200, engine="unsloth")["vram"]
    assert not unsloth["liger"] and not unsloth["fused_lora"]


def test_the_per_gpu_estimate_of_a_two_gpu_run_at_batch_2():
    params = count_params(QWEN_7B, "lora", 16, None)
    estimate = estimate_vram(params, "lora", 2, 2048, checkpointing=False, liger=True, lora_dropout=0.0)["total_gb"]
    assert abs(estimate - 35.59) / 35.59 <= 0.15       # each of 2 H200s, 2 × 2048 per GPU (evals/gpu/README.md)
