"""CUDA graphs for the decoder layers: one graph launch per layer and direction instead of ~100 kernel launches.

At the 0.5B shape the H200 finishes a LoRA step's kernels faster than Python can launch them (25–30 µs a launch
on the GPU machine's CPU, ~2,500 launches a step; ``evals/gpu/host_overhead.py``), so the step waits on the
host. Replaying each decoder layer's forward and backward as a CUDA graph
(``torch.cuda.make_graphed_callables``, all layers in one memory pool, in model order) takes that cost away;
the embedding, the loss head and the optimizer stay eager.

What a graph needs, and so what :func:`why_not` checks: a GPU; LoRA dropout only with the fused layers' seeds
read on the device (``fused_lora.enable(device_seeds=True)``: a counter on the GPU the kernels read, advanced per
model call, so each replay draws a new mask); no gradient checkpointing. A call a graph was not captured for —
evaluation, another batch shape, a mask where there was none — runs the layer eagerly, so fixed shapes are what
make it pay: full-length rows, or the trainer's packed rows of ``max_seq_len`` (``row_packing.py``) whose
block-diagonal attention mask all graphs read from one buffer (:class:`MaskSlot`). With gradient accumulation
each adapter gradient is copied out of the graph's static buffer (a replay would overwrite what ``.grad``
shares).

Measured on the H200 (``evals/gpu/README.md``): 0.5B, 8 × 2048, dropout 0.05 — 120.0k–120.5k tokens/s, 2.47–2.48×
plain transformers + peft, against 95.2k–112.7k for the same path without graphs; 7B no faster (GPU-bound),
+1.45 GiB. The trainer's switch is ``"speed": {"cuda_graphs": true}`` (off by default: through the worker it
measured no faster yet); bench variants ``fast_graphs``, ``fast_rows_graphs``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial

log = logging.getLogger("stackwise.train")


def decoder_layers(model):
    """The ``nn.ModuleList`` of decoder layers (``….model.layers`` in Llama/Qwen-style models), or ``None``."""
    import torch.nn as nn

    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.endswith("layers") and len(module) > 0:
            return module
    return None


def why_not(model, *, lora_dropout: float, device_seeds: bool = False) -> str | None:
    """Why the decoder layers of ``model`` cannot be graphed, or ``None``; ``device_seeds``: the fused LoRA layers
    read their dropout seeds on the device (``fused_lora.enable(device_seeds=True)``)."""
    import torch

    if not torch.cuda.is_available():
        return "CUDA graphs need a GPU"
    if lora_dropout > 0 and not device_seeds:
        return "LoRA dropout with seeds drawn on the host (a graph would replay one mask): fused layers with " \
               "device seeds needed"
    if getattr(model, "is_gradient_checkpointing", False):
        return "gradient checkpointing re-runs layers outside the graph"
    if decoder_layers(model) is None:
        return "no decoder layer list found"
    return None


class MaskSlot:
    """The one attention-mask buffer every graphed layer reads (a graph reads fixed memory): the batch's mask is
    copied in once per step — when a layer sees a mask object other than the last one copied — instead of each
    layer's graph keeping and filling its own copy (0.75 GiB at 0.5B, 8 × 2048)."""

    def __init__(self, mask):
        import torch

        self.buffer = mask.detach().clone(memory_format=torch.contiguous_format)
        self.last = mask

    def takes(self, mask) -> bool:
        return mask is not None and tuple(mask.shape) == tuple(self.buffer.shape) and mask.dtype == self.buffer.dtype

    def fill(self, mask) -> None:
        if mask is not self.last:           # the same object for every layer of a step: one copy a step
            self.buffer.copy_(mask)
            self.last = mask                # kept alive, so its id cannot be reused by the next step's mask


def _layer_call():
    import torch.nn as nn

    class LayerCall(nn.Module):
        """A decoder layer as a function of tensors only (what a graphed callable takes): its class's forward (the
        layer's own ``forward`` attribute becomes :func:`_replayed`), reading the attention mask from the shared
        :class:`MaskSlot` when the batches captured carry one (packed rows: a fixed-shape block-diagonal mask)."""

        def __init__(self, layer, slot):
            super().__init__()
            self.layer = layer
            self.__dict__["slot"] = slot

        def forward(self, hidden, cos, sin):
            mask = None if self.slot is None else self.slot.buffer
            out = type(self.layer).forward(self.layer, hidden, attention_mask=mask, position_embeddings=(cos, sin))
            return out[0] if isinstance(out, tuple) else out

    return LayerCall


