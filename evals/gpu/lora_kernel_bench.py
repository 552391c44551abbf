"""Micro-benchmark of the LoRA-dropout kernels (tools/finetune/lora_kernels.py) at the real layer shapes: the flat
dropout kernel with PyTorch matmuls around it (the default fused path) against the three thin-matmul kernels,
per adapted layer's forward + backward share, for a few tile sizes. Prints µs per call and the memory-bound floor.

    python3 evals/gpu/lora_kernel_bench.py            # on a GPU
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

SHAPES = {"0.5b": (16384, (896, 4864)), "7b": (8192, (3584, 18944))}     # tokens per step, layer input widths
TILES = ((64, 64), (32, 64), (64, 128), (128, 64), (32, 128))


def timed(fn, *args, reps: int = 20) -> float:
    import torch

    fn(*args)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn(*args)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / reps


def main() -> int:
    import torch

    from tools.finetune import fused_lora, lora_kernels

    if not torch.cuda.is_available():
        print("needs a GPU")
        return 0
    p, seed, r = P, SEED, 16
    bandwidth = 4.0e12           # H200 HBM3e, bytes/s a streaming kernel reaches in practice
    print(f"{'shape':<6} {'K':>6} {'tile':>8} {'dropout':>9} {'flat fwd+bwd':>13} {'kernels fwd+bwd':>16} "
          f"{'floor':>7}   (µs)")
    for name, (m, widths) in SHAPES.items():
        for k in widths:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            a = torch.randn(r, k, device="cuda", dtype=torch.bfloat16) / 32
            gh = torch.randn(m, r, device="cuda", dtype=torch.bfloat16)
            dx = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            drop = timed(fused_lora._dropped, x, p, seed)
            flat_us = timed(flat, x, a, gh, dx)
            floor = (2 * m * k * 2 * 2 + m * k * 2 * 3) / bandwidth * 1e6     # three drop passes + dx read/write
            for tile in TILES:
                lora_kernels.BLOCK_M, lora_kernels.BLOCK_K = tile
                print(f"{name:<6} {k:>6} {tile[0]:>3}×{tile[1]:<4} {drop:>9.1f} {flat_us:>13.1f} "
                      f"{timed(in_kernels, x, a, gh, dx):>16.1f} {floor:>7.1f}", flush=True)
    return 0


P, SEED = 0.05, 1234


def flat(x, a, gh, dx):
    """The default fused path's dropout work for one layer: the flat kernel with PyTorch matmuls around it."""
    from tools.finetune import fused_lora

    _ = fused_lora._dropped(x, P, SEED) @ a.t()                  # forward h
    _ = gh.t() @ fused_lora._dropped(x, P, SEED)                 # A's gradient
    fused_lora._dropped(gh @ a, P, SEED, accumulate=dx)          # the input gradient's share


def in_kernels(x, a, gh, dx):
    """The same with the three thin-matmul kernels."""
    from tools.finetune import lora_kernels

    lora_kernels.thin_forward(x, a, P, SEED)
    lora_kernels.thin_grad_a(x, gh, P, SEED)
    lora_kernels.masked_accumulate(dx, gh, a, P, SEED)


if __name__ == "__main__":
    raise SystemExit(main())
