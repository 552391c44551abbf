"""One autograd function per LoRA layer: the frozen base matmul and the adapter in the training dtype.

peft's LoRA layer computes ``base(x) + B(A(dropout(x))) · s`` with the adapter weights in fp32: every adapted
layer casts its input to fp32 (and keeps that copy, plus the dropped-out one, for the backward), runs the two
thin adapter matmuls in fp32 without tensor cores, scales, adds and casts back — a dozen kernels and two fp32
copies of the activation per layer, which is most of what separates a LoRA step from its base matmuls
(profiled on the H200: at the 0.5B shape a fifth of the GPU time is those casts; ``evals/gpu/README.md``).

:class:`LoRALinear` does the same arithmetic in the base weights' dtype (bf16 on a GPU; fp32 matmul
accumulation either way), three matmuls forward and five backward, and no copies:

    forward     h = xd · Aᵀ              (M × r; xd = x, or x · mask / (1 - p) with LoRA dropout p)
                y = x · Wᵀ + h · (s·B)ᵀ   (one ``addmm`` onto the base output) [+ bias]
    backward    dB = s · gᵀ · h           dA = (g · s·B)ᵀ · xd
                dx = g · W + (g · s·B) · A [· mask / (1 - p)]

It keeps for the backward only its input (a view, shared by every layer that reads the same tensor) and ``h``
(r values per token) — instead of peft's fp32 copies of the input and of its dropped-out version; with dropout
the mask is drawn again in the backward from a seed (the global generator's next number, so a checkpointed
forward draws the same one; or, for CUDA-graphed layers, read on the device from a counter the model's call
advances: :class:`DeviceSeeds`) rather than kept. On a GPU the mask is applied inside the thin matmuls by the Triton
kernels of :mod:`tools.finetune.lora_kernels` (``h = xd · Aᵀ``, A's gradient and the masked share of the input
gradient each read the full-width tensor once; they read A in fp32 and take ``s`` as a factor, so only B is
cast and nothing is scaled by a launch of its own — at the 0.5B shape the step is bound by the host's launch
rate, ~25–30 µs a launch on the H200 machine's CPU; ``evals/gpu/host_overhead.py``). Elsewhere, or with
``kernels=False``, one flat dropout kernel with PyTorch matmuls around it
(CPU: PyTorch's own generator). The adapter parameters stay fp32 (the optimizer's master weights); their
gradients come back in the training dtype or fp32 and autograd casts them to fp32. Numerically the base path is
the same matmul; ``evals/gpu/grad_check.py`` compares the adapter gradients against fp32 (H200, 0.5B shape,
with Liger: 1.03× plain bf16's error). For the benchmark only: ``keep_dropped`` (flat path: keep the dropped-out input
instead of redrawing it).

Where the base layer runs FP8 (``tools/finetune/fp8.py``), its forward and input gradient go through the FP8
matmuls. Layers this cannot take (DoRA, several active adapters, LoRA bias, quantised or trainable base
weights, mixed-adapter batches) keep peft's own forward.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial

from tools.finetune import lora_kernels

log = logging.getLogger("stackwise.train")


def _dropout_mask(rows, p: float, seed: int):
    """The kept positions (bool) for LoRA dropout ``p``, drawn from their own generator seeded with ``seed``:
    the backward draws the same mask again instead of keeping it (a function so that tests can fix it)."""
    import torch

    generator = torch.Generator(device=rows.device).manual_seed(seed)
    return torch.empty_like(rows, dtype=torch.bool).bernoulli_(1.0 - p, generator=generator)


def _dropped(rows, p: float, seed, accumulate=None):
    """``rows`` with LoRA dropout ``p`` applied by the mask of ``seed`` (``rows`` itself when ``seed`` is None;
    an int, or a device seed ``(counter, offset)``); with ``accumulate``, that tensor plus the result, written
    into it."""
    if seed is None:
        return rows if accumulate is None else accumulate.add_(rows)
    if rows.is_cuda and lora_kernels.dropout_usable(rows, accumulate):
        return lora_kernels.dropout(rows, p, seed, accumulate)      # one Triton kernel, one pass
    if isinstance(seed, tuple):                 # a device seed without the kernels (CPU): read it here
        seed = int(seed[0]) + seed[1]
    result = rows * _dropout_mask(rows, p, seed) * (1.0 / (1.0 - p))
    return result if accumulate is None else accumulate.add_(result)


# Attribute lookups go through the instance dicts: nn.Module.__getattr__ (parameters, sub-modules, and every
# missing name) costs microseconds, and these run for every adapted layer twice a step.

def _base_matmul(base, rows):
    fp8_state = base.__dict__.get("_stackwise_fp8")
    if fp8_state is not None:
        from tools.finetune.fp8 import forward_matmul

        return forward_matmul(rows, *fp8_state, rows.dtype)
    return rows @ base._parameters["weight"].t()


def _base_input_grad(base, grad):
    fp8_state = base.__dict__.get("_stackwise_fp8")
    if fp8_state is not None:
        from tools.finetune.fp8 import input_grad_matmul

        return input_grad_matmul(grad, *fp8_state, grad.dtype)
    return grad @ base._parameters["weight"]


def _make_function():
    import torch

    class LoRALinear(torch.autograd.Function):
        """``base(x) + s · B(A(dropout(x)))`` for a frozen ``base`` (see the module docstring)."""

        @staticmethod
        def forward(ctx, x, lora_a, lora_b, base, scaling: float, p: float, dtype, keep_dropped: bool = False,
                    kernels: bool = False, device_seed: tuple | None = None):
            rows = x.reshape(-1, x.shape[-1])
            rows = rows if rows.dtype == dtype else rows.to(dtype)
            # the seed comes from the global generator, so a recomputed forward (checkpointing) draws it again;
            # or it is read on the device from a counter advanced once per model forward (DeviceSeeds)
            seed = None if p <= 0 else device_seed or int(torch.randint(0, 2**31 - 1, (), device="cpu"))
            # with dropout on a GPU, the Triton kernels that apply the mask inside the thin matmuls: they read A
            # in fp32 and take the scaling as a factor, so only B is cast and nothing is scaled on its own
            ctx.kernels = (kernels and seed is not None and lora_a.is_contiguous()
                           and lora_kernels.usable(rows, lora_a.shape[0]))
            dropped = None
            if ctx.kernels:
                rows = rows.contiguous()
                a, b = lora_a, lora_b.to(dtype)                 # b unscaled: s is applied by alpha / factor
                h = lora_kernels.thin_forward(rows, a, p, seed)
            else:
                a, b = lora_a.to(dtype), (lora_b * scaling).to(dtype)
                dropped = _dropped(rows, p, seed)
                h = dropped @ a.t()
            out = _base_matmul(base, rows)
            out.addmm_(h, b.t(), alpha=scaling if ctx.kernels else 1)
            bias = base._parameters.get("bias")
            if bias is not None:
                out += bias if bias.dtype == dtype else bias.to(dtype)
            ctx.base, ctx.scaling, ctx.p, ctx.seed, ctx.shape = base, scaling, p, seed, x.shape
            ctx.x_dtype = x.dtype
            # A's gradient needs the dropped-out input: drawn again (no memory), or kept (one kernel pass fewer)
            ctx.kept = keep_dropped and dropped is not None and seed is not None
            ctx.save_for_backward(dropped if ctx.kept else rows, h, a, b)
            return out.reshape(*x.shape[:-1], out.shape[-1])

        @staticmethod
        def backward(ctx, grad):
            # saved: the input rows, or the dropped-out ones; a, b: the adapter as the forward used it
            saved, h, a, b = ctx.saved_tensors
            g = grad.reshape(-1, grad.shape[-1])
            g = g if g.dtype == saved.dtype else g.to(saved.dtype)
            s, kernels = ctx.scaling, ctx.kernels
            gh = g @ b                                  # (M, r): the gradient reaching h (÷ s on the kernel path)
            grad_a = grad_b = dx = None
            # the adapter gradients go back in the training dtype or fp32; autograd casts them to the parameters'
            if ctx.needs_input_grad[1] and kernels:
                grad_a = lora_kernels.thin_grad_a(saved, gh, ctx.p, ctx.seed, factor=s)
            elif ctx.needs_input_grad[1]:
                grad_a = gh.t() @ (saved if ctx.kept else _dropped(saved, ctx.p, ctx.seed))
            if ctx.needs_input_grad[2]:
                grad_b = torch.addmm(h.new_empty((1, 1)), g.t(), h, beta=0, alpha=s)
            if ctx.needs_input_grad[0]:
                dx = _base_input_grad(ctx.base, g)
                if kernels and dx.is_contiguous():
                    dx = lora_kernels.masked_accumulate(dx, gh, a, ctx.p, ctx.seed, factor=s)
                elif kernels:
                    dx = _dropped((gh @ a.to(gh.dtype)).mul_(s), ctx.p, ctx.seed, accumulate=dx)
                elif ctx.seed is None:
                    dx.addmm_(gh, a)
                else:
                    dx = _dropped(gh @ a, ctx.p, ctx.seed, accumulate=dx)
                dx = dx.reshape(ctx.shape)
                dx = dx if dx.dtype == ctx.x_dtype else dx.to(ctx.x_dtype)
            return dx, grad_a, grad_b, None, None, None, None, None, None, None

    return LoRALinear


_FUNCTION = None


def _why_not(module) -> str | None:
    """Why ``module`` (a peft LoRA layer) keeps peft's forward, or ``None`` when :class:`LoRALinear` takes it."""
    import torch.nn as nn

    base = module.get_base_layer()
    adapters = list(module.active_adapters)
    if len(adapters) != 1:
        return "several active adapters"
    name = adapters[0]
    if name not in module.lora_A or type(module.lora_A[name]) is not nn.Linear:
        return "not a linear adapter"
    if module.use_dora.get(name):
        return "DoRA"
    if module.lora_B[name].bias is not None:
        return "LoRA bias"
    if type(base) is not nn.Linear:
        return "quantised or custom base layer"
    if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
        return "trainable base weights"
    dropout = module.lora_dropout[name]
    if not isinstance(dropout, (nn.Dropout, nn.Identity)):
        return "custom dropout"
    return None


