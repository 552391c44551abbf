"""CUDA graphs for the decoder layers: one graph launch per layer and direction instead of ~100 kernel launches.

At the 0.5B shape the H200 finishes a LoRA step's kernels faster than Python can launch them (25–30 µs a launch
on the GPU machine's CPU, ~2,500 launches a step; ``evals/gpu/host_overhead.py``), so the step waits on the
host. Replaying each decoder layer's forward and backward as a CUDA graph
(``torch.cuda.make_graphed_callables``, all layers in one memory pool, in model order) takes that cost away;
the embedding, the loss head and the optimizer stay eager.

What a graph needs, and so what :func:`why_not` checks: a GPU; fixed shapes (every batch the shape captured —
full-length rows, or packing's fixed batch × max_seq_len without per-row attention metadata); no attention mask
(causal SDPA); LoRA dropout only with seeds read on the device (below);
no gradient checkpointing; no gradient accumulation (a replay overwrites the static gradient buffers the
parameters' ``.grad`` may alias). LoRA dropout needs the fused layers' device seeds
(``fused_lora.enable(device_seeds=True)``: a counter on the GPU the kernels read, advanced per model call), so
each replay draws a new mask. Opt-in, bench variant ``fast_graphs`` (``evals/gpu/speed_bench.py``), not
used by the trainer until measured.
"""

from __future__ import annotations

import logging

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


def _graphable():
    import torch.nn as nn

    class LayerCall(nn.Module):
        """A decoder layer as a function of tensors only (what a graphed callable takes)."""

        def __init__(self, layer):
            super().__init__()
            self.layer = layer

        def forward(self, hidden, cos, sin):
            out = self.layer(hidden, attention_mask=None, position_embeddings=(cos, sin))
            return out[0] if isinstance(out, tuple) else out

    class Replayed(nn.Module):
        """Stands in the layer list for a graphed layer; the original stays its child (parameters, state dict and
        attributes such as ``attention_type`` read through)."""

        def __init__(self, layer, graphed, shape, tuple_out: bool):
            super().__init__()
            self.inner = layer
            self.__dict__["_graphed"], self.__dict__["_shape"], self.__dict__["_tuple"] = graphed, shape, tuple_out

        def forward(self, hidden_states, *args, attention_mask=None, position_embeddings=None, **kwargs):
            if attention_mask is not None or tuple(hidden_states.shape) != self._shape or position_embeddings is None:
                raise RuntimeError(f"graphed decoder layer: captured for {self._shape} without an attention mask, "
                                   f"called with {tuple(hidden_states.shape)}"
                                   f"{' and a mask' if attention_mask is not None else ''}")
            out = self._graphed(hidden_states, *position_embeddings)
            return (out,) if self._tuple else out

        def __getattr__(self, name):
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(super().__getattr__("inner"), name)

    return LayerCall, Replayed


def capture(model, batch: dict) -> int:
    """Graph every decoder layer of ``model`` for batches shaped like ``batch`` (a dict of model inputs on the
    GPU): one eager forward records each layer's inputs, then the layers are captured together and replaced by
    their replays. Returns the number of layers graphed."""
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
    if any(mask is not None for _, mask, _ in recorded):
        raise RuntimeError("graphed decoder layers need batches without an attention mask (causal SDPA)")
    LayerCall, Replayed = _graphable()
    calls = tuple(LayerCall(layer) for layer in layers)
    samples = tuple((torch.randn_like(hidden).requires_grad_(hidden.requires_grad), cos.detach().clone(),
                     sin.detach().clone()) for hidden, _, (cos, sin) in recorded)
    recorded.clear()
    torch.cuda.synchronize()
    graphed = torch.cuda.make_graphed_callables(calls, samples, allow_unused_input=True)
    for i, (layer, replay) in enumerate(zip(list(layers), graphed, strict=True)):
        layers[i] = Replayed(layer, replay, tuple(samples[i][0].shape), outputs[0])
    log.info("CUDA graphs: %d decoder layers captured for %s", len(layers), tuple(samples[0][0].shape))
    return len(layers)
