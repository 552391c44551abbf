"""FP8 matmuls for the frozen base weights of a LoRA fine-tune (opt-in: ``"speed": {"fp8": true}``).

In LoRA training the base model's linear layers never change, yet they carry almost all of the step's FLOPs:
the forward (2·P per token) and the gradient with respect to their input (another 2·P). Both run here as
FP8 (e4m3) matmuls through PyTorch's own scaled matmul (``torch._scaled_mm``; H100/H200 run it at about twice
the bf16 rate), with row-wise scales:

- the weight is quantised **once**, per output channel (``W ≈ diag(s_w) · W_q``), when training starts — a
  frozen weight needs no per-step re-quantisation, which is what general FP8 training recipes spend on it;
- each step's input is quantised per row (token): ``y = (x_q · s_x) @ (W_q · s_w)ᵀ``;
- the backward folds ``s_w`` into the incoming gradient before quantising it per row, so the same ``W_q`` (read
  transposed) serves ``dx = (g · s_wᵀ) @ W_q``; no weight gradient is computed (the weight is frozen);
- the LoRA adapters, norms, attention, the LM head and the loss stay in bf16/fp32.

On a GPU the bf16 weights go to (pinned) host memory while FP8 copies train, so the frozen weights take 1 byte
per parameter instead of 2; :func:`restore` puts them back (bit for bit) before the adapter is saved, compared,
evaluated or merged. This is not numerically the same as bf16 (e4m3 keeps 3 mantissa bits), so it is off by
default; ``evals/gpu/speed_bench.py`` measures its speed and loss against the plain baseline.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial

log = logging.getLogger("stackwise.train")

E4M3_MAX = 448.0        # largest finite float8_e4m3fn
ROW_MULTIPLE = 16       # the CUDA FP8 matmul wants every dimension a multiple of 16 (rows are padded)


def supported(cuda: bool) -> str | None:
    """Why FP8 cannot run here (``None`` when it can): it needs PyTorch's FP8 matmul on a GPU of compute
    capability 8.9 or newer (Ada, Hopper, Blackwell)."""
    import torch

    if not hasattr(torch, "_scaled_mm") or not hasattr(torch, "float8_e4m3fn"):
        return "this PyTorch has no FP8 matmul"
    if not cuda:
        return "needs a CUDA GPU"
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        return f"needs a GPU of compute capability 8.9 or newer (this one is {major}.{minor})"
    return None


def quantize_rows(x):
    """``x`` (M, K) → (e4m3 values, fp32 scales (M, 1)) with ``x ≈ values · scales``; an all-zero row gets a tiny
    scale (its values stay 0)."""
    import torch

    scale = x.detach().abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / E4M3_MAX
    values = (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return values, scale


_quantize = quantize_rows   # on a GPU, torch.compile makes it one fused kernel (see _compile_quantizer)


def _compile_quantizer(device) -> str:
    """Fuse :func:`quantize_rows` (abs, row max, scale, clamp, cast: five passes over the activation in eager
    mode) into one kernel with ``torch.compile``; eager when compiling fails or ``STACKWISE_FP8_COMPILE=0``."""
    global _quantize
    import os

    import torch

    if os.environ.get("STACKWISE_FP8_COMPILE", "1") == "0":
        _quantize = quantize_rows
        return "eager (STACKWISE_FP8_COMPILE=0)"
    try:
        compiled = torch.compile(quantize_rows, dynamic=True)
        compiled(torch.randn(48, 64, device=device, dtype=torch.bfloat16))     # compile now, not mid-step
    except Exception as exc:  # noqa: BLE001 - any compiler failure leaves the eager kernels, which work
        log.warning("fp8: could not compile the quantiser (%s: %s); using eager kernels", type(exc).__name__,
                    " ".join(str(exc).split())[:200])
        _quantize = quantize_rows
        return "eager"
    _quantize = compiled
    return "compiled"


def _pad_rows(x, multiple: int = ROW_MULTIPLE):
    import torch

    extra = (-x.shape[0]) % multiple
    return x if extra == 0 else torch.cat([x, x.new_zeros(extra, x.shape[1])])


def forward_matmul(rows, weight_q, weight_scale, out_dtype):
    """``rows @ Wᵀ`` (rows: (M, K)) with the frozen FP8 weight ``W = diag(weight_scale) · weight_q``."""
    import torch

    values, scale = _quantize(_pad_rows(rows))
    return torch._scaled_mm(values, weight_q.t(), scale_a=scale, scale_b=weight_scale.t(),
                            out_dtype=out_dtype)[: rows.shape[0]]


def input_grad_matmul(grad, weight_q, weight_scale, out_dtype):
    """``grad @ W`` (grad: (M, N)), the gradient for the input of :func:`forward_matmul`: ``s_w`` is folded
    into the incoming gradient before it is quantised per row, so the same ``weight_q`` serves."""
    import torch

    values, scale = _quantize(_pad_rows(grad.float() * weight_scale.t()))
    ones = torch.ones(1, weight_q.shape[1], dtype=torch.float32, device=grad.device)
    # (N, K) read column-major: the transposed copy of this one layer's weight, made for this product only
    return torch._scaled_mm(values, weight_q.t().contiguous().t(), scale_a=scale, scale_b=ones,
                            out_dtype=out_dtype)[: grad.shape[0]]


def _make_matmul():
    import torch

    class FrozenFP8Matmul(torch.autograd.Function):
        """``x @ Wᵀ`` with ``W = diag(weight_scale) · weight_q`` frozen; gradient for ``x`` only."""

        @staticmethod
        def forward(ctx, x, weight_q, weight_scale):
            out = forward_matmul(x.reshape(-1, x.shape[-1]), weight_q, weight_scale, x.dtype)
            ctx.save_for_backward(weight_q, weight_scale)
            return out.reshape(*x.shape[:-1], weight_q.shape[0])

        @staticmethod
        def backward(ctx, grad):
            weight_q, weight_scale = ctx.saved_tensors
            dx = input_grad_matmul(grad.reshape(-1, grad.shape[-1]), weight_q, weight_scale, grad.dtype)
            return dx.reshape(*grad.shape[:-1], weight_q.shape[1]), None, None

    return FrozenFP8Matmul


_MATMUL = None


def fp8_linear(x, weight_q, weight_scale, bias=None):
    """The frozen linear layer in FP8 (see the module docstring); ``bias`` (bf16) is added after the matmul."""
    global _MATMUL
    if _MATMUL is None:
        _MATMUL = _make_matmul()
    out = _MATMUL.apply(x, weight_q, weight_scale)
    return out if bias is None else out + bias.to(out.dtype)


def _forward(layer, x):
    weight_q, weight_scale = layer._stackwise_fp8
    return fp8_linear(x.to(layer._stackwise_dtype), weight_q, weight_scale, layer.bias)


@dataclass
class FP8Layers:
    """The base layers switched to FP8, and their bf16 weights while they are away on the host."""

    layers: list = field(default_factory=list)
    host: list = field(default_factory=list)      # (layer, device) of weights moved to host memory
    skipped: int = 0                              # adapted layers left alone (quantised, odd shapes)

    def __len__(self) -> int:
        return len(self.layers)


def frozen_base_layers(model):
    """The plain ``nn.Linear`` base layers under the model's LoRA adapters (QLoRA's 4-bit layers and layers whose
    sizes the FP8 matmul cannot take are not included; the second value counts them)."""
    import torch.nn as nn
    from peft.tuners.lora import LoraLayer

    found, skipped = [], 0
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        base = module.get_base_layer()
        if (type(base) is nn.Linear and not base.weight.requires_grad
                and base.in_features % ROW_MULTIPLE == 0 and base.out_features % ROW_MULTIPLE == 0):
            found.append(base)
        else:
            skipped += 1
    return found, skipped


def enable(model, *, offload: bool) -> FP8Layers:
    """Quantise every frozen LoRA base layer's weight and route its forward through :func:`fp8_linear`;
    ``offload``: keep the bf16 weights in host memory meanwhile (on a GPU)."""
    import torch

    layers, skipped = frozen_base_layers(model)
    state = FP8Layers(skipped=skipped)
    gpu = None
    for layer in layers:
        weight = layer.weight.detach()
        gpu = weight.device if weight.is_cuda else gpu
        with torch.no_grad():
            layer._stackwise_fp8 = quantize_rows(weight)
        layer._stackwise_dtype = weight.dtype
        layer.forward = partial(_forward, layer)
        state.layers.append(layer)
        if offload and weight.is_cuda:
            state.host.append((layer, weight.device))
            layer.weight.data = weight.to("cpu").pin_memory()
    if state.host:
        torch.cuda.empty_cache()
    quantiser = _compile_quantizer(gpu) if gpu is not None else "eager"
    log.info("fp8: %d frozen linear layers run FP8 matmuls (%s quantiser)%s%s", len(state.layers), quantiser,
             f"; {skipped} adapted layers left in their own precision" if skipped else "",
             "; their bf16 weights wait in host memory" if state.host else "")
    return state


def restore(state: FP8Layers | None) -> None:
    """Undo :func:`enable`: the original weights back on their device, the plain forward back."""
    if state is None:
        return
    for layer, device in state.host:
        layer.weight.data = layer.weight.data.to(device)
    for layer in state.layers:
        for name in ("forward", "_stackwise_fp8", "_stackwise_dtype"):
            layer.__dict__.pop(name, None)
    state.layers.clear()
    state.host.clear()


def callback(speed, *, offload: bool):
    """A Trainer callback that switches the base layers to FP8 as training starts and back as it ends;
    ``speed`` (:class:`~tools.finetune.speed.Speedups`) records it."""
    from tools.finetune.speed import switch_callback

    return switch_callback(speed, "fp8", partial(enable, offload=offload), restore,
                           lambda state: "no frozen linear layer it can take")
