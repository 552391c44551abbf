"""FP8 matmuls for the frozen LoRA base weights (tools/finetune/fp8.py), checked on CPU: PyTorch's scaled
matmul runs there too, so the numbers, the autograd and the switch-on/switch-back can be tested here; the speed
is measured on the H200 (evals/gpu/speed_bench.py)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
if not hasattr(torch, "_scaled_mm") or not hasattr(torch, "float8_e4m3fn"):
    pytest.skip("this PyTorch has no FP8 matmul", allow_module_level=True)

from runs import speed_run, tiny_lora_model  # noqa: E402

from tools.finetune import fp8  # noqa: E402
from tools.finetune.speed import Speedups, fp8_callback, speedups  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*is deprecated and will be removed in v6:FutureWarning")


def rel(a, b) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def test_row_quantisation_keeps_three_mantissa_bits():
    x = torch.randn(37, 64, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 3, 37)[:, None]
    x[5] = 0.0
    values, scale = fp8.quantize_rows(x)
    assert values.dtype == torch.float8_e4m3fn and scale.shape == (37, 1)
    back = values.float() * scale
    assert torch.all(back[5] == 0)
    big = x.abs() > x.abs().amax(dim=1, keepdim=True) / 64          # away from the subnormal range
    assert torch.all((back - x).abs()[big] <= x.abs()[big] / 16 + 1e-12)  # e4m3: half an ulp = 1/16 relative
    assert rel(back, x) < 0.04


def test_fp8_linear_forward_and_input_gradient_match_the_plain_matmul():
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(48, 64, generator=g) / 8
    bias = torch.randn(48, generator=g)
    x = torch.randn(3, 7, 64, generator=g, requires_grad=True)    # 21 rows: padded to 32 inside
    ref_x = x.detach().clone().requires_grad_(True)
    reference = torch.nn.functional.linear(ref_x, weight, bias)
    weight_q, weight_scale = fp8.quantize_rows(weight)
    out = fp8.fp8_linear(x, weight_q, weight_scale, bias)
    assert out.shape == reference.shape == (3, 7, 48)
    assert rel(out, reference) < 0.05
    upstream = torch.randn(3, 7, 48, generator=g)
    (out * upstream).sum().backward()
    (reference * upstream).sum().backward()
    assert x.grad.shape == ref_x.grad.shape and rel(x.grad, ref_x.grad) < 0.05


def test_switching_a_lora_model_to_fp8_and_back(tiny):
    model = tiny_lora_model(tiny)
    ids = torch.randint(3, 200, (2, 20), generator=torch.Generator().manual_seed(2))
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}

    def step():
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    logits, grads = step()
    state = fp8.enable(model, offload=True)          # on CPU nothing is offloaded
    layers, skipped = fp8.frozen_base_layers(model)
    assert len(state) == len(layers) == 14 and skipped == 0 and not state.host   # 7 linear layers × 2 decoder layers
    fp8_logits, fp8_grads = step()
    assert not torch.equal(fp8_logits, logits)                  # the FP8 path really ran
    assert rel(fp8_logits, logits) < 0.05
    for name, grad in grads.items():                             # only the adapters get gradients, close to fp32's
        cos = torch.nn.functional.cosine_similarity(fp8_grads[name].flatten(), grad.flatten(), dim=0)
        assert cos > 0.98, (name, float(cos))
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    fp8.restore(state)
    assert all("_stackwise_fp8" not in layer.__dict__ and "forward" not in layer.__dict__ for layer in layers)
    again, _ = step()
    torch.testing.assert_close(again, logits, rtol=0, atol=0)    # the plain forward again, bit for bit
    for name, weight in model.named_parameters():
        assert torch.equal(weight.detach(), weights[name]) or weight.requires_grad


def test_the_switch_is_skipped_with_a_reason_where_it_cannot_apply():
    assert speedups({"fp8": True}).fp8 and not speedups().fp8
    for method, cuda, reason in (("qlora", True, "already 4-bit"), ("full", True, "trains the weights"),
                                 ("lora", False, "needs a CUDA GPU")):
        speed = Speedups(fp8=True)
        assert fp8_callback(speed, method, cuda=cuda) is None
        assert reason in speed.skipped["fp8"]
    assert fp8_callback(Speedups(), "lora", cuda=True) is None      # not asked for


def test_a_run_with_fp8_trains_close_to_the_plain_run_and_saves_the_real_weights(tiny, tmp_path, monkeypatch):
    """The whole trainer path with the switch on (the GPU check patched away): the loss follows the plain run's,
    and the adapter saved after training loads onto the untouched base."""
    losses = {}
    monkeypatch.setattr(fp8, "supported", lambda cuda: None)
    for name, speed in (("plain", {}), ("fp8", {"fp8": True})):
        outcome, summary, losses[name] = speed_run(tmp_path / name, tiny, speed)
        assert ("fp8" in summary["speed"]["applied"]) == (name == "fp8")
        layers, _ = fp8.frozen_base_layers(outcome.model)
        assert all("_stackwise_fp8" not in layer.__dict__ for layer in layers)    # switched back before saving
    assert len(losses["fp8"]) == len(losses["plain"]) >= 12
    assert losses["fp8"][-1] < losses["fp8"][0]                             # it learns
    assert abs(losses["fp8"][-1] - losses["plain"][-1]) / losses["plain"][-1] < 0.02
