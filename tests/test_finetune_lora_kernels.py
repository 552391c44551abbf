"""The Triton LoRA-dropout kernels (tools/finetune/lora_kernels.py) against PyTorch arithmetic with the very mask
the flat dropout kernel draws — on CPU through Triton's interpreter, so only where Triton is installed (GPU
machines; the CPU CI has no Triton and skips this file)."""

from __future__ import annotations

import importlib.util
import os

import pytest

if importlib.util.find_spec("triton") is None:
    pytest.skip("Triton is not installed (it comes with CUDA builds of PyTorch)", allow_module_level=True)
torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    # Triton reads this as it is imported: its language functions must be the interpreter's
    os.environ["TRITON_INTERPRET"] = "1"
import triton  # noqa: E402,F401

from tools.finetune import fused_lora, lora_kernels  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_kernels(monkeypatch):
    monkeypatch.setattr(lora_kernels, "_KERNELS", None)          # built anew, under the interpreter on CPU
    monkeypatch.setattr(fused_lora, "_triton_dropout", None)
    yield


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def mask_of(shape, p: float, seed: int):
    """The flat kernel's mask (× 1/(1 - p)) for a tensor of ``shape``."""
    ones = torch.ones(shape, dtype=torch.float32, device=device())
    out = torch.empty_like(ones)
    kernel = fused_lora._triton_kernel()
    kernel[((ones.numel() + 1023) // 1024,)](ones, out, out, ones.numel(), p, 1.0 / (1.0 - p), seed,
                                              ACCUMULATE=False, BLOCK=1024)
    return out


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


# the interpreter multiplies fp32 exactly; a GPU's tl.dot takes fp32 inputs as TF32 (10-bit mantissa)
TOL = 1e-5 if not torch.cuda.is_available() else 5e-3


@pytest.mark.parametrize(("m", "k", "r"), [(200, 96, 16), (130, 70, 8), (64, 128, 32)])
def test_the_three_kernels_match_pytorch_with_the_same_mask(m, k, r):
    assert lora_kernels.kernels() is not None
    g = torch.Generator().manual_seed(m + k + r)
    p, seed = 0.25, 4321
    rows = torch.randn(m, k, generator=g).to(device())
    a = (torch.randn(r, k, generator=g) / 8).to(device())
    gh = torch.randn(m, r, generator=g).to(device())
    dx = torch.randn(m, k, generator=g).to(device())
    keep = mask_of((m, k), p, seed)
    assert 0.6 < float((keep != 0).float().mean()) < 0.9
    dropped = rows * keep
    h = lora_kernels.thin_forward(rows.contiguous(), a.contiguous(), p, seed)
    assert h.shape == (m, r) and rel(h, dropped @ a.t()) < TOL
    grad_a = lora_kernels.thin_grad_a(rows.contiguous(), gh.contiguous(), p, seed)
    assert grad_a.dtype == torch.float32 and grad_a.shape == (r, k) and rel(grad_a, gh.t() @ dropped) < TOL
    expected = dx + (gh @ a) * keep
    got = lora_kernels.masked_accumulate(dx.clone(), gh.contiguous(), a.contiguous(), p, seed)
    assert rel(got, expected) < TOL


def test_the_fused_layer_with_kernels_equals_the_one_without(monkeypatch):
    """The same LoRALinear step with the kernels on and off (the PyTorch path draws the flat kernel's mask)."""
    g = torch.Generator().manual_seed(0)
    base = torch.nn.Linear(96, 80).to(device()).requires_grad_(False)
    a0, b0 = torch.randn(16, 96, generator=g) / 8, torch.randn(80, 16, generator=g) / 4
    x0 = torch.randn(3, 50, 96, generator=g)
    upstream = torch.randn(3, 50, 80, generator=g).to(device())
    results, calls = [], []
    thin = lora_kernels.thin_forward
    monkeypatch.setattr(lora_kernels, "thin_forward", lambda *a: calls.append(1) or thin(*a))
    for kernels in (False, True):
        x = x0.clone().to(device()).requires_grad_(True)
        a, b = a0.clone().to(device()).requires_grad_(True), b0.clone().to(device()).requires_grad_(True)
        monkeypatch.setattr(fused_lora, "_dropped", wrap_on_device(fused_lora._dropped))
        torch.manual_seed(3)
        out = fused_lora._make_function().apply(x, a, b, base, 2.0, 0.3, torch.float32, False, kernels)
        (out * upstream).sum().backward()
        results.append((out.detach(), x.grad, a.grad, b.grad))
    assert calls == [1]                       # the kernels ran in the second pass only
    for plain, fused in zip(*results, strict=True):
        assert rel(fused, plain) < TOL


def wrap_on_device(dropped):
    """fused_lora._dropped on CPU takes the PyTorch generator's mask; here it must be the flat kernel's, as on a
    GPU, so that the two paths draw the same mask."""
    def flat(rows, p, seed, accumulate=None):
        if seed is None:
            return dropped(rows, p, seed, accumulate)
        result = rows * mask_of(rows.shape, p, seed).to(rows.dtype)
        return result if accumulate is None else accumulate.add_(result)
    return flat
