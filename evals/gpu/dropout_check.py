"""Check of the fused LoRA layer's dropout on the GPU (the Triton kernel of ``tools/finetune/fused_lora.py``):
the mask is kept with probability 1 - p, the same seed draws the same mask, and one layer's output and its
gradients (input, A, B) equal plain autograd arithmetic with that very mask — i.e. the backward redraws the
forward's mask. On CPU it checks the PyTorch path the same way (a dry run).

    python3 evals/gpu/dropout_check.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> int:
    import torch

    from tools.finetune import fused_lora

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    p, seed = 0.1, 1234
    ones = torch.ones(4096, 1024, device=device, dtype=dtype)
    drawn = fused_lora._dropped(ones, p, seed)
    kept = drawn != 0
    checks = {
        "kernel": "triton" if cuda and fused_lora._triton_kernel() else "pytorch",
        "kept share (expect 0.900)": round(float(kept.float().mean()), 4),
        "kept values = 1/(1-p)": bool(torch.allclose(drawn[kept].float(), torch.tensor(1 / (1 - p), device=device),
                                                     rtol=1e-2)),
        "same seed, same mask": bool(torch.equal(drawn, fused_lora._dropped(ones, p, seed))),
        "other seed, other mask": not torch.equal(drawn, fused_lora._dropped(ones, p, seed + 1)),
    }
    torch.manual_seed(0)
    base = torch.nn.Linear(1024, 768, bias=True, device=device, dtype=dtype).requires_grad_(False)
    a = (torch.randn(16, 1024, device=device) / 32).requires_grad_(True)
    b = (torch.randn(768, 16, device=device) / 4).requires_grad_(True)
    x = torch.randn(2, 2048, 1024, device=device, dtype=dtype, requires_grad=True)
    seeds = []
    original = fused_lora._dropped

    def recording(rows, p_, seed_, accumulate=None):
        seeds.append(seed_)
        return original(rows, p_, seed_, accumulate)

    fused_lora._dropped = recording
    try:
        fn = fused_lora._make_function()
        out = fn.apply(x, a, b, base, 2.0, p, dtype)
        upstream = torch.randn_like(out)
        (out.float() * upstream.float()).sum().backward()
    finally:
        fused_lora._dropped = original
    checks["one seed for forward and backward"] = len(set(seeds)) == 1 and len(seeds) == 3
    mask = (original(torch.ones(4096, 1024, device=device, dtype=dtype), p, seeds[0]) != 0).reshape(x.shape)
    rx, ra, rb = (t.detach().clone().requires_grad_(True) for t in (x, a, b))
    dropped = rx.float() * mask / (1 - p)
    reference = base(rx).float() + 2.0 * (dropped @ ra.t()) @ rb.t()
    (reference * upstream.float()).sum().backward()

    def rel(u, v) -> float:
        u, v = u.detach().float(), v.detach().float()
        return float((u - v).norm() / v.norm())

    tol = 2e-2 if cuda else 1e-5
    for name, got, want in (("output", out, reference), ("input grad", x.grad, rx.grad), ("A grad", a.grad, ra.grad),
                            ("B grad", b.grad, rb.grad)):
        checks[f"{name} vs autograd with the mask (rel err)"] = f"{rel(got, want):.2e} " + \
            ("ok" if rel(got, want) < tol else "WRONG")
    for key, value in checks.items():
        print(f"{key:<45} {value}")
    failed = [k for k, v in checks.items() if v is False or (isinstance(v, str) and v.endswith("WRONG"))]
    print("dropout check:", "FAILED " + ", ".join(failed) if failed else "passed")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
