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
    yield


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def mask_of(shape, p: float, seed: int):
    """The flat kernel's mask (× the kept values' scale) for a tensor of ``shape``."""
    return lora_kernels.dropout(torch.ones(shape, dtype=torch.float32, device=device()), p, seed)


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


# the interpreter multiplies fp32 exactly; a GPU's tl.dot takes fp32 inputs as TF32 (10-bit mantissa)
TOL = 1e-5 if not torch.cuda.is_available() else 5e-3


@pytest.mark.parametrize(("m", "k", "r"), [(200, 96, 16), (130, 72, 8), (64, 128, 32)])
def test_the_three_kernels_match_pytorch_with_the_same_mask(m, k, r):
    assert lora_kernels.kernels() is not None
    assert lora_kernels.usable(torch.empty(m, k, device=device()), r)
    assert not lora_kernels.usable(torch.empty(m, k - 2, device=device()), r)    # rows must hold whole groups
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
    # the LoRA scaling s rides along as a factor (the layer's kernel path passes it instead of scaling B)
    scaled = lora_kernels.thin_grad_a(rows.contiguous(), gh.contiguous(), p, seed, factor=2.5)
    assert rel(scaled, 2.5 * (gh.t() @ dropped)) < TOL
    got = lora_kernels.masked_accumulate(dx.clone(), gh.contiguous(), a.contiguous(), p, seed, factor=2.5)
    assert rel(got, dx + 2.5 * (gh @ a) * keep) < TOL


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


def test_the_flat_mask_is_a_function_of_seed_and_index():
    """Eight elements per Philox draw, 16 bits each: the kept share is 1 - p (p rounded to 2⁻¹⁶), kept values
    carry the matching scale, the same seed draws the same mask whatever the tensor's shape, another seed
    another one, and the accumulate mode adds exactly the dropped-out values."""
    p, seed = 0.1, 77
    threshold, scale = lora_kernels.threshold_and_scale(p)
    assert threshold == 6554 and abs(scale - 65536 / (65536 - 6554)) < 1e-12
    flat = mask_of((1 << 16,), p, seed)
    kept = flat != 0
    assert abs(float(kept.float().mean()) - 0.9) < 0.01
    assert torch.allclose(flat[kept], torch.tensor(scale, device=device()))
    assert torch.equal(mask_of((256, 256), p, seed).reshape(-1), flat)          # the index decides, not the shape
    assert not torch.equal(mask_of((1 << 16,), p, seed + 1), flat)
    # the lanes of one group are not copies of each other (each has its own 16 bits)
    lanes = kept.reshape(-1, 8).float()
    assert 0.8 < float(lanes[:, 0].mean()) < 1.0 and not torch.equal(lanes[:, 0], lanes[:, 1])
    rows = torch.randn(1000, 24, device=device())          # 24 000 elements: not a multiple of the block
    acc = torch.randn(1000, 24, device=device())
    expected = acc + rows * mask_of(rows.shape, p, seed)
    assert torch.allclose(lora_kernels.dropout(rows, p, seed, accumulate=acc), expected)


def test_a_seed_read_on_the_device_draws_the_mask_of_that_seed():
    """A ``(counter, offset)`` seed (the fused layer's device seeds, for CUDA graphs) is read as counter + offset
    when the kernel runs: every kernel gives what the plain seed of that value gives, and moving the counter
    moves the mask without a new launch argument."""
    m, k, r, p = 96, 64, 16, 0.2
    g = torch.Generator().manual_seed(1)
    rows, a = torch.randn(m, k, generator=g).to(device()), (torch.randn(r, k, generator=g) / 8).to(device())
    gh, dx = torch.randn(m, r, generator=g).to(device()), torch.randn(m, k, generator=g).to(device())
    counter = torch.tensor(1000, dtype=torch.int64, device=device())
    for value in (1007, 1010):
        seed = (counter, 7)
        assert torch.equal(lora_kernels.dropout(rows, p, seed), lora_kernels.dropout(rows, p, value))
        assert torch.equal(lora_kernels.thin_forward(rows, a, p, seed), lora_kernels.thin_forward(rows, a, p, value))
        assert torch.equal(lora_kernels.thin_grad_a(rows, gh, p, seed, factor=2.0),
                           lora_kernels.thin_grad_a(rows, gh, p, value, factor=2.0))
        assert torch.equal(lora_kernels.masked_accumulate(dx.clone(), gh, a, p, seed),
                           lora_kernels.masked_accumulate(dx.clone(), gh, a, p, value))
        counter.add_(3)
    assert not torch.equal(lora_kernels.dropout(rows, p, 1007), lora_kernels.dropout(rows, p, 1010))