def _forward(module, x, *args, **kwargs):
    global _FUNCTION
    active, base, lora_a, lora_b, scaling, p, keep, kernels, seed = module.__dict__["_stackwise_fused"]
    # peft's own path for what this does not cover: mixed-adapter batches, merged or disabled adapters, another
    # adapter made active since (the plain attributes behind peft's properties, read directly)
    if args or kwargs or module._disable_adapters or module.merged_adapters or module._active_adapter != active:
        return type(module).forward(module, x, *args, **kwargs)
    if _FUNCTION is None:
        _FUNCTION = _make_function()
    dtype = base.__dict__.get("_stackwise_dtype") or base._parameters["weight"].dtype
    return _FUNCTION.apply(x, lora_a, lora_b, base, scaling, p if module.training else 0.0, dtype, keep, kernels,
                           seed)


class DeviceSeeds:
    """LoRA dropout seeds that live on the GPU: one int64 counter, advanced by the number of layers at every
    forward of the model (a pre-hook), layer i's seed = counter + i, read by the Triton kernels as they run.
    A CUDA graph of a layer (:mod:`tools.finetune.layer_graphs`) thus replays a new mask at every step, where a
    seed drawn on the host would be frozen into the graph. The backward reads the same counter as its forward
    (and so does a recomputed forward under checkpointing): the counter moves only when the model is called.
    The start comes from PyTorch's global generator, so a seeded run draws the same masks again."""

    def __init__(self, device, layers: int):
        import torch

        start = int(torch.randint(0, 2**40, (), device="cpu"))
        self.counter = torch.tensor(start, dtype=torch.int64, device=device)
        self.stride = max(1, layers)

    def advance(self, *_args) -> None:
        self.counter.add_(self.stride)

    def of(self, index: int) -> tuple:
        return (self.counter, index)