def _replayed(layer, hidden_states, *args, attention_mask=None, position_embeddings=None, **kwargs):
    """A graphed layer's forward: the graph's replay for the calls it was captured for; anything else —
    evaluation, no gradient, another batch shape, a mask where there was none or none where there was one — runs
    the layer's own forward (counted in ``layer._stackwise_eager``)."""
    import torch

    graphed, shape, tuple_out, causal, slot = layer.__dict__["_stackwise_graph"]
    same_shape = tuple(hidden_states.shape) == shape
    if attention_mask is None and causal is not None and same_shape:
        attention_mask = causal          # full rows, no packing: the plain causal mask of the captured shape
    mask_fits = slot.takes(attention_mask) if slot is not None else attention_mask is None
    if layer.training and torch.is_grad_enabled() and position_embeddings is not None and same_shape and mask_fits:
        if slot is not None:
            slot.fill(attention_mask)
        out = graphed(hidden_states, *position_embeddings)
        return (out,) if tuple_out else out
    eager = layer.__dict__.get("_stackwise_eager", 0)
    if eager == 0:
        log.info("CUDA graphs: a decoder layer call they were not captured for (%s, mask %s; captured %s, mask %s) "
                 "runs eagerly", tuple(hidden_states.shape),
                 None if attention_mask is None else tuple(attention_mask.shape), shape,
                 None if slot is None else tuple(slot.buffer.shape))
    layer.__dict__["_stackwise_eager"] = eager + 1
    return type(layer).forward(layer, hidden_states, *args, attention_mask=attention_mask,
                               position_embeddings=position_embeddings, **kwargs)


def restore(model) -> int:
    """The decoder layers' own forward back (the graphs released); returns how many layers were graphed."""
    layers = decoder_layers(model) or []
    graphed = [layer for layer in layers if "_stackwise_graph" in layer.__dict__]
    for layer in graphed:
        for hook in layer.__dict__.pop("_stackwise_grad_hooks", []):
            hook.remove()
        for key in ("forward", "_stackwise_graph", "_stackwise_eager"):
            layer.__dict__.pop(key, None)
    return len(graphed)


def _autocast_like_now():
    """A context with the autocast state of the caller (when :func:`capture` is called inside one; the
    Trainer's first-step hook runs before accelerate's autocast wrapper, so there it is none), without its cast
    cache — a graph must not capture cached casts."""
    import contextlib

    import torch

    if torch.is_autocast_enabled("cuda"):
        return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)
    return contextlib.nullcontext()


