"""Preflight of a fine-tune job: rows, token lengths, steps, parameter counts, VRAM and time, warnings.

Sizes are in GiB (2**30 bytes, as torch and nvidia-smi report them); ``gpu = {"name", "memory_gb"}``
uses the same unit. P = parameters, b = ``batch_size``, s = the longest sequence a batch can hold
(``max_seq_len`` when packing, else min(``max_seq_len``, the longest row)), h / L / V = hidden size,
layers, vocabulary.

VRAM estimate (one device)::

    weights      = 2 B × P                                  LoRA, full (bf16)
                 = 0.516 B × P_linear + 2 B × (P − P_linear)  QLoRA: NF4 4-bit blocks of 64 + double-quantised
                                                            constants (~0.127 bit/param); embeddings, head, norms bf16
    trainable    = 16 B × P_trainable                       fp32 weight 4 + grad 4 + AdamW m, v 8 (LoRA adapters;
                                                            full FT: all P — the fp32 master copy on top of bf16)
    activations  = b × s × h × L × k                        k = 76 B in bf16 with SDPA, k = 4 B with gradient
                                                            checkpointing (bf16 layer inputs + one recomputed layer)
                 + b × s × V × j                            logits: j = 1 B without checkpointing (the peak is in
                                                            the backward through all layers; the loss's fp32 copies
                                                            are freed by then), j = 10 B with it (the peak is the
                                                            loss: bf16 logits, the fp32 up-cast, its gradient)
    overhead     = 2 GiB                                    CUDA context, cuBLAS workspaces, allocator fragmentation

Fitted on our own H200 runs (`evals/gpu/README.md`: LoRA r16 α32 on all linear layers, bf16, SDPA, b = 4,
s = 2048, trl SFTTrainer, peak = torch.cuda.max_memory_allocated): the Qwen2.5-0.5B shape measured 14.6 GiB
(formula 16.7, +14 %), the DeepSeek-R1-Distill-Qwen-7B shape 76.3 GiB (formula 76.1, −0.3 %). The first
constants (k = 90, logits 10 B), fitted to DESIGN §9's peaks whose batch size is not recorded, were 2.0× and
1.28× too high there. The checkpointed k = 4 still rests on DESIGN §9 (7B: 30 GiB measured, 31.5 formula).
Checked afterwards through ``stackwise worker --drain`` (``evals/gpu/worker_check.py``, same settings): LoRA 0.5B
14.6 GiB (+14 %), LoRA 7B 76.3 GiB (−0.2 %), QLoRA 0.5B 13.9 GiB (+16 %), QLoRA 7B 65.9 GiB (+1.9 %).
With Liger kernels (on by default from 3B parameters on a GPU, ``speed.py``) the logits term is 0 (the fused
linear + cross-entropy never materialises them) and k = 51 B instead of 64 B; LoRA dropout > 0 adds 12 B (the
dropped-out input of every adapted layer is kept for the backward). Fitted on the worker runs: 7B LoRA with Liger
65.1 GiB measured (formula 65.0, −0.2 %), the same with dropout 0 56.0 GiB (formula 55.8, −0.4 %), 7B QLoRA with
Liger 54.6 GiB (formula 56.0, +2.5 %); Liger's speed is × 1.16.
With the fused LoRA layer (``tools/finetune/fused_lora.py``, on by default for LoRA on a GPU, always with Liger)
k = 42 B whatever the LoRA dropout (no fp32 copies; the mask is redrawn, not kept): fitted on the H200 speed
bench (LoRA r16, dropout 0.05, seq 2048), 7B at 4 × 2048 49.4 GiB measured (formula 48.9, −1 %), 0.5B at 8 × 2048
16.3 GiB (formula 16.8, +3 %), 7B with every 4th layer checkpointed 41.3 GiB (formula 41.7, +1 %); with the
thin-matmul dropout kernels (the default since) 49.1, 16.2 and 41.0 GiB, and 8.9 GiB through the worker at 0.5B,
4 × 2048 (formula 9.9, +12 %).
It fits when the total is ≤ 95 % of the GPU memory. When only a checkpointed estimate fits, gradient
checkpointing is turned on for the fewest layers that make it fit (every n-th decoder layer, transformers'
``every_n_layers``, n as large as the memory allows): a checkpointed layer keeps k = 4 B per token, the others
their full k, and each recomputed layer costs 1/L of the full setting's slow-down. The partial setting's memory
and speed are interpolated between the two measured ends (none, all), not measured yet. With the fused LoRA layer
the cheaper saving comes first: ``recompute_mlp`` (``speed.py``; each SwiGLU MLP computes its down projection's
input again instead of keeping it) takes 2 B per token, layer and intermediate feature off k (7B: k 42 → 31.4;
measured on the H200 49.1 → 41.3 GiB, formula 48.9 → 40.8; 0.5B 16.2 → 12.8, formula 16.8 → 13.3) for × 0.985 of
the speed; layers are checkpointed only if that is not enough.

Time estimate = processed tokens / tokens per second: the training tokens (eval not counted) plus the padding each
batch adds without packing (rows in random order, each batch padded to its longest row; simulated on the token
lengths; with ``packing`` the rows are concatenated padding-free, so none), where tokens/s on an H200 for LoRA
follows the two measured points — Qwen2.5-0.5B shape 52k tokens/s, 7B shape 9.9k tokens/s — as a power law in P
between them (P^-0.606), as 1/P above 7.6B (compute-bound), capped at 250k tokens/s; × GPU factor (H200 1.0, H100
0.85, A100 0.35, RTX 4090 0.3, CPU 0.002 capped at 20k tokens/s); × method factor (LoRA 1.0, QLoRA 0.9 — measured
0.76 at 0.5B, 1.09 at 7B —, full 0.7); × 0.71 with gradient checkpointing on every layer (7.0k / 9.9k measured; 1
/ (1 + 0.41 × c / L) with c of L layers checkpointed: 7 of 28 layers measured 0.90 of the unchecked speed,
formula 0.91); × the fused LoRA layer's speed-up with Liger, measured against the plain baseline in the same run
(1.95× at the 0.5B shape, 1.77× at 7B; interpolated in log P between them, held outside), else × 1.16 with Liger
alone. On a GPU a step also cannot beat the host that launches its kernels: tokens/s is capped at the step's
tokens over L × (3.75 ms + 0.65 ms per adapted linear layer) — what bounds small models (0.5B, 4 × 2048: 199 ms
of host time against ~80 ms of GPU work), never the 7B shape (256 ms against ~500 ms).
"""