@dataclass
class FusedLoRA:
    """The LoRA layers running :class:`LoRALinear`, and why the others do not."""

    layers: list = field(default_factory=list)
    skipped: dict = field(default_factory=dict)        # reason → count
    seeds: DeviceSeeds | None = None                   # with device_seeds: the counter and its model hook
    hook: object = None

    def __len__(self) -> int:
        return len(self.layers)


def enable(model, *, keep_dropped: bool = False, kernels: bool = True, device_seeds: bool = False) -> FusedLoRA:
    """Route every LoRA linear layer that :class:`LoRALinear` can take through it; :func:`restore` undoes it.
    ``kernels`` (default): with LoRA dropout on a GPU, the Triton kernels of :mod:`tools.finetune.lora_kernels`
    (the mask applied inside the thin matmuls; fewer launches and passes — bench variant ``fast`` vs
    ``fast_flat``); off, or where they cannot run, one flat dropout kernel with PyTorch matmuls around it.
    ``keep_dropped`` (flat path only): keep each layer's dropped-out input for the backward (memory: 2 B per
    input feature and token) instead of drawing it again — bench variant ``fast_keep``, not used by the
    trainer. ``device_seeds``: the dropout seeds read on the device from a counter the model's forward advances
    (:class:`DeviceSeeds`; what CUDA graphs of the layers need), instead of drawn on the host per call."""
    from peft.tuners.lora import LoraLayer

    state = FusedLoRA()
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        reason = _why_not(module)
        if reason:
            state.skipped[reason] = state.skipped.get(reason, 0) + 1
            continue
        name = module.active_adapters[0]
        dropout = module.lora_dropout[name]
        module._stackwise_fused = (module._active_adapter, module.get_base_layer(), module.lora_A[name].weight,
                                   module.lora_B[name].weight, float(module.scaling[name]),
                                   float(getattr(dropout, "p", 0.0)), keep_dropped, kernels, None)
        module.forward = partial(_forward, module)
        state.layers.append(module)
    if device_seeds and state.layers:
        state.seeds = DeviceSeeds(state.layers[0]._stackwise_fused[2].device, len(state.layers))
        for index, module in enumerate(state.layers):
            module._stackwise_fused = (*module._stackwise_fused[:-1], state.seeds.of(index))
        state.hook = model.register_forward_pre_hook(state.seeds.advance)
    log.info("fused LoRA: %d adapted layers in one autograd function each%s", len(state.layers),
             "; peft's forward kept for " + ", ".join(f"{n} ({why})" for why, n in state.skipped.items())
             if state.skipped else "")
    return state


def restore(state: FusedLoRA | None) -> None:
    """peft's own forward back on every layer :func:`enable` changed."""
    if state is None:
        return
    for module in state.layers:
        module.__dict__.pop("forward", None)
        module.__dict__.pop("_stackwise_fused", None)
    state.layers.clear()
    if state.hook is not None:
        state.hook.remove()
        state.hook = state.seeds = None


def callback(speed):
    """A Trainer callback that turns the fused LoRA layers on as training starts and off as it ends;
    ``speed`` (:class:`~tools.finetune.speed.Speedups`) records whether it applied."""
    from tools.finetune.speed import switch_callback

    return switch_callback(speed, "fused_lora", partial(enable, device_seeds=speed.cuda_graphs), restore,
                           lambda state: "no LoRA layer it can take: " + (", ".join(state.skipped) or "none found"))
