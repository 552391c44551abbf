"""The fastest a LoRA training step of a model shape can be on this GPU: its unavoidable matmuls and attention,
each timed alone at the step's shapes, summed.

A LoRA step cannot skip the frozen weights' work: every linear layer runs its forward matmul and, for the layers
below it to get a gradient, its input-gradient matmul (the weight gradient is skipped: the weights are frozen).
Attention runs its forward and backward. This script times exactly those, per decoder layer and for the LM head,
with cuBLAS (``torch.matmul``, bf16 in / fp32 accumulate) and with SDPA's backends, on M = batch × seq rows, and
adds them up: the step time if everything else (norms, RoPE, SwiGLU, the adapters' thin matmuls, the loss, the
optimizer, the host) were free. Its tokens/s is a ceiling no implementation in that precision can pass; the ratio
to it says how much of the rest is left to win.

It also times the same matmuls in FP8 (``torch._scaled_mm``, e4m3 × e4m3, one scale per tensor, bf16 out, the
weight pre-transposed as FP8 wants it) — the ceiling with FP8 frozen weights, quantisation of the activations not
counted.

    python3 evals/gpu/gemm_ceiling.py --out $OUT [--shapes 7b,0.5b] [--batch 4] [--seq 2048]

Prints one table per shape and writes ``OUT/gemm-ceiling-<shape>.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

SHAPES = {     # hidden, intermediate, layers, heads, kv heads, vocab (as evals/gpu/finetune_check.py builds them)
    "7b": {"hidden": 3584, "inter": 18944, "layers": 28, "heads": 28, "kv": 4, "vocab": 152064},
    "0.5b": {"hidden": 896, "inter": 4864, "layers": 24, "heads": 14, "kv": 2, "vocab": 151936},
}


def linear_shapes(shape: dict) -> list[tuple[str, int, int]]:
    """(name, in features, out features) of one decoder layer's linear layers."""
    h, inter, head_dim = shape["hidden"], shape["inter"], shape["hidden"] // shape["heads"]
    kv = shape["kv"] * head_dim
    return [("q", h, h), ("k", h, kv), ("v", h, kv), ("o", h, h), ("gate", h, inter), ("up", h, inter),
            ("down", inter, h)]


def timed(fn, reps: int) -> float:
    """Seconds per call of ``fn`` (CUDA events, after warm-up)."""
    import torch

    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