from __future__ import annotations

import math
import os
import random
import re
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tools.finetune.data import PreparedData, read_prepared, render_dataset

GIB = 2**30
TOKEN_SAMPLE = 20_000            # rows tokenised exactly; larger data sets are sampled and scaled
TOKENIZER_THREADS, TOKENIZER_CHUNK = 4, 1000
K_ACT_BF16, K_ACT_CHECKPOINTED, K_LOGITS, K_LOGITS_CHECKPOINTED = 64, 4, 1, 10
K_ACT_LIGER = 51          # Liger's fused RMSNorm / SwiGLU / RoPE keep fewer intermediates
K_LORA_DROPOUT = 12       # LoRA dropout > 0 keeps each adapted layer's dropped-out input for the backward
K_ACT_FUSED = 42          # fused LoRA layer (+ Liger): no fp32 activation copies, dropout mask redrawn
K_MLP_RECOMPUTED = 2      # recompute_mlp: bytes per token·layer and intermediate feature not kept (bf16)
RECOMPUTE_MLP_SPEED = 0.985   # its cost: the product computed again (H200 7B: 0.982–0.989 of the fused speed)
FUSED_SPEED = ((0.494e9, 1.95), (7.62e9, 1.77))   # (P, × plain baseline) measured with Liger, dropout 0.05
# Host (Python + kernel launch) time per training step, per decoder layer and per adapted linear layer in it,
# on the H200 machine's CPU (evals/gpu/host_overhead.py: ~0.65 ms per adapted layer's forward + backward; the
# rest fitted to the 0.5B runs, whose steps wait on the host): a step is never faster than this.
HOST_S_LAYER, HOST_S_ADAPTER = 3.75e-3, 0.65e-3
LIGER_SPEED = 1.16        # measured through the worker, 7B LoRA (12.7k vs 11.0k tokens/s) and QLoRA (1.17)
OVERHEAD_GIB = 2.0
NF4_BYTES = 0.5 + 0.127 / 8
FIT_SHARE = 0.95
PACKING_HINT_PADDING = 0.25   # suggest packing from this share of padding in the processed tokens
DP_EFFICIENCY = 0.95  # data-parallel scaling per GPU (DDP): measured 0.96 for 7B LoRA on 2 H200s (evals/gpu/README.md)
# GPU kind → (throughput factor relative to H200, cap in tokens/s)
GPU_KINDS = {"H200": (1.0, 250_000), "H100": (0.85, 220_000), "A100": (0.35, 120_000),
             "4090": (0.3, 100_000), "CPU": (0.002, 20_000)}
METHOD_SPEED = {"lora": 1.0, "qlora": 0.9, "full": 0.7}
CHECKPOINTING_SPEED = 7.0 / 9.9
P_SMALL, TPS_SMALL, P_7B, TPS_7B = 0.494e9, 52_000.0, 7.62e9, 9_900.0
LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NON_GATED = {"gpt2", "gpt_neox", "gptj", "opt", "bloom", "falcon", "phi", "starcoder2"}
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef]")


def _cfg(config: dict, *names: str, default=None):
    return next((config[n] for n in names if config.get(n) is not None), default)


