"""Gradient checkpointing on only the layers memory needs: the preflight picks the fewest checkpointed layers
that fit the GPU, the trainer checkpoints exactly those, and the gradients do not change."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from runs import tiny_lora_model
from shapes import QWEN_7B

from tools.finetune.preflight import (
    checkpointed_layers,
    count_params,
    estimate_vram,
    lightest_checkpointing,
    preflight,
    tokens_per_second,
)
from tools.finetune.spec import FinetuneSpec

H200 = {"name": "NVIDIA H200", "memory_gb": 139}
# peft 0.21 still calls transformers' renamed ``is_gradient_checkpointing``.
pytestmark = pytest.mark.filterwarnings("ignore:.*is deprecated and will be removed in v6:FutureWarning")


def test_every_nth_layer_counts():
    assert [checkpointed_layers(28, n) for n in (1, 2, 3, 14, 28, 100)] == [28, 14, 10, 2, 1, 1]


def test_partial_estimates_lie_between_none_and_all():
    params = count_params(QWEN_7B, "lora", 16, None)
    terms = {"liger": True, "lora_dropout": 0.0}
    none = estimate_vram(params, "lora", 4, 2048, checkpointing=False, **terms)
    every = [estimate_vram(params, "lora", 4, 2048, checkpointing=True, every=n, **terms) for n in (1, 2, 4, 28)]
    totals = [e["total_gb"] for e in every]
    assert totals == sorted(totals) and totals[-1] < none["total_gb"]      # fewer checkpointed layers, more memory
    assert every[0]["k_activation_bytes"] == 4 and every[0]["checkpointed_layers"] == 28
    assert every[1]["checkpointed_layers"] == 14 and every[1]["checkpoint_every"] == 2
    # half the layers keep their 51 B per token (Liger, no dropout), half only their 4 B input
    assert every[1]["activations_gb"] == pytest.approx(4 * 2048 * 3584 * 14 * (51 + 4) / 2**30, abs=1e-3)
    assert none["checkpoint_every"] is None and none["checkpointed_layers"] == 0


def test_the_lightest_setting_that_fits_is_chosen():
    params = count_params(QWEN_7B, "lora", 16, None)
    terms = {"liger": True, "lora_dropout": 0.0}
    none = estimate_vram(params, "lora", 4, 2048, checkpointing=False, **terms)["total_gb"]
    everything = estimate_vram(params, "lora", 4, 2048, checkpointing=True, **terms)["total_gb"]
    chosen = []
    for budget in (none - 1, (none + everything) / 2, everything + 0.5):
        pick = lightest_checkpointing(params, "lora", 4, 2048, budget, **terms)
        assert pick["total_gb"] <= budget
        if pick["checkpoint_every"] < 28:     # one layer sparser would not have fitted
            sparser = estimate_vram(params, "lora", 4, 2048, checkpointing=True, every=pick["checkpoint_every"] + 1,
                                    **terms)
            assert sparser["checkpointed_layers"] == pick["checkpointed_layers"] or sparser["total_gb"] > budget
        chosen.append(pick["checkpointed_layers"])
    assert chosen[0] < chosen[1] < chosen[2] <= 28       # less memory, more layers checkpointed
    # nothing fits: every layer checkpointed (the smallest footprint, for the error message)
    assert lightest_checkpointing(params, "lora", 4, 2048, 1.0, **terms)["checkpointed_layers"] == 28


def test_speed_estimate_pays_only_for_the_recomputed_layers():
    p = 7_615_616_512
    plain = tokens_per_second(p, "lora", H200, checkpointing=False)
    assert tokens_per_second(p, "lora", H200, checkpointing=True) == pytest.approx(plain * 7.0 / 9.9, rel=1e-6)
    half = tokens_per_second(p, "lora", H200, checkpointing=0.5)
    assert plain * 7.0 / 9.9 < half < plain


def test_preflight_checkpoints_only_what_the_gpu_needs():
    rows = {"train": [{"prompt": "x" * 4000, "completion": "y" * 8000}] * 200,
            "eval": [{"prompt": "a", "completion": "b"}] * 10}
    spec = FinetuneSpec(base_model="m", dataset="d.jsonl", method="lora", batch_size=4, max_seq_len=2048,
                        lora_dropout=0.0)
    report = preflight(spec, rows, None, QWEN_7B, {"name": "NVIDIA A100-SXM4-40GB", "memory_gb": 40})
    vram = report["vram"]
    assert report["fits"] and report["gradient_checkpointing"] and report["recompute_mlp"]
    assert 0 < vram["checkpointed_layers"] < 28 and vram["total_gb"] <= 40 * 0.95
    assert vram["without_checkpointing_gb"] > 40 * 0.95 > vram["total_gb"] > vram["with_checkpointing_gb"]
    # the same without recompute_mlp would have needed more checkpointed layers
    params = count_params(QWEN_7B, "lora", 16, None)
    plain_ckpt = lightest_checkpointing(params, "lora", 4, 2048, 40 * 0.95, liger=True, lora_dropout=0.0,
                                        fused_lora=True)
    assert plain_ckpt["checkpointed_layers"] > vram["checkpointed_layers"]
    roomy = preflight(spec, rows, None, QWEN_7B, H200)
    assert not roomy["gradient_checkpointing"] and roomy["vram"]["checkpointed_layers"] == 0
    assert not roomy["recompute_mlp"]
    assert report["time"]["tokens_per_s"] < roomy["time"]["tokens_per_s"]


def test_recomputing_the_mlp_comes_before_checkpointing_any_layer():
    """7B LoRA at 4 × 2048 on a 48 GB card: 48.9 GiB as it is, 40.8 GiB when every SwiGLU MLP computes its down
    projection's input again (measured 49.1 → 41.3 GiB on the H200) — so no layer is checkpointed, and the speed
    estimate pays 1.5 % for it. Without the fused LoRA layer (QLoRA) nothing changes."""
    rows = {"train": [{"prompt": "x" * 4000, "completion": "y" * 8000}] * 200, "eval": []}
    spec = FinetuneSpec(base_model="m", dataset="d.jsonl", method="lora", batch_size=4, max_seq_len=2048,
                        lora_dropout=0.0)
    card = {"name": "NVIDIA RTX 6000 Ada", "memory_gb": 48}
    report = preflight(spec, rows, None, QWEN_7B, card)
    vram = report["vram"]
    assert report["fits"] and report["recompute_mlp"] and not report["gradient_checkpointing"]
    assert vram["without_checkpointing_gb"] > 48 * 0.95 >= vram["total_gb"]
    assert vram["k_activation_bytes"] == pytest.approx(42 - 2 * 18944 / 3584, abs=0.01)
    roomy = preflight(spec, rows, None, QWEN_7B, {**card, "memory_gb": 96})
    assert not roomy["recompute_mlp"]
    assert report["time"]["tokens_per_s"] == pytest.approx(roomy["time"]["tokens_per_s"] * 0.985, rel=1e-3)
    assert "recomputing" in report["time"]["basis"] and "recomputing" not in roomy["time"]["basis"]
    from tools.finetune.declare import preflight_lines

    shown = [preflight_lines(r, lang)[key] for r in (report, roomy) for lang, key in (("en", "VRAM"), ("zh", "显存"))]
    assert "the MLPs recomputing their down projection's input; fits on NVIDIA RTX 6000 Ada" in shown[0]
    assert "重算 down_proj" in shown[1] and not any("recomput" in x or "重算" in x for x in shown[2:])
    params = count_params(QWEN_7B, "lora", 16, ["q_proj", "v_proj"])       # no adapted down projection
    assert params["recomputable_width"] == 0 and count_params(QWEN_7B, "lora", 16, None)["recomputable_width"] == 18944
    qlora = preflight(spec.model_copy(update={"method": "qlora"}), rows, None, QWEN_7B, card)
    assert not qlora["recompute_mlp"] and not qlora["vram"]["recompute_mlp"]


# ---- the trainer's side ---------------------------------------------------------------------------------

torch = pytest.importorskip("torch")
pytest.importorskip("peft")


@pytest.fixture(scope="module")
def tiny4(tmp_path_factory) -> Path:
    from tools.finetune.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny4", layers=4)


def grads_and_calls(model, ids):
    """LoRA gradients of one step, and how often each decoder layer's MLP ran (twice when recomputed: the layer's
    own hooks stay outside the checkpoint, its submodules' run again)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    calls = [0] * len(layers)
    hooks = [layer.mlp.register_forward_pre_hook(lambda *_a, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, layer in enumerate(layers)]
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    for hook in hooks:
        hook.remove()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return grads, calls


def test_partial_checkpointing_recomputes_only_its_layers_with_the_same_gradients(tiny4):
    from tools.finetune.train_config import PartialCheckpointing

    ids = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(1))
    reference, calls = grads_and_calls(tiny_lora_model(tiny4), ids)
    assert calls == [1, 1, 1, 1]

    model = tiny_lora_model(tiny4)
    model.base_model.model.activation_checkpointing_enable({"use_reentrant": False})   # as the Trainer does
    assert PartialCheckpointing(2).apply(model) == (2, 4)
    grads, calls = grads_and_calls(model, ids)
    assert calls == [2, 1, 2, 1]          # layers 0 and 2 recomputed in the backward, 1 and 3 kept
    assert grads.keys() == reference.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference[name], rtol=1e-5, atol=1e-7, msg=name)