def capture(model, batch: dict, *, accumulating: bool = False, with_mask: bool = False) -> int:
    """Graph every decoder layer of ``model`` for batches shaped like ``batch`` (a dict of model inputs on the
    GPU): one eager forward records each layer's inputs, then the layers are captured together and replaced by
    their replays. ``accumulating``: gradients are accumulated over several backward passes (gradient
    accumulation, or a ``zero_grad`` that keeps the tensors), so each adapter gradient is copied out of the
    graph's static buffer as it arrives — otherwise the next replay would overwrite the gradient its ``.grad``
    still shares. ``with_mask`` (SDPA models): capture with an attention mask even when ``batch`` needs none, and
    give batches without one the causal mask — so that padded / packed batches and full ones replay the same
    graphs (a Trainer's batches vary between the two). Returns the number of layers graphed."""
    import torch

    layers = decoder_layers(model)
    recorded: list[tuple] = []
    hooks = [layer.register_forward_pre_hook(
        lambda _m, args, kwargs: recorded.append((args[0] if args else kwargs["hidden_states"],
                                                  kwargs.get("attention_mask"), kwargs["position_embeddings"])),
        with_kwargs=True) for layer in layers]
    outputs: list = []
    hooks.append(layers[0].register_forward_hook(lambda _m, _a, out: outputs.append(isinstance(out, tuple))))
    try:
        model(**batch)                      # grad-enabled, so each input's requires_grad is the real one
    finally:
        for hook in hooks:
            hook.remove()
    masks = {None if mask is None else (tuple(mask.shape), mask.dtype) for _, mask, _ in recorded}
    if len(masks) != 1 or any(mask is not None and not torch.is_tensor(mask) for _, mask, _ in recorded):
        raise RuntimeError("graphed decoder layers need one attention mask (or none) of one shape for every layer")
    causal = None
    if with_mask and recorded[0][1] is None and getattr(model.config, "_attn_implementation", None) == "sdpa":
        rows, length = recorded[0][0].shape[:2]
        causal = torch.ones(length, length, dtype=torch.bool, device=recorded[0][0].device).tril()
        causal = causal[None, None].expand(rows, 1, length, length)
        recorded = [(hidden, causal, embeddings) for hidden, _, embeddings in recorded]
    slot = None if recorded[0][1] is None else MaskSlot(recorded[0][1])
    LayerCall = _layer_call()
    calls = tuple(LayerCall(layer, slot) for layer in layers)
    samples = tuple((torch.randn_like(hidden).requires_grad_(hidden.requires_grad), cos.detach().clone(),
                     sin.detach().clone()) for hidden, _, (cos, sin) in recorded)
    mask_shape = None if slot is None else tuple(slot.buffer.shape)
    recorded.clear()
    torch.cuda.synchronize()
    with _autocast_like_now():
        graphed = torch.cuda.make_graphed_callables(calls, samples, allow_unused_input=True)
    for layer, replay, sample in zip(layers, graphed, samples, strict=True):
        layer._stackwise_graph = (replay, tuple(sample[0].shape), outputs[0], causal, slot)
        layer.forward = partial(_replayed, layer)      # the module tree, and so the state dict, stay as they were
    if accumulating:
        for layer in layers:
            layer._stackwise_grad_hooks = [param.register_hook(torch.clone) for param in layer.parameters()
                                           if param.requires_grad]
    log.info("CUDA graphs: %d decoder layers captured for %s%s", len(layers), tuple(samples[0][0].shape),
             f" with a {mask_shape} attention mask" if mask_shape else "")
    return len(layers)


def capture_on_first_step(model, *, accumulating: bool = False, with_mask: bool = True, failed=None):
    """Capture the decoder layers at the first training call of ``model`` (a forward pre-hook: the batch a
    Trainer passes is what the graphs are shaped for); returns the hook's handle. Later batches of another
    shape, and evaluation, run the layers eagerly (:func:`_replayed`). A capture that fails is logged and
    leaves the layers eager (``failed(exc)`` is told)."""
    import torch

    def first_step(module, _args, kwargs):
        if not module.training or not torch.is_grad_enabled() or "input_ids" not in kwargs:
            return None
        handle.remove()
        try:
            capture(module, dict(kwargs), accumulating=accumulating, with_mask=with_mask)
        except Exception as exc:  # noqa: BLE001 - the run goes on with the eager layers
            restore(module)
            log.warning("CUDA graphs: capture failed, the layers stay eager: %s: %s", type(exc).__name__, exc)
            if failed is not None:
                failed(exc)
        return None

    handle = model.register_forward_pre_hook(first_step, with_kwargs=True)
    return handle


@dataclass
class Graphing:
    """What :func:`callback` set up on a model (``model`` None: nothing, for ``reason``)."""

    model: object = None
    reason: str | None = None

    def __len__(self) -> int:
        return int(self.model is not None)


def callback(speed, *, lora_dropout: float, accumulating: bool):
    """A Trainer callback that graphs the decoder layers at the first training step (:func:`capture_on_first_step`)
    and gives them their own forward back as training ends; ``speed`` records it as applied, or why not
    (:func:`why_not`, or a capture that failed)."""
    from tools.finetune.speed import switch_callback

    def failed(exc: Exception) -> None:
        speed.skipped["cuda_graphs"] = f"capture failed ({type(exc).__name__}: {str(exc)[:200]})"
        if "cuda_graphs" in speed.applied:
            speed.applied.remove("cuda_graphs")

    def enable(model) -> Graphing:
        reason = why_not(model, lora_dropout=lora_dropout, device_seeds=True)
        if reason:
            return Graphing(reason=reason)
        capture_on_first_step(model, accumulating=accumulating, failed=failed)
        return Graphing(model=model)

    def give_back(state: Graphing | None) -> None:
        if state is not None and state.model is not None:
            restore(state.model)

    return switch_callback(speed, "cuda_graphs", enable, give_back, lambda state: state.reason)