def linear_shapes(config: dict) -> dict[str, tuple[int, int, bool]]:
    """One decoder layer's linear layers: name → (in, out, has bias), llama-style names."""
    h = _cfg(config, "hidden_size", "n_embd", "d_model")
    heads = _cfg(config, "num_attention_heads", "n_head")
    kv = _cfg(config, "num_key_value_heads", default=heads)
    hd = _cfg(config, "head_dim", default=h // heads)
    inter = _cfg(config, "intermediate_size", "n_inner", default=4 * h)
    qkv_bias = bool(config.get("attention_bias", config.get("model_type") in ("qwen2", "qwen2_moe")))
    mlp_bias = bool(config.get("mlp_bias", False))
    shapes = {"q_proj": (h, heads * hd, qkv_bias), "k_proj": (h, kv * hd, qkv_bias),
              "v_proj": (h, kv * hd, qkv_bias), "o_proj": (heads * hd, h, bool(config.get("attention_bias"))),
              "gate_proj": (h, inter, mlp_bias), "up_proj": (h, inter, mlp_bias), "down_proj": (inter, h, mlp_bias)}
    if config.get("model_type") in NON_GATED:
        del shapes["gate_proj"]
    return shapes


def count_params(config: dict, method: str, rank: int, targets: list[str] | None) -> dict:
    """Total, linear (quantisable) and trainable parameters of a dense decoder from its config.json."""
    config = config.get("text_config") or config
    h, layers = _cfg(config, "hidden_size", "n_embd", "d_model"), _cfg(config, "num_hidden_layers", "n_layer")
    vocab = config["vocab_size"]
    shapes = linear_shapes(config)
    linear = layers * sum(i * o for i, o, _ in shapes.values())
    biases = layers * sum(o for _, o, b in shapes.values() if b)
    tied = config.get("tie_word_embeddings", True)
    total = vocab * h * (1 if tied else 2) + linear + biases + layers * 2 * h + h
    wanted = [t.rsplit(".", 1)[-1] for t in targets] if targets else ["all-linear"]
    chosen = list(shapes) if "all-linear" in wanted else [t for t in wanted if t in shapes]
    unknown = [t for t in wanted if t != "all-linear" and t not in shapes]
    lora = layers * sum(rank * (shapes[t][0] + shapes[t][1]) for t in chosen)
    act = config.get("hidden_act") or config.get("hidden_activation") or "silu"    # transformers' default
    # a SwiGLU MLP with an adapted down projection can compute that projection's input again (recompute_mlp)
    swiglu = "gate_proj" in shapes and "down_proj" in chosen and act in ("silu", "swish")
    return {"total": total, "linear": linear, "trainable": total if method == "full" else lora,
            "target_modules": chosen, "unknown_targets": unknown, "hidden": h, "layers": layers, "vocab": vocab,
            "recomputable_width": shapes["down_proj"][0] if swiglu else 0}


def checkpointed_layers(layers: int, every: int) -> int:
    """How many of ``layers`` decoder layers are checkpointed when every ``every``-th one is (the first, the
    (every+1)-th, …: transformers' ``every_n_layers``)."""
    return math.ceil(layers / max(1, every))


def estimate_vram(params: dict, method: str, batch: int, seq: int, *, checkpointing: bool, every: int = 1,
                  liger: bool = False, lora_dropout: float = 0.05, shards: int = 1, fused_lora: bool = False,
                  recompute_mlp: bool = False) -> dict:
    """The VRAM terms of the module docstring, in GiB (``liger``: the fused kernels the worker uses from
    ``LIGER_MIN_PARAMS`` parameters on a GPU — no logits, fewer activations; ``fused_lora``: the fused LoRA
    layer, with Liger; ``every``: with checkpointing, only every ``every``-th layer is checkpointed, the others
    keep their activations; ``recompute_mlp``: with the fused layer, the layers not checkpointed keep 2 B per
    intermediate feature less — the down projection's input, computed again)."""
    weights = (NF4_BYTES * params["linear"] + 2 * (params["total"] - params["linear"]) if method == "qlora"
               else 2 * params["total"])
    trainable = 16 * params["trainable"]
    weights, trainable = weights / shards, trainable / shards    # FSDP: each GPU keeps 1/shards of both
    dropout = K_LORA_DROPOUT if method != "full" and lora_dropout > 0 else 0
    layers = params["layers"]
    kept = checkpointed_layers(layers, every) if checkpointing else 0
    fused_lora = fused_lora and method == "lora"
    k_full = K_ACT_FUSED if fused_lora else (K_ACT_LIGER if liger else K_ACT_BF16) + dropout
    recompute_mlp = recompute_mlp and fused_lora and params.get("recomputable_width", 0) > 0
    if recompute_mlp:
        k_full -= K_MLP_RECOMPUTED * params["recomputable_width"] / params["hidden"]
    k = ((layers - kept) * k_full + kept * K_ACT_CHECKPOINTED) / layers      # bytes per token·layer, on average
    j = 0 if liger else K_LOGITS_CHECKPOINTED if kept == layers else K_LOGITS
    acts = batch * seq * params["hidden"] * layers * k + batch * seq * params["vocab"] * j
    terms = {"weights_gb": weights / GIB, "trainable_states_gb": trainable / GIB, "activations_gb": acts / GIB,
             "overhead_gb": OVERHEAD_GIB}
    return {**{k: round(v, 3) for k, v in terms.items()}, "total_gb": round(sum(terms.values()), 2),
            "gradient_checkpointing": checkpointing, "checkpoint_every": every if checkpointing else None,
            "checkpointed_layers": kept, "layers": layers, "liger": liger, "fused_lora": fused_lora,
            "recompute_mlp": recompute_mlp, "fsdp_shards": shards,
            "k_activation_bytes": round(k, 2), "seq": seq, "batch": batch}


def lightest_checkpointing(params: dict, method: str, batch: int, seq: int, budget_gb: float, **terms) -> dict:
    """The checkpointed estimate that fits ``budget_gb`` with the fewest checkpointed layers (every layer
    checkpointed when none fits, so the caller sees the smallest footprint): each layer not checkpointed saves
    its recomputation, about 1/L of the 29 % that checkpointing every layer costs."""
    layers = params["layers"]
    for every in range(layers, 1, -1):
        if every < layers and checkpointed_layers(layers, every) == checkpointed_layers(layers, every + 1):
            continue        # same number of checkpointed layers as the sparser setting already tried
        estimate = estimate_vram(params, method, batch, seq, checkpointing=True, every=every, **terms)
        if estimate["total_gb"] <= budget_gb:
            return estimate
    return estimate_vram(params, method, batch, seq, checkpointing=True, every=1, **terms)


def gpu_kind(gpu: dict | None) -> tuple[str, bool]:
    """(table kind, known) for a GPU description; None means CPU."""
    if gpu is None:
        return "CPU", True
    name = str(gpu.get("name", "")).upper()
    kind = next((k for k in GPU_KINDS if k != "CPU" and k in name), None)
    return (kind, True) if kind else ("A100", False)


def tokens_per_second(total_params: int, method: str, gpu: dict | None, *, checkpointing: bool | float) -> float:
    """Assumed training throughput (see the module docstring); ``checkpointing``: the share of the layers
    checkpointed (``True`` = all), each costing its recomputation."""
    p = max(total_params, 1)
    if p <= P_7B:
        h200 = TPS_SMALL * (p / P_SMALL) ** (-math.log(TPS_SMALL / TPS_7B) / math.log(P_7B / P_SMALL))
    else:
        h200 = TPS_7B * P_7B / p
    factor, cap = GPU_KINDS[gpu_kind(gpu)[0]]
    tps = min(h200 * factor, cap) * METHOD_SPEED[method]
    share = float(checkpointing)
    return tps / (1.0 + (1.0 / CHECKPOINTING_SPEED - 1.0) * share)


def token_lengths(texts: list[str], tokenizer=None) -> tuple[list[int], str]:
    """Token counts of ``texts`` with the tokenizer (fast path when it has one), else the CJK/Latin estimate."""
    if tokenizer is None:
        return [len(_CJK.findall(t)) + math.ceil(len(_CJK.sub("", t)) / 4) for t in texts], "estimate"
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]], "tokenizer"
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)

    def count(chunk: list[str]) -> list[int]:
        return [len(e) for e in encode(chunk, add_special_tokens=False)]

    # The Rust encoder releases the GIL, and TOKENIZERS_PARALLELISM is off in tests and job subprocesses,
    # so a few Python threads on separate chunks are what makes a 10k-row preflight take ~1 s, not ~2.
    workers = min(TOKENIZER_THREADS, os.cpu_count() or 1)
    if workers < 2 or len(texts) < 2 * TOKENIZER_CHUNK:
        return count(texts), "tokenizer"
    size = max(TOKENIZER_CHUNK, math.ceil(len(texts) / workers))
    with ThreadPoolExecutor(workers) as pool:
        parts = pool.map(count, [texts[i:i + size] for i in range(0, len(texts), size)])
        return [n for part in parts for n in part], "tokenizer"


