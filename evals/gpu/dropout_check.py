"""Check of the fused LoRA layer's dropout on the GPU (the Triton kernel of ``tools/finetune/fused_lora.py``):
the mask is kept with probability 1 - p, the same seed draws the same mask, and one layer's output and its
gradients (input, A, B) equal plain autograd arithmetic with that very mask — i.e. the backward redraws the
forward's mask; and a CUDA graph of the kernel with a seed read on the device draws a new mask per replay. On CPU
it checks the PyTorch path the same way (a dry run).

    python3 evals/gpu/dropout_check.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> int:
    import torch

    from tools.finetune import fused_lora, lora_kernels

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    p, seed = 0.1, 1234
    ones = torch.ones(4096, 1024, device=device, dtype=dtype)
    drawn = fused_lora._dropped(ones, p, seed)
    kept = drawn != 0
    checks = {
        "kernel": "triton" if cuda and lora_kernels.kernels() else "pytorch",
        "kept share (expect 0.900)": round(float(kept.float().mean()), 4),
        "kept values = 1/(1-p)": bool(torch.allclose(drawn[kept].float(), torch.tensor(1 / (1 - p), device=device),
                                                     rtol=1e-2)),
        "lanes of a Philox draw differ": not torch.equal(kept.reshape(-1, 8)[:, 0], kept.reshape(-1, 8)[:, 1]),
        "same seed, same mask": bool(torch.equal(drawn, fused_lora._dropped(ones, p, seed))),
        "other seed, other mask": not torch.equal(drawn, fused_lora._dropped(ones, p, seed + 1)),
    }
    torch.manual_seed(0)
    base = torch.nn.Linear(1024, 768, bias=True, device=device, dtype=dtype).requires_grad_(False)
    a0 = torch.randn(16, 1024, device=device) / 32
    b0 = torch.randn(768, 16, device=device) / 4
    x0 = torch.randn(2, 2048, 1024, device=device, dtype=dtype)
    upstream = torch.randn(2, 2048, 768, device=device, dtype=dtype)
    tol = 2e-2 if cuda else 1e-5

    def rel(u, v) -> float:
        u, v = u.detach().float(), v.detach().float()
        return float((u - v).norm() / v.norm())

    # the layer both ways: the thin-matmul kernels (the default on a GPU) and the flat kernel with matmuls
    for kernels in (True, False):
        label = "kernels" if kernels else "flat"
        x, a, b = (t.clone().requires_grad_(True) for t in (x0, a0, b0))
        rng = torch.get_rng_state()
        seed = int(torch.randint(0, 2**31 - 1, (), device="cpu"))      # the seed the layer will draw
        torch.set_rng_state(rng)
        out = fused_lora._make_function().apply(x, a, b, base, 2.0, p, dtype, False, kernels)
        (out.float() * upstream.float()).sum().backward()
        # the Triton mask wherever the layer ran Triton (also under Triton's interpreter on CPU)
        triton = cuda or (kernels and lora_kernels.usable(x0.reshape(-1, 1024), 16))
        ones = torch.ones(4096, 1024, device=device, dtype=dtype)
        mask = (lora_kernels.dropout(ones, p, seed) if triton else fused_lora._dropped(ones, p, seed)) != 0
        rx, ra, rb = (t.detach().clone().requires_grad_(True) for t in (x0, a0, b0))
        scale = lora_kernels.threshold_and_scale(p)[1] if triton else 1 / (1 - p)
        dropped = rx.float() * mask.reshape(x.shape) * scale
        reference = base(rx).float() + 2.0 * (dropped @ ra.t()) @ rb.t()
        (reference * upstream.float()).sum().backward()
        for name, got, want in (("output", out, reference), ("input grad", x.grad, rx.grad),
                                ("A grad", a.grad, ra.grad), ("B grad", b.grad, rb.grad)):
            checks[f"{label}: {name} vs autograd, same mask"] = f"{rel(got, want):.2e} " + \
                ("ok" if rel(got, want) < tol else "WRONG")
    if cuda and lora_kernels.kernels():
        checks.update(graph_replay_check(torch, lora_kernels, x0.reshape(-1, 1024), a0, p))
    for key, value in checks.items():
        print(f"{key:<45} {value}")
    failed = [k for k, v in checks.items() if v is False or (isinstance(v, str) and v.endswith("WRONG"))]
    print("dropout check:", "FAILED " + ", ".join(failed) if failed else "passed")
    return 1 if failed else 0


def graph_replay_check(torch, lora_kernels, rows, a, p: float) -> dict:
    """A CUDA graph of the thin forward kernel with a device seed (counter, 3): each replay draws the mask of the
    counter's value at that moment — what the graphed decoder layers rely on for a new mask per step."""
    counter = torch.tensor(77, dtype=torch.int64, device=rows.device)
    lora_kernels.thin_forward(rows, a, p, (counter, 3))              # compiled outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        h = lora_kernels.thin_forward(rows, a, p, (counter, 3))
    graph.replay()
    first = h.clone()
    counter.add_(5)
    graph.replay()
    return {"graph replay: mask of counter + offset": bool(torch.equal(first, lora_kernels.thin_forward(rows, a, p, 80))
                                                        and torch.equal(h, lora_kernels.thin_forward(rows, a, p, 85))),
            "graph replay: new counter, new mask": not torch.equal(first, h)}


if __name__ == "__main__":
    raise SystemExit(main())