def matmul_times(m: int, k: int, n: int, reps: int) -> dict:
    """Forward (M×K · K×N) and input-gradient (M×N · N×K) seconds in bf16 and in FP8."""
    import torch

    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
    g = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    out = {"bf16_forward": timed(lambda: x @ w.t(), reps), "bf16_input_grad": timed(lambda: g @ w, reps)}
    fp8 = torch.float8_e4m3fn
    one = torch.ones((), device="cuda")
    x8, g8 = x.to(fp8), g.to(fp8)
    w8 = w.to(fp8)                     # (N, K) row-major: .t() is the column-major K × N the forward wants
    w8t = w.t().contiguous().to(fp8)   # (K, N) row-major: .t() is the column-major N × K the input grad wants
    try:
        out["fp8_forward"] = timed(lambda: torch._scaled_mm(x8, w8.t(), one, one, out_dtype=torch.bfloat16), reps)
        out["fp8_input_grad"] = timed(lambda: torch._scaled_mm(g8, w8t.t(), one, one, out_dtype=torch.bfloat16),
                                      reps)
    except (RuntimeError, AttributeError) as exc:     # no FP8 on this GPU
        out["fp8_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    return out


def attention_times(shape: dict, batch: int, seq: int, reps: int) -> dict:
    """Causal SDPA forward + backward seconds with each backend that runs at this shape."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    head_dim = shape["hidden"] // shape["heads"]
    q = torch.randn(batch, shape["heads"], seq, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(batch, shape["kv"], seq, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    grad = torch.randn(batch, shape["heads"], seq, head_dim, device="cuda", dtype=torch.bfloat16)
    times = {}
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        for gqa in (True, False):       # GQA as SDPA takes it, or K/V repeated to every head (transformers' way)
            def step(gqa=gqa):
                kk, vv = (k, v) if gqa else (k.repeat_interleave(shape["heads"] // shape["kv"], 1),
                                             v.repeat_interleave(shape["heads"] // shape["kv"], 1))
                F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=gqa).backward(grad)
            try:
                with sdpa_kernel(backend):
                    times[f"{name}{'_gqa' if gqa else ''}"] = timed(step, reps)
            except RuntimeError as exc:
                times[f"{name}{'_gqa' if gqa else ''}"] = f"{type(exc).__name__}: {str(exc)[:160]}"
    return times


def ceiling(name: str, batch: int, seq: int, reps: int) -> dict:
    """The shape's per-step matmul and attention times and the tokens/s they allow."""
    shape = SHAPES[name]
    rows = batch * seq
    layer = {lin: matmul_times(rows, k, n, reps) for lin, k, n in linear_shapes(shape)}
    head = matmul_times(rows, shape["hidden"], shape["vocab"], max(3, reps // 4))
    attention = attention_times(shape, batch, seq, reps)
    best_attention = min(v for v in attention.values() if isinstance(v, float))
    flops = {lin: 2 * rows * k * n for lin, k, n in linear_shapes(shape)}
    out = {"shape": name, "batch": batch, "seq": seq, "layers": shape["layers"], "per_layer": layer, "head": head,
           "attention": attention}
    for precision in ("bf16", "fp8"):
        if any(f"{precision}_forward" not in t for t in [*layer.values(), head]):
            continue
        linear = sum(t[f"{precision}_forward"] + t[f"{precision}_input_grad"] for t in layer.values())
        step = shape["layers"] * (linear + best_attention) + head[f"{precision}_forward"] + \
            head[f"{precision}_input_grad"]
        matmul_flops = 2 * (shape["layers"] * sum(flops.values()) + 2 * rows * shape["hidden"] * shape["vocab"])
        out[precision] = {"step_s": step, "tokens_per_s": rows / step,
                          "linear_tflops": matmul_flops / (step - shape["layers"] * best_attention) / 1e12,
                          "attention_share": shape["layers"] * best_attention / step}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--shapes", default="7b,0.5b")
    parser.add_argument("--batch", type=int, default=None, help="rows per step (default: 4 at 7B, 8 at 0.5B)")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gemm_ceiling.py needs a CUDA GPU", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    big = matmul_times(8192, 8192, 8192, args.reps)
    print(f"{torch.cuda.get_device_name(0)}: 8192³ matmul bf16 {2 * 8192 ** 3 / big['bf16_forward'] / 1e12:.0f} "
          f"TFLOP/s" + (f", fp8 {2 * 8192 ** 3 / big['fp8_forward'] / 1e12:.0f}" if "fp8_forward" in big else ""))
    for name in args.shapes.split(","):
        batch = args.batch or (4 if name == "7b" else 8)
        result = ceiling(name, batch, args.seq, args.reps)
        result["square_8192"] = big
        (out / f"gemm-ceiling-{name}.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
        print(f"\n{name}, {batch} × {args.seq} tokens per step; ms per step (all layers)")
        print(f"{'linear':<8} {'bf16 fwd':>9} {'bf16 dx':>9} {'TFLOP/s':>8} {'fp8 fwd':>9} {'fp8 dx':>9}")
        rows = batch * args.seq
        for lin, k, n in [*linear_shapes(SHAPES[name]), ("head", SHAPES[name]["hidden"], SHAPES[name]["vocab"])]:
            t = result["head"] if lin == "head" else result["per_layer"][lin]
            times = 1 if lin == "head" else SHAPES[name]["layers"]
            tflops = 4 * rows * k * n / (t["bf16_forward"] + t["bf16_input_grad"]) / 1e12
            fp8 = (f"{t['fp8_forward'] * times * 1e3:>9.1f} {t['fp8_input_grad'] * times * 1e3:>9.1f}"
                   if "fp8_forward" in t else "")
            print(f"{lin:<8} {t['bf16_forward'] * times * 1e3:>9.1f} {t['bf16_input_grad'] * times * 1e3:>9.1f} "
                  f"{tflops:>8.0f} {fp8}")
        for backend, t in result["attention"].items():
            text = f"{t * SHAPES[name]['layers'] * 1e3:.1f}" if isinstance(t, float) else t
            print(f"attention {backend:<14} fwd+bwd {text}")
        for precision in ("bf16", "fp8"):
            if precision in result:
                r = result[precision]
                print(f"{precision} ceiling: {r['step_s'] * 1e3:.1f} ms/step → {r['tokens_per_s']:,.0f} tokens/s "
                      f"(matmuls at {r['linear_tflops']:.0f} TFLOP/s; attention {r['attention_share']:.0%} of it)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
