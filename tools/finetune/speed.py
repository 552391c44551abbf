"""Training speed-ups, each behind its own switch, and the FLOP count used to report MFU.

Switches (``spec.json`` → ``"speed": {...}``, or :func:`speedups` defaults):

- ``liger``: Liger kernels (``liger-kernel``, Triton; CUDA only) patched into the model class before it is
  loaded — fused RMSNorm, SwiGLU MLP, RoPE, and the fused linear + cross-entropy that computes the loss in
  chunks and never materialises the full ``batch × seq × vocab`` logits (at a 150k vocabulary those are the
  largest activation). Only for model types Liger knows (``MODEL_TYPE_TO_APPLY_LIGER_FN``).
- ``fused_adamw``: PyTorch's fused AdamW (one kernel for all parameters; CUDA only).
- ``compile``: ``torch.compile`` of the model through the Trainer (``torch_compile``; CUDA only).
- ``fp8``: FP8 matmuls for the frozen base weights of a LoRA run (``tools/finetune/fp8.py``; compute capability
  8.9+, off by default: not bit-equivalent to bf16, and measured slower than ``fused_lora`` alone at 7B).
- ``fused_lora``: each LoRA layer as one autograd function in the training dtype (``tools/finetune/fused_lora.py``:
  no fp32 copies of the activations, dropout drawn twice from a seed instead of stored; LoRA only, on a GPU by
  default). Measured on the H200 with Liger, dropout 0.05, against plain transformers + peft in the same run:
  7B shape 1.77× the tokens/s at 0.46× the memory (GPU-bound), 0.5B shape 1.68–1.98× at 0.26× (bound by the
  host's kernel launches, so by the machine's CPU); adapter gradients within bf16 tolerance of fp32 (1.03× plain
  bf16's error).
- ``cuda_graphs``: each decoder layer's forward and backward replayed as a CUDA graph
  (``tools/finetune/layer_graphs.py``; LoRA with ``fused_lora`` on a GPU, its dropout seeds on the device; batches
  as fixed rows of ``max_seq_len``, ``tools/finetune/row_packing.py``). Off by default: 2.47–2.48× the baseline
  at 0.5B in the benchmark (our default 1.95–2.32× on the same machines), but through the worker not faster than
  the default yet (86–87k vs 83–100k tokens/s, one run each).
- ``recompute_mlp``: with ``fused_lora``, each SwiGLU MLP keeps only its gate and up outputs and computes the down
  projection's input ``silu(gate) · up`` again in the backward (``fused_lora.SwiGLUDown``): 2 B × intermediate
  size less per token and layer (H200: 7B 49.1 → 41.3 GiB, 0.5B 16.2 → 12.8 GiB) for 1–2 % of the speed at 7B,
  the same loss. Off by default; the preflight turns it on where the memory needs it, before checkpointing
  any layer (it saves ~7× more memory per unit of time than a checkpointed layer).

Each is on by default only where it was measured faster with the same loss (``evals/gpu/speed_bench.py``);
a switch that cannot apply (no GPU, package missing, unknown model type) is reported and skipped, never fatal.

FLOPs per trained token (what MFU is computed from; P = parameters of the linear layers that see every token,
i.e. all but the embeddings; L layers, h hidden size, s sequence length):

    forward                 2 × P  +  2 × s × h × L        (matmuls; causal attention scores + values: half of
                                                            4 × s × h per layer)
    backward, input grads   2 × P  +  4 × s × h × L
    backward, weight grads  2 × P_trainable                 (LoRA: the adapters only; full fine-tuning: all P)

so LoRA ≈ 4P + 6shL (+2·P_trainable) and full ≈ 6P + 6shL per token; MFU = FLOPs/token × tokens/s ÷ the GPU's
dense bf16 peak (H200/H100 SXM: 989 TFLOP/s).
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import asdict, dataclass
from typing import Any

log = logging.getLogger("stackwise.train")

PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}
SWITCHES = ("liger", "fused_adamw", "fp8", "compile", "fused_lora", "cuda_graphs", "recompute_mlp")
# Measured on the H200 (evals/gpu/README.md, LoRA r16, batch 4 × 2048, same loss within 0.01 %): Liger is
# 1.13× faster at the 7.6B shape (and 0.77× the memory) but 0.85× at the 0.5B shape (small matmuls: its extra
# kernel launches cost more than they save), so it is on by default from LIGER_MIN_PARAMS parameters — and at
# every size together with fused_lora (with peft's fp32 adapter copies gone, Liger took the 0.5B step from 1.23×
# to 1.60× the baseline); fused AdamW measured no faster at either shape, so it is off. fused_lora is on for
# LoRA runs on a GPU (None: by the method and the device).
DEFAULTS = {"liger": None, "fused_adamw": False, "fp8": False, "compile": False, "fused_lora": None,
            "cuda_graphs": False, "recompute_mlp": False}
LIGER_MIN_PARAMS = 3e9


@dataclass
class Speedups:
    """Which speed-ups to use; :attr:`applied` / :attr:`skipped` say what actually happened."""

    liger: bool = False
    fused_adamw: bool = False
    fp8: bool = False
    compile: bool = False
    fused_lora: bool = False
    cuda_graphs: bool = False
    recompute_mlp: bool = False

    def __post_init__(self) -> None:
        self.applied: list[str] = []
        self.skipped: dict[str, str] = {}

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "applied": list(self.applied), "skipped": dict(self.skipped)}


def speedups(options: dict | None = None) -> Speedups:
    """The switches from a run's ``"speed"`` options over :data:`DEFAULTS`; unknown names are an error.

    >>> speedups({"liger": True}).liger, speedups().fused_adamw, choose(None, total_params=7_600_000_000).liger
    (True, False, True)
    """
    options = dict(options or {})
    unknown = sorted(set(options) - set(SWITCHES))
    if unknown:
        raise ValueError(f"unknown speed option(s) {', '.join(unknown)}; known: {', '.join(SWITCHES)}")
    bad = [k for k, v in options.items() if not isinstance(v, bool)]
    if bad:
        raise ValueError(f"speed options are true or false: {', '.join(bad)}")
    chosen = {**DEFAULTS, **options}
    return Speedups(liger=bool(chosen["liger"]), fused_adamw=bool(chosen["fused_adamw"]), fp8=bool(chosen["fp8"]),
                    compile=bool(chosen["compile"]), fused_lora=bool(chosen["fused_lora"]),
                    cuda_graphs=bool(chosen["cuda_graphs"]), recompute_mlp=bool(chosen["recompute_mlp"]))


def choose(options: dict | None, *, total_params: int | None, method: str = "lora", cuda: bool = True) -> Speedups:
    """:func:`speedups`, with the defaults that depend on the job filled in: ``fused_lora`` for LoRA on a GPU
    (on CPU only when asked for: there it measured no faster), Liger from LIGER_MIN_PARAMS or with ``fused_lora``.

    >>> s = choose(None, total_params=494_000_000); (s.fused_lora, s.liger)
    (True, True)
    >>> s = choose(None, total_params=494_000_000, method="qlora"); (s.fused_lora, s.liger)
    (False, False)
    """
    options = options or {}
    picked = speedups(options)
    if options.get("fused_lora") is None:
        picked.fused_lora = method == "lora" and cuda
    if options.get("liger") is None:
        picked.liger = bool(total_params and total_params >= LIGER_MIN_PARAMS) or picked.fused_lora
    return picked


def apply_before_load(speed: Speedups, model_type: str, *, cuda: bool) -> None:
    """Patch the model class (Liger) before ``from_pretrained``; records what applied and why not."""
    if not speed.liger:
        return
    if not cuda:
        speed.skipped["liger"] = "needs a CUDA GPU"
        return
    if importlib.util.find_spec("liger_kernel") is None:
        speed.skipped["liger"] = "liger-kernel is not installed"
        return
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except Exception as exc:   # an incompatible transformers version fails at import
        speed.skipped["liger"] = f"liger-kernel does not load: {type(exc).__name__}: {exc}"
        return
    patch = MODEL_TYPE_TO_APPLY_LIGER_FN.get(model_type)
    if patch is None:
        speed.skipped["liger"] = f"no Liger kernels for model type {model_type!r}"
        return
    patch(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=True)
    speed.applied.append("liger")
    log.info("liger kernels on for %s (RMSNorm, SwiGLU, RoPE, fused linear cross-entropy)", model_type)


def switch_callback(speed: Speedups, name: str, enable, restore, why_none):
    """A Trainer callback for a switch that changes the model in place: ``enable(model)`` as training starts (the
    model is on its device and wrapped for data-parallel by then) and ``restore(state)`` as it ends, before
    anything is saved; ``speed`` records it as applied, or why not (``why_none(state)`` when it took nothing)."""
    from transformers import TrainerCallback

    class SwitchCallback(TrainerCallback):
        state = None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if model is not None and self.state is None:
                self.state = enable(model)
                if len(self.state) and name not in speed.applied:
                    speed.applied.append(name)
                elif not len(self.state):
                    speed.skipped[name] = why_none(self.state)

        def on_train_end(self, args, state, control, **kwargs):
            restore(self.state)
            self.state = None

    return SwitchCallback()


# why a LoRA-only switch does not apply to the other methods
NOT_FOR = {"fp8": {"qlora": "only for LoRA: QLoRA's base weights are already 4-bit",
                   "full": "only for LoRA: a full fine-tune trains the weights"},
           "fused_lora": {"qlora": "QLoRA's 4-bit base layers keep peft's forward",
                          "full": "only for LoRA: a full fine-tune has no adapters"},
           "cuda_graphs": {"qlora": "needs the fused LoRA layers, which QLoRA's 4-bit base layers do not take",
                           "full": "only for LoRA: the graphs replay the fused adapter layers"},
           "recompute_mlp": {"qlora": "needs the fused LoRA layers, which QLoRA's 4-bit base layers do not take",
                             "full": "only for LoRA: it runs inside the fused down projection"}}


def _lora_only(speed: Speedups, switch: str, method: str) -> bool:
    """Whether the LoRA-only ``switch`` is on and can apply to ``method`` (if not, why: ``speed.skipped``)."""
    if not getattr(speed, switch):
        return False
    if method != "lora":
        speed.skipped[switch] = NOT_FOR[switch].get(method, "only for LoRA")
        return False
    return True


def _on_fused_layers(speed: Speedups, switch: str, method: str) -> bool:
    """Whether ``switch``, which works on the fused LoRA layers, is on and can apply (if not, why:
    ``speed.skipped``)."""
    if not _lora_only(speed, switch, method):
        return False
    if not speed.fused_lora:
        speed.skipped[switch] = "needs the fused LoRA layers (speed option fused_lora)"
        return False
    return True


def fp8_callback(speed: Speedups, method: str, *, cuda: bool):
    """The Trainer callback that runs the frozen base weights in FP8, or ``None`` (why not: ``speed.skipped``)."""
    if not _lora_only(speed, "fp8", method):
        return None
    from tools.finetune import fp8

    reason = fp8.supported(cuda)
    if reason:
        speed.skipped["fp8"] = reason
        return None
    return fp8.callback(speed, offload=True)


def fused_lora_callback(speed: Speedups, method: str):
    """The Trainer callback that runs the LoRA layers fused, or ``None`` (why not: ``speed.skipped``)."""
    _on_fused_layers(speed, "recompute_mlp", method)   # only records why not: fused_lora.callback applies it
    if not _lora_only(speed, "fused_lora", method):
        return None
    from tools.finetune import fused_lora

    return fused_lora.callback(speed)


def graphs_wanted(speed: Speedups, method: str, *, cuda: bool) -> bool:
    """Whether the decoder layers are to be CUDA-graphed (``cuda_graphs``, on the fused LoRA layers, on a GPU);
    if asked for but impossible, why not goes to ``speed.skipped``. The Trainer then takes fixed-shape batches
    (:mod:`tools.finetune.row_packing`)."""
    if not _on_fused_layers(speed, "cuda_graphs", method):
        return False
    if not cuda:
        speed.skipped["cuda_graphs"] = "needs a CUDA GPU"
        return False
    return True


def training_callbacks(speed: Speedups, method: str, *, cuda: bool, lora_dropout: float = 0.0,
                       accumulating: bool = False) -> list:
    """The Trainer callbacks of the switches that change the model as training starts (FP8, the fused LoRA
    layer, then the CUDA graphs of the layers it is in; the fused layer looks for FP8 weights at every call, so
    their order does not matter)."""
    found = [fp8_callback(speed, method, cuda=cuda), fused_lora_callback(speed, method)]
    if speed.cuda_graphs and graphs_wanted(speed, method, cuda=cuda):
        from tools.finetune import layer_graphs

        found.append(layer_graphs.callback(speed, lora_dropout=lora_dropout, accumulating=accumulating))
    return [callback for callback in found if callback is not None]


def optimizer_name(speed: Speedups, *, cuda: bool) -> str:
    """The Trainer ``optim`` name: fused AdamW when asked for and on CUDA, else PyTorch's AdamW."""
    if speed.fused_adamw and cuda:
        if "fused_adamw" not in speed.applied:
            speed.applied.append("fused_adamw")
        return "adamw_torch_fused"
    if speed.fused_adamw:
        speed.skipped["fused_adamw"] = "needs a CUDA GPU"
    return "adamw_torch"


