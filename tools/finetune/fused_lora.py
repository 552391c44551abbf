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

With ``recompute_mlp`` a SwiGLU MLP (``down(silu(gate(x)) · up(x))``, transformers' or Liger's) whose down
projection is fused runs :class:`SwiGLUDown`: the activation and the down projection in one function that keeps
``gate`` and ``up`` (which the SwiGLU's backward needs anyway) and computes ``silu(gate) · up`` again in the
backward for A's gradient, instead of keeping it as the down projection's input — the widest activation of a
decoder layer (H200, 7B: 49.1 → 41.3 GiB at 4 × 2048 for 1–2 % of the speed; ``evals/gpu/README.md``).

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


def _lora_forward(ctx, rows, lora_a, lora_b, base, scaling: float, p: float, dtype, keep_dropped: bool,
                  kernels: bool, device_seed):
    """The forward of :class:`LoRALinear` on 2-D ``rows`` (already in ``dtype``): the output rows and the tensors
    its backward needs (the input or the dropped-out input, ``h``, and the adapter as used); sets ``ctx``'s
    fields for :func:`_lora_backward`."""
    import torch

    # the seed comes from the global generator, so a recomputed forward (checkpointing) draws it again; or it is
    # read on the device from a counter advanced once per model forward (DeviceSeeds)
    seed = None if p <= 0 else device_seed or int(torch.randint(0, 2**31 - 1, (), device="cpu"))
    # with dropout on a GPU, the Triton kernels that apply the mask inside the thin matmuls: they read A in fp32
    # and take the scaling as a factor, so only B is cast and nothing is scaled on its own
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
    ctx.base, ctx.scaling, ctx.p, ctx.seed = base, scaling, p, seed
    # A's gradient needs the dropped-out input: drawn again (no memory), or kept (one kernel pass fewer)
    ctx.kept = keep_dropped and dropped is not None and seed is not None
    return out, (dropped if ctx.kept else rows, h, a, b)


def _lora_backward(ctx, saved, h, a, b, g, needs_input: bool, needs_a: bool, needs_b: bool):
    """The backward of :class:`LoRALinear` on 2-D gradient rows ``g``: ``(dx rows, dA, dB)`` (``None`` where not
    needed). ``saved``: the input rows (or the dropped-out ones, ``ctx.kept``); ``a``, ``b``: the adapter as the
    forward used it."""
    import torch

    g = g if g.dtype == saved.dtype else g.to(saved.dtype)
    s, kernels = ctx.scaling, ctx.kernels
    gh = g @ b                                  # (M, r): the gradient reaching h (÷ s on the kernel path)
    grad_a = grad_b = dx = None
    # the adapter gradients go back in the training dtype or fp32; autograd casts them to the parameters'
    if needs_a and kernels:
        grad_a = lora_kernels.thin_grad_a(saved, gh, ctx.p, ctx.seed, factor=s)
    elif needs_a:
        grad_a = gh.t() @ (saved if ctx.kept else _dropped(saved, ctx.p, ctx.seed))
    if needs_b:
        grad_b = torch.addmm(h.new_empty((1, 1)), g.t(), h, beta=0, alpha=s)
    if needs_input:
        dx = _base_input_grad(ctx.base, g)
        if kernels and dx.is_contiguous():
            dx = lora_kernels.masked_accumulate(dx, gh, a, ctx.p, ctx.seed, factor=s)
        elif kernels:
            dx = _dropped((gh @ a.to(gh.dtype)).mul_(s), ctx.p, ctx.seed, accumulate=dx)
        elif ctx.seed is None:
            dx.addmm_(gh, a)
        else:
            dx = _dropped(gh @ a, ctx.p, ctx.seed, accumulate=dx)
    return dx, grad_a, grad_b


def _swiglu(gate, up):
    """``silu(gate) · up`` as Liger's kernel computes it (silu in fp32, cast, then the product in the input dtype):
    its Triton kernel on a GPU when Liger is installed, PyTorch's ops otherwise."""
    import torch

    liger = _liger_swiglu() if gate.is_cuda else None
    if liger is not None:
        return liger[0](gate, up)[2]
    return torch.nn.functional.silu(gate.float()).to(up.dtype) * up


def _swiglu_backward(gate, up, grad):
    """The gradients of :func:`_swiglu` for ``gate`` and ``up`` (on a GPU with Liger: written into ``gate`` and
    ``up``, which the caller no longer needs)."""
    import torch

    liger = _liger_swiglu() if gate.is_cuda else None
    if liger is not None:
        return liger[1](gate, up, grad)
    g32, sig = gate.float(), torch.sigmoid(gate.float())
    silu = g32 * sig
    d_gate = grad.float() * up.float() * (sig + silu * (1 - sig))
    return d_gate.to(gate.dtype), (grad.float() * silu).to(up.dtype)


_LIGER_SWIGLU: list = []


def _liger_swiglu():
    """Liger's SwiGLU forward and backward kernels, or ``None`` when liger-kernel is not installed."""
    if not _LIGER_SWIGLU:
        try:
            from liger_kernel.ops.swiglu import swiglu_backward, swiglu_forward
            _LIGER_SWIGLU.append((swiglu_forward, swiglu_backward))
        except Exception:           # not installed, or does not load (no Triton / no GPU)
            _LIGER_SWIGLU.append(None)
    return _LIGER_SWIGLU[0]


def _make_function():
    import torch

    class LoRALinear(torch.autograd.Function):
        """``base(x) + s · B(A(dropout(x)))`` for a frozen ``base`` (see the module docstring)."""

        @staticmethod
        def forward(ctx, x, lora_a, lora_b, base, scaling: float, p: float, dtype, keep_dropped: bool = False,
                    kernels: bool = False, device_seed: tuple | None = None):
            rows = x.reshape(-1, x.shape[-1])
            rows = rows if rows.dtype == dtype else rows.to(dtype)
            out, saved = _lora_forward(ctx, rows, lora_a, lora_b, base, scaling, p, dtype, keep_dropped, kernels,
                                       device_seed)
            ctx.shape, ctx.x_dtype = x.shape, x.dtype
            ctx.save_for_backward(*saved)
            return out.reshape(*x.shape[:-1], out.shape[-1])

        @staticmethod
        def backward(ctx, grad):
            saved, h, a, b = ctx.saved_tensors
            dx, grad_a, grad_b = _lora_backward(ctx, saved, h, a, b, grad.reshape(-1, grad.shape[-1]),
                                                *ctx.needs_input_grad[:3])
            if dx is not None:
                dx = dx.reshape(ctx.shape)
                dx = dx if dx.dtype == ctx.x_dtype else dx.to(ctx.x_dtype)
            return dx, grad_a, grad_b, None, None, None, None, None, None, None

    class SwiGLUDown(torch.autograd.Function):
        """``down(silu(gate) · up)`` with ``down`` a LoRA layer as in :class:`LoRALinear`, keeping only ``gate``
        and ``up`` for the backward (which the SwiGLU's own backward keeps anyway) and computing the product
        again there, instead of also keeping it as the down projection's input: the widest activation of a
        decoder layer (intermediate size, ~5× the hidden size) not stored, for one elementwise pass."""

        @staticmethod
        def forward(ctx, gate, up, lora_a, lora_b, base, scaling: float, p: float, dtype, kernels: bool = False,
                    device_seed: tuple | None = None):
            product = _swiglu(gate, up)
            rows = product.reshape(-1, product.shape[-1])
            rows = rows if rows.dtype == dtype else rows.to(dtype)
            out, (_, h, a, b) = _lora_forward(ctx, rows, lora_a, lora_b, base, scaling, p, dtype, False, kernels,
                                              device_seed)
            ctx.save_for_backward(gate, up, h, a, b)
            return out.reshape(*gate.shape[:-1], out.shape[-1])

        @staticmethod
        def backward(ctx, grad):
            gate, up, h, a, b = ctx.saved_tensors
            product = _swiglu(gate, up)
            rows = product.reshape(-1, product.shape[-1])
            rows = rows if rows.dtype == h.dtype else rows.to(h.dtype)
            needs = ctx.needs_input_grad
            d_rows, grad_a, grad_b = _lora_backward(ctx, rows, h, a, b, grad.reshape(-1, grad.shape[-1]),
                                                    needs[0] or needs[1], needs[2], needs[3])
            d_gate = d_up = None
            if d_rows is not None:
                del product, rows
                d_gate, d_up = _swiglu_backward(gate, up, d_rows.reshape(gate.shape).to(gate.dtype))
            return d_gate, d_up, grad_a, grad_b, None, None, None, None, None, None

    return LoRALinear, SwiGLUDown


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


def _functions():
    global _FUNCTION
    if _FUNCTION is None:
        _FUNCTION = _make_function()
    return _FUNCTION


def _fused_args(module, x, args=(), kwargs=None):
    """The arguments after ``x`` of the fused function for the LoRA layer ``module``, or ``None`` where peft's
    own path must run: mixed-adapter batches, merged or disabled adapters, another adapter made active since
    (the plain attributes behind peft's properties, read directly)."""
    active, base, lora_a, lora_b, scaling, p, keep, kernels, seed = module.__dict__["_stackwise_fused"]
    if args or kwargs or module._disable_adapters or module.merged_adapters or module._active_adapter != active:
        return None
    dtype = base.__dict__.get("_stackwise_dtype") or base._parameters["weight"].dtype
    return lora_a, lora_b, base, scaling, p if module.training else 0.0, dtype, keep, kernels, seed


def _forward(module, x, *args, **kwargs):
    fused = _fused_args(module, x, args, kwargs)
    if fused is None:
        return type(module).forward(module, x, *args, **kwargs)
    return _functions()[0].apply(x, *fused)


def _mlp_forward(mlp, x):
    """A SwiGLU MLP whose down projection is fused: :class:`SwiGLUDown` after the gate and up projections."""
    gate_proj, up_proj, down = mlp.__dict__["_stackwise_mlp"]          # not through nn.Module.__getattr__
    gate, up = gate_proj(x), up_proj(x)
    fused = _fused_args(down, x) if "_stackwise_fused" in down.__dict__ else None
    if fused is None:
        return down(_swiglu(gate, up))
    lora_a, lora_b, base, scaling, p, dtype, _keep, kernels, seed = fused
    return _functions()[1].apply(gate.contiguous(), up.contiguous(), lora_a, lora_b, base, scaling, p, dtype,
                                 kernels, seed)


def _swiglu_mlp(module) -> bool:
    """Whether ``module`` is a SwiGLU MLP of transformers or Liger (``down(silu(gate(x)) · up(x))``), whose
    forward :func:`_mlp_forward` can take."""
    if not all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj")):
        return False
    if not type(module).__module__.startswith(("transformers.models.", "liger_kernel.")):
        return False
    config = getattr(module, "config", None)
    act = getattr(config, "hidden_act", None) or getattr(config, "hidden_activation", None)
    act_fn = getattr(module, "act_fn", None)
    return act in ("silu", "swish") and (act_fn is None or type(act_fn).__name__ in ("SiLUActivation", "SiLU"))


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
    mlps: list = field(default_factory=list)           # with recompute_mlp: the SwiGLU MLPs running SwiGLUDown

    def __len__(self) -> int:
        return len(self.layers)


def enable(model, *, keep_dropped: bool = False, kernels: bool = True, device_seeds: bool = False,
           recompute_mlp: bool = False) -> FusedLoRA:
    """Route every LoRA linear layer that :class:`LoRALinear` can take through it; :func:`restore` undoes it.
    ``kernels`` (default): with LoRA dropout on a GPU, the Triton kernels of :mod:`tools.finetune.lora_kernels`
    (the mask applied inside the thin matmuls; fewer launches and passes — bench variant ``fast`` vs
    ``fast_flat``); off, or where they cannot run, one flat dropout kernel with PyTorch matmuls around it.
    ``keep_dropped`` (flat path only): keep each layer's dropped-out input for the backward (memory: 2 B per
    input feature and token) instead of drawing it again — bench variant ``fast_keep``, not used by the
    trainer. ``device_seeds``: the dropout seeds read on the device from a counter the model's forward advances
    (:class:`DeviceSeeds`; what CUDA graphs of the layers need), instead of drawn on the host per call.
    ``recompute_mlp``: every SwiGLU MLP whose down projection is fused runs :class:`SwiGLUDown` (the down
    projection's input, ``silu(gate) · up``, computed again in the backward instead of kept)."""
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
    if recompute_mlp:
        fused = {id(module) for module in state.layers}
        for module in model.modules():
            if _swiglu_mlp(module) and id(module.down_proj) in fused:
                module._stackwise_mlp = (module.gate_proj, module.up_proj, module.down_proj)
                module.forward = partial(_mlp_forward, module)
                state.mlps.append(module)
    log.info("fused LoRA: %d adapted layers in one autograd function each%s%s", len(state.layers),
             f"; {len(state.mlps)} MLPs recompute the down projection's input" if recompute_mlp else "",
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
    for module in state.mlps:
        module.__dict__.pop("forward", None)
        module.__dict__.pop("_stackwise_mlp", None)
    state.layers.clear()
    state.mlps.clear()
    if state.hook is not None:
        state.hook.remove()
        state.hook = state.seeds = None


def callback(speed):
    """A Trainer callback that turns the fused LoRA layers on as training starts and off as it ends (with
    ``speed.recompute_mlp``, the SwiGLU MLPs too); ``speed`` (:class:`~tools.finetune.speed.Speedups`) records
    whether it applied."""
    from tools.finetune.speed import switch_callback

    def on(model) -> FusedLoRA:
        state = enable(model, device_seeds=speed.cuda_graphs, recompute_mlp=speed.recompute_mlp)
        if speed.recompute_mlp and state.mlps:
            speed.applied.append("recompute_mlp")
        elif speed.recompute_mlp:
            speed.skipped["recompute_mlp"] = "no SwiGLU MLP with a fused down projection"
        return state

    return switch_callback(speed, "fused_lora", on, restore,
                           lambda state: "no LoRA layer it can take: " + (", ".join(state.skipped) or "none found"))