def _load(spec, rows_or_path, tokenizer) -> PreparedData:
    if isinstance(rows_or_path, PreparedData):
        return rows_or_path
    if isinstance(rows_or_path, Mapping):
        return PreparedData(train=list(rows_or_path.get("train", [])), eval=list(rows_or_path.get("eval", [])),
                            format=rows_or_path.get("format", "prepared"), container="memory", chat_template=False)
    path = Path(rows_or_path)
    return read_prepared(path) if path.is_dir() else render_dataset(spec, path, tokenizer)


def _warn(out: list, level: str, code: str, message: str, **data) -> None:
    """One finding; ``data``: the numbers in it, for the message in another language."""
    out.append({"level": level, "code": code, "message": message, **({"data": data} if data else {})})


def _length_stats(data: PreparedData, spec, tokenizer) -> dict:
    rows = data.train + data.eval
    picked = range(len(rows))
    if len(rows) > TOKEN_SAMPLE:
        picked = sorted(random.Random(spec.seed).sample(range(len(rows)), TOKEN_SAMPLE))
    # Prompt and completion counted apart (the sum is the row's length, give or take a token at the seam):
    # a prompt that fills max_seq_len leaves nothing to learn from, and the trainer drops that row.
    counted, method = token_lengths([rows[i][key] for i in picked for key in ("prompt", "completion")], tokenizer)
    prompts = counted[0::2]
    lengths = [a + b for a, b in zip(prompts, counted[1::2], strict=True)]
    ordered = sorted(lengths)
    scale = len(rows) / max(len(lengths), 1)
    train_clipped = [min(n, spec.max_seq_len) for i, n in zip(picked, lengths, strict=True) if i < len(data.train)]
    per_train_row = sum(train_clipped) / max(len(train_clipped), 1)

    def pct(q: float) -> int:
        return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)] if ordered else 0

    padded = _padded_tokens(train_clipped, spec.batch_size, spec.seed) * len(data.train) / max(len(train_clipped), 1)
    cut = round(sum(n > spec.max_seq_len for n in lengths) * scale)
    train_prompts = [n for i, n in zip(picked, prompts, strict=True) if i < len(data.train)]
    full = sum(n >= spec.max_seq_len for n in train_prompts)
    return {"method": method, "sampled_rows": len(lengths) if scale > 1 else None,
            "min": ordered[0] if ordered else 0, "median": pct(0.5), "p95": pct(0.95), "max": ordered[-1] if ordered
            else 0, "mean": round(sum(lengths) / max(len(lengths), 1), 1), "rows_cut": cut,
            "rows_cut_fraction": round(cut / max(len(rows), 1), 4),
            "prompt_median": sorted(prompts)[len(prompts) // 2] if prompts else 0,
            "rows_no_room": round(full * scale), "rows_no_room_fraction": round(full / max(len(train_prompts), 1), 4),
            "tokens_per_epoch": round(per_train_row * len(data.train)),
            "padded_tokens_per_epoch": round(max(padded, per_train_row * len(data.train)))}


def _padded_tokens(lengths: list[int], batch: int, seed: int) -> int:
    """Tokens a GPU processes for one epoch of rows of ``lengths`` without packing: each batch (rows in random
    order, as the Trainer samples them) is padded to its longest row."""
    order = list(lengths)
    random.Random(seed).shuffle(order)
    return sum(len(chunk) * max(chunk) for chunk in (order[i:i + batch] for i in range(0, len(order), max(1, batch))))


def data_parallel(spec, gpu: dict | None) -> int:
    """Training processes: the GPUs the spec asks for, else every GPU the worker has (``gpu["count"]``), else 1."""
    if getattr(spec, "gpus", None):
        return int(spec.gpus)
    return max(int((gpu or {}).get("count") or 1), 1)


def _schedule(spec, n_train: int, tokens_per_epoch: int, gpus: int = 1) -> dict:
    sequences = math.ceil(tokens_per_epoch / spec.max_seq_len) if spec.packing else n_train
    per_gpu_batches = math.ceil(math.ceil(sequences / spec.batch_size) / gpus)
    steps_per_epoch = max(1, math.ceil(per_gpu_batches / spec.grad_accum))
    total = spec.max_steps or max(1, math.ceil(spec.epochs * steps_per_epoch))
    return {"epochs": spec.epochs, "max_steps": spec.max_steps, "batch_size": spec.batch_size,
            "grad_accum": spec.grad_accum, "gpus": gpus, "effective_batch": spec.batch_size * spec.grad_accum * gpus,
            "packing": spec.packing, "steps_per_epoch": steps_per_epoch, "total_steps": total,
            "total_tokens": round(tokens_per_epoch * total / steps_per_epoch)}


def uses_fused_lora(gpu: dict | None, spec) -> bool:
    """Whether the worker trains this job with the fused LoRA layer by default (``speed.choose``: LoRA, on a
    GPU, with stackwise's own engine)."""
    return gpu is not None and spec.method == "lora" and getattr(spec, "engine", "auto") != "unsloth"


def uses_liger(total_params: int, gpu: dict | None, spec) -> bool:
    """Whether the worker trains this job with Liger kernels by default (``speed.choose``: from LIGER_MIN_PARAMS
    parameters or with the fused LoRA layer, on a GPU, with stackwise's own engine)."""
    from tools.finetune.speed import LIGER_MIN_PARAMS

    return (gpu is not None and getattr(spec, "engine", "auto") != "unsloth"
            and (total_params >= LIGER_MIN_PARAMS or uses_fused_lora(gpu, spec)))


def fused_speed(total_params: int) -> float:
    """The fused LoRA layer's (with Liger) measured speed-up over plain transformers + peft, by model size."""
    (p0, f0), (p1, f1) = FUSED_SPEED
    x = min(max((math.log(max(total_params, 1)) - math.log(p0)) / (math.log(p1) - math.log(p0)), 0.0), 1.0)
    return f0 + (f1 - f0) * x


def host_bound_tokens_per_second(layers: int, params: dict, method: str, step_tokens: int,
                                 gpu: dict | None) -> float:
    """The most tokens/s the host can launch on a GPU: ``step_tokens`` per step over the step's host time
    (``HOST_S_LAYER`` per decoder layer and ``HOST_S_ADAPTER`` per adapted linear layer in it); no cap without
    a GPU (the CPU's own arithmetic is the bound there)."""
    if gpu is None or gpu_kind(gpu)[0] == "CPU":
        return math.inf
    adapters = 0 if method == "full" else len(params.get("target_modules") or ())
    return step_tokens / (max(layers, 1) * (HOST_S_LAYER + adapters * HOST_S_ADAPTER))


def parallel_speedup(gpus: int) -> float:
    """Throughput of ``gpus`` data-parallel GPUs relative to one (DP_EFFICIENCY per added GPU's share)."""
    return 1.0 if gpus <= 1 else gpus * DP_EFFICIENCY


def _check_gpu_count(warnings: list, spec, gpu: dict | None) -> None:
    asked = getattr(spec, "gpus", None)
    if not asked or asked <= 1 and gpu is not None:
        return
    have = 0 if gpu is None else int(gpu.get("count") or 1)
    if asked > have:
        where = "has no GPU" if have == 0 else f"has {have} GPU{'s' if have > 1 else ''}"
        _warn(warnings, "error", "not_enough_gpus", f"The job asks for gpus={asked}, but the worker {where}; "
                                                    f"ask for {max(have, 1) if have else 'none (leave gpus out)'}.")


def preflight(spec, rows_or_path, tokenizer, model_config: dict | None, gpu: dict | None) -> dict:
    """Check a job before it is queued: numbers the user confirms against, and warnings.

    ``rows_or_path``: a :class:`PreparedData`, a ``{"train": [...], "eval": [...]}`` mapping of rendered
    rows, a prepared run ``data/`` directory, or the user's data file (read and rendered here).
    ``model_config``: the base model's ``config.json`` as a dict (None: no parameter/VRAM/time estimate).
    ``gpu``: ``{"name", "memory_gb"}`` or None for CPU. ``ok`` is False when an error-level warning is present.
    """
    data = _load(spec, rows_or_path, tokenizer)
    warnings: list[dict] = []
    n_train, n_eval = len(data.train), len(data.eval)
    lengths = _length_stats(data, spec, tokenizer)
    gpus = data_parallel(spec, gpu)
    schedule = _schedule(spec, n_train, lengths["tokens_per_epoch"], gpus)
    # what the GPU processes: padding included unless the rows are packed (padding-free)
    padded = lengths["padded_tokens_per_epoch"]
    padding = 0.0 if spec.packing or padded <= 0 else 1 - lengths["tokens_per_epoch"] / padded
    schedule["padding_fraction"] = round(padding, 4)
    schedule["processed_tokens"] = round(schedule["total_tokens"] / (1 - padding))
    if PACKING_HINT_PADDING <= padding < 1:
        _warn(warnings, "info", "packing", f"About {padding:.0%} of the tokens each step processes are padding "
                                           f"(batches of {spec.batch_size} rows of different lengths). Packing the "
                                           "rows padding-free (packing: true; no attention between rows) would be "
                                           f"about {1 / (1 - padding):.1f}× faster here — answer no and ask again "
                                           "\"… with packing\".", padding=padding, speedup=1 / (1 - padding),
              batch=spec.batch_size)
    if n_train + n_eval < 50:
        _warn(warnings, "warning", "tiny_dataset", f"Only {n_train + n_eval} rows: the model will barely change "
                                                   "and may just memorise them; a few hundred rows or more is typical.")
    if n_eval == 0:
        _warn(warnings, "warning", "no_eval", "No rows are held out for evaluation (fewer than 10 rows or "
                                              "eval_fraction 0): there will be no eval loss and no before/after check.")
    if spec.method == "full" and spec.learning_rate > 5e-5:
        _warn(warnings, "warning", "high_lr", f"learning_rate {spec.learning_rate:g} is high for full fine-tuning "
                                              "(1e-5 to 5e-5 is usual); it can wreck the base model.")
    if spec.method != "full" and spec.learning_rate > 1e-3:
        _warn(warnings, "warning", "high_lr", f"learning_rate {spec.learning_rate:g} is high for LoRA "
                                              "(1e-4 to 3e-4 is usual); the loss may diverge.")
    if lengths["rows_cut_fraction"] > 0.05:
        _warn(warnings, "warning", "rows_cut", f"{lengths['rows_cut']:,} rows ({lengths['rows_cut_fraction']:.0%}) "
                                               f"are longer than max_seq_len {spec.max_seq_len} and will be cut "
                                               f"(p95 length {lengths['p95']}); raise max_seq_len or drop long rows.")
    if n_train and lengths["rows_no_room_fraction"] >= 1:
        _warn(warnings, "error", "no_room",
              f"Every training row's prompt alone is at least max_seq_len {spec.max_seq_len} tokens (median prompt "
              f"{lengths['prompt_median']}), so no answer token is left to learn from; raise max_seq_len.")
    elif lengths["rows_no_room_fraction"] > 0.05:
        _warn(warnings, "warning", "no_room", f"{lengths['rows_no_room']:,} training rows "
                                              f"({lengths['rows_no_room_fraction']:.0%}) have a prompt of max_seq_len "
                                              f"{spec.max_seq_len} tokens or more; they are skipped.")
    _check_gpu_count(warnings, spec, gpu)
    if spec.method == "qlora" and gpu is None:
        _warn(warnings, "error", "qlora_needs_gpu", "QLoRA needs a CUDA GPU (bitsandbytes 4-bit kernels); "
                                                    "use method 'lora' on CPU.")
    result = {"rows": {"train": n_train, "eval": n_eval, "total": n_train + n_eval}, "format": data.format,
              "container": data.container, "tokens": lengths, "max_seq_len": spec.max_seq_len,
              "rows_cut": lengths["rows_cut"], "training": schedule, "params": None, "vram": None,
              "time": None, "gpu": gpu, "fits": None, "gradient_checkpointing": False, "recompute_mlp": False,
              "fsdp": False,
              "warnings": warnings}
    if model_config:
        _model_checks(result, spec, model_config, gpu, lengths, schedule, warnings)
    result["ok"] = not any(w["level"] == "error" for w in warnings)
    return result


def _model_checks(result: dict, spec, config: dict, gpu: dict | None, lengths: dict, schedule: dict,
                  warnings: list) -> None:
    params = count_params(config, spec.method, spec.lora_rank, spec.target_modules)
    if params["unknown_targets"]:
        names, known = ", ".join(params["unknown_targets"]), ", ".join(LINEAR_MODULES)
        _warn(warnings, "warning", "unknown_targets",
              f"target_modules {names} are not linear layers of this model ({known}); they add no parameters here.")
    max_pos = _cfg(config.get("text_config") or config, "max_position_embeddings", "n_positions")
    if max_pos and spec.max_seq_len > max_pos:
        _warn(warnings, "warning", "seq_beyond_model", f"max_seq_len {spec.max_seq_len} is beyond the model's "
                                                       f"max_position_embeddings {max_pos}.")
    seq = spec.max_seq_len if spec.packing else max(1, min(spec.max_seq_len, lengths["max"]))
    liger = uses_liger(params["total"], gpu, spec)
    fused = uses_fused_lora(gpu, spec)
    terms = {"liger": liger, "lora_dropout": spec.lora_dropout, "fused_lora": fused}
    plain = estimate_vram(params, spec.method, spec.batch_size, seq, checkpointing=False, **terms)
    checkpointed = estimate_vram(params, spec.method, spec.batch_size, seq, checkpointing=True, **terms)
    vram, fits = plain, None
    if gpu is not None:
        budget = float(gpu.get("memory_gb") or 0) * FIT_SHARE
        fits = plain["total_gb"] <= budget or checkpointed["total_gb"] <= budget
        if not fits and spec.method == "full" and schedule["gpus"] > 1:   # shard it (FSDP) over the GPUs
            terms["shards"] = schedule["gpus"]
            plain = estimate_vram(params, spec.method, spec.batch_size, seq, checkpointing=False, **terms)
            checkpointed = estimate_vram(params, spec.method, spec.batch_size, seq, checkpointing=True, **terms)
            fits = plain["total_gb"] <= budget or checkpointed["total_gb"] <= budget
            vram, result["fsdp"] = plain, fits
            if fits:
                _warn(warnings, "info", "fsdp", f"One GPU cannot hold this full fine-tune, so its weights, gradients "
                                                f"and optimizer state are sharded over {schedule['gpus']} GPUs (FSDP).")
        if plain["total_gb"] > budget and fits:
            # the cheapest memory first: with the fused layer the MLPs compute their down projection's input
            # again (1.5 % of the speed; estimate_vram ignores it otherwise), then only as many layers
            # checkpointed as the memory still needs (FSDP checkpoints all of them, its own way)
            terms["recompute_mlp"] = True
            lean = estimate_vram(params, spec.method, spec.batch_size, seq, checkpointing=False, **terms)
            vram = lean if lean["total_gb"] <= budget else checkpointed if result["fsdp"] else \
                lightest_checkpointing(params, spec.method, spec.batch_size, seq, budget, **terms)
        if not fits:
            _warn(warnings, "error", "no_fit", f"The job needs about {checkpointed['total_gb']:.0f} GiB even with "
                                               f"gradient checkpointing; {gpu.get('name', 'the GPU')} has "
                                               f"{gpu.get('memory_gb')} GiB. Use QLoRA, a smaller batch_size or a "
                                               "shorter max_seq_len.")
    tps = tokens_per_second(params["total"], spec.method, gpu,
                            checkpointing=vram["checkpointed_layers"] / vram["layers"])
    speedup = fused_speed(params["total"]) if fused else LIGER_SPEED if liger else 1.0
    speedup *= RECOMPUTE_MLP_SPEED if vram["recompute_mlp"] else 1.0
    tps *= speedup
    host_tps = host_bound_tokens_per_second(vram["layers"], params, spec.method, spec.batch_size * seq, gpu)
    host_bound = host_tps < tps
    tps = min(tps, host_tps) * parallel_speedup(schedule["gpus"])
    kind, known = gpu_kind(gpu)
    seconds = schedule["processed_tokens"] / tps
    result.update(params={k: params[k] for k in ("total", "trainable", "linear", "target_modules")} |
                  {"trainable_fraction": round(params["trainable"] / params["total"], 6), "method": spec.method},
                  vram=vram | {"per_gpu": True, "without_checkpointing_gb": plain["total_gb"],
                               "with_checkpointing_gb": checkpointed["total_gb"]},
                  fits=fits, gradient_checkpointing=vram["gradient_checkpointing"],
                  recompute_mlp=vram["recompute_mlp"],
                  time={"tokens_per_s": round(tps), "seconds": round(seconds), "gpu_kind": kind,
                        "basis": f"DESIGN §9 H200 LoRA baseline scaled by parameter count, × {kind} factor"
                                 + ("" if known else " (unknown GPU, assumed A100-class)")
                                 + (f", × {speedup:.2f} with the fused LoRA layer and Liger kernels"
                                    + (" (the MLPs recomputing their down projection's input)"
                                       if vram["recompute_mlp"] else "") if fused
                                    else ", × 1.16 with Liger kernels" if liger else "")
                                 + (f"; capped by the host's kernel launches ({host_tps:,.0f} tokens/s at "
                                    f"batch {spec.batch_size})" if host_bound else "")
                                 + (f", × {parallel_speedup(schedule['gpus']):.2f} on {schedule['gpus']} GPUs"
                                    if schedule["gpus"] > 1 else "")
                                 + (f"; {schedule['padding_fraction']:.0%} of the processed tokens are padding"
                                    if schedule["padding_fraction"] >= 0.01 else "")})
    if gpu is None and seconds > 3600:
        _warn(warnings, "warning", "slow_on_cpu", f"On CPU this takes about {seconds / 3600:,.0f} h; use a GPU.")


def user_gpu_advice(spec, config: dict | None, report: dict, user_gpu: dict | None, lang: str = "en") -> dict | None:
    """Advice for the GPU the user told us they have (user memory; the worker's GPU may be another): a warning
    with the QLoRA estimate when the job will not fit it, an info line when it fits, None without a GPU
    description or a model size. The user's "GB" are taken as GiB."""
    zh = lang == "zh"
    if not user_gpu:
        return None
    if user_gpu.get("none"):
        if spec.method != "qlora":
            return None
        return {"level": "warning", "code": "user_no_gpu", "message": (
            "你说过你没有 GPU：QLoRA 需要 CUDA GPU，只能在有 GPU 的 worker 上运行。" if zh else
            "You told me you have no GPU: QLoRA needs a CUDA GPU, so it only runs on a worker that has one.")}
    memory_gb, name = user_gpu.get("memory_gb"), user_gpu.get("name") or ("你的显卡" if zh else "your GPU")
    if not memory_gb or not config or not report.get("vram"):
        return None
    seq, budget = report["vram"]["seq"], float(memory_gb) * FIT_SHARE

    def need(method: str) -> float:
        params = count_params(config, method, spec.lora_rank, spec.target_modules)
        liger = uses_liger(params["total"], user_gpu, spec)
        return min(estimate_vram(params, method, spec.batch_size, seq, checkpointing=c, liger=liger,
                                 lora_dropout=spec.lora_dropout, fused_lora=uses_fused_lora(user_gpu, spec)
                                 )["total_gb"] for c in (0, 1))

    try:
        needed = need(spec.method)
        qlora = need("qlora") if spec.method != "qlora" else needed
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    gb = f"{float(memory_gb):g}"
    if needed <= budget:
        return {"level": "info", "code": "user_gpu_fits", "message": (
            f"放得下你的 {name}（{gb} GB）：约 {needed:.1f} GiB。" if zh else
            f"Fits your {name} ({gb} GB): about {needed:.1f} GiB.")}
    method = {"lora": "LoRA", "qlora": "QLoRA", "full": "全参" if zh else "full fine-tuning"}[spec.method]
    if spec.method != "qlora" and qlora <= budget:
        return {"level": "warning", "code": "user_gpu_no_fit", "suggest": {"method": "qlora"}, "message": (
            f"你说过你的显卡是 {name}（{gb} GB）：这个 {method} 任务即使开启梯度检查点"
            f"也需要约 {needed:.0f} GiB，放不下。改用 QLoRA 约需 {qlora:.1f} GiB，可以放下——"
            "回复“否”，再用 QLoRA 重新提交（例如“……用 qlora”）。" if zh else
            f"On your {name} ({gb} GB, as you told me) this {method} job does not fit: it needs about {needed:.0f} GiB "
            f"even with gradient checkpointing. QLoRA would need about {qlora:.1f} GiB and fits — answer no and ask "
            "again with QLoRA (e.g. \"… with qlora\").")}
    return {"level": "warning", "code": "user_gpu_no_fit", "message": (
        f"你说过你的显卡是 {name}（{gb} GB）：这个任务约需 {min(needed, qlora):.0f} GiB"
        "（QLoRA 也放不下）。请换更小的模型，或减小 batch_size / max_seq_len。" if zh else
        f"On your {name} ({gb} GB, as you told me) this job does not fit: it needs about {min(needed, qlora):.0f} GiB "
        "even with QLoRA. Use a smaller model, batch_size or max_seq_len.")}
