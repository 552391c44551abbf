"""Host (CPU) time per adapted layer and per kernel launch, at shapes so small that the GPU waits on the host:
what bounds the 0.5B step when the H200 outruns Python. Compares peft's LoRA layer with the fused one (with and
without the thin-matmul kernels) over a stack of 64 layers, and single launches (a PyTorch matmul, the Triton
dropout kernel).

    python3 evals/gpu/host_overhead.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

LAYERS, WIDTH, TOKENS, REPS = 64, 64, 16, 50


def per_call_us(fn, reps: int = REPS) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / reps * 1e6


def stack(dropout: float):
    import torch
    from peft import LoraConfig, inject_adapter_in_model

    model = torch.nn.Sequential(*(torch.nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(LAYERS)))
    model = inject_adapter_in_model(LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout,
                                               target_modules=[str(i) for i in range(LAYERS)]), model)
    model = model.to("cuda", torch.bfloat16)
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
        if "lora_" in name:
            param.data = param.data.float()
    return model.train()


def main() -> int:
    import torch

    from tools.finetune import fused_lora, lora_kernels

    if not torch.cuda.is_available():
        print("needs a GPU")
        return 0
    x = torch.randn(TOKENS, WIDTH, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    rows = {"matmul (PyTorch launch)": lambda: x.detach() @ x.detach().t(),
            "Triton dropout launch": lambda: lora_kernels.dropout(x.detach(), 0.05, 7)}
    for name, fn in rows.items():
        print(f"{name:<40} {per_call_us(fn, 500):8.1f} µs per call")
    for dropout in (0.0, 0.05):
        for variant in ("peft", "fused", "fused+kernels"):
            model = stack(dropout)
            state = fused_lora.enable(model, kernels=variant.endswith("kernels")) if variant != "peft" else None

            def step(model=model):
                model(x).float().sum().backward()

            us = per_call_us(step) / LAYERS
            print(f"layer fwd+bwd, dropout {dropout:<4} {variant:<14} {us:8.1f} µs per layer", flush=True)
            fused_lora.restore(state)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