def flops_per_token(config: dict, *, seq_len: int, trainable: int, full: bool) -> float:
    """Training FLOPs per token for a decoder-only model (formula in the module docstring).

    ``config``: the model's ``config.json`` (hidden_size, intermediate_size, num_hidden_layers,
    num_attention_heads, num_key_value_heads, vocab_size).

    >>> cfg = {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
    ...        "num_key_value_heads": 2, "vocab_size": 10}
    >>> flops_per_token(cfg, seq_len=4, trainable=0, full=False)  # P = 64·4 + 3·128 + 80 = 720; 4P + 6·4·8
    3072.0
    """
    h, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or h // heads
    attn = h * heads * head_dim * 2 + h * kv * head_dim * 2          # q, o + k, v projections
    mlp = 3 * h * inter                                              # gate, up, down
    linear = layers * (attn + mlp) + h * config["vocab_size"]        # + the LM head (every token)
    matmul = (6.0 if full else 4.0) * linear + (0.0 if full else 2.0 * trainable)
    return matmul + 6.0 * seq_len * h * layers


def mfu(tokens_per_s: float, flops_token: float, gpu_name: str | None) -> float | None:
    """Model FLOPs utilisation against the GPU's dense bf16 peak (``None`` for a GPU we have no peak for)."""
    for key, peak in PEAK_BF16_FLOPS.items():
        if gpu_name and key in gpu_name:
            return tokens_per_s * flops_token / peak
    return None