def test_a_run_checkpoints_the_layers_its_spec_names(tiny4, tmp_path):
    from tools.finetune.tiny import write_pattern_run
    from tools.finetune.train import run

    run_dir = write_pattern_run(tmp_path / "run", tiny4, max_steps=2, batch_size=2)
    spec = json.loads((run_dir / "spec.json").read_text())
    (run_dir / "spec.json").write_text(json.dumps({**spec, "gradient_checkpointing": True, "checkpoint_every": 3}))
    outcome = run(run_dir)
    assert outcome.code == 0, outcome.summary
    log = (run_dir / "train.log").read_text()
    assert "gradient checkpointing on 2 of 4 layers (every 3)" in log
    flags = [m.gradient_checkpointing for m in outcome.model.modules()
             if type(m).__name__.endswith("DecoderLayer")]
    assert flags == [True, False, False, True]


@pytest.mark.parametrize("value", [0, -2, 2.5, "2", True])
def test_a_bad_checkpoint_every_is_a_clear_error(tiny4, tmp_path, value):
    from tools.finetune.tiny import write_pattern_run
    from tools.finetune.train import run

    run_dir = write_pattern_run(tmp_path / "run", tiny4, max_steps=1)
    spec = json.loads((run_dir / "spec.json").read_text())
    (run_dir / "spec.json").write_text(json.dumps({**spec, "gradient_checkpointing": True, "checkpoint_every": value}))
    outcome = run(run_dir)
    assert outcome.code != 0 and "checkpoint_every must be a whole number" in outcome.summary["error"]
