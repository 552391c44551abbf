"""Training-speed benchmark: the plain transformers + peft baseline and our speed-ups, in the same run on the
same GPU, with the same data and seed — tokens/s, peak memory, MFU and the loss after N steps, as ratios.

Each (shape, method, variant) runs in a fresh subprocess (Liger patches model classes process-wide), on a
Qwen2-architecture model with random weights at the real shape (saved once per shape, so QLoRA loads it through
bitsandbytes as a user's model would). The training step is the same in every variant: LoRA r16 α32 dropout
``--dropout`` (0.05) on all linear layers (peft), bf16, SDPA attention, AdamW lr 2e-4, random token batches of
``--batch`` × ``--seq`` with the labels = the inputs. Variants add speed-ups from ``tools/finetune/speed.py``:

    base        plain transformers + peft (the DESIGN §9 baseline)
    base_gc     + gradient checkpointing (non-reentrant)
    liger       + Liger kernels (RMSNorm, SwiGLU, RoPE, fused linear cross-entropy)
    liger_fused + fused AdamW
    liger_gc    liger_fused + gradient checkpointing (the memory-lean setting)
    liger_ckpt2 liger + gradient checkpointing on every 2nd layer only (PartialCheckpointing; ckpt4: every 4th)
    liger_fp8   liger + FP8 matmuls for the frozen base weights (tools/finetune/fp8.py; bf16 weights on the host)
    liger_fp8_ckpt2 / liger_fp8_ckpt4   the same + checkpointing on every 2nd / 4th layer
    fp8         base + FP8 frozen weights (no Liger)
    liger_compile   liger + torch.compile of the whole model
    fused       base + the fused LoRA layer (tools/finetune/fused_lora.py: adapter in bf16, no fp32 copies)
    fast        liger + fused LoRA (our default path on a GPU); fast_ckpt2/4, fast_fp8, fast_fp8_ckpt2/4,
                fast_packed, fused_fp8: the same with partial checkpointing / FP8 / packing; fast_keep: the
                dropped-out inputs kept for the backward instead of drawn again (memory for a kernel pass);
                fast_flat: the fused layer without its thin-matmul dropout kernels (one flat dropout kernel
                with PyTorch matmuls around it; tools/finetune/lora_kernels.py); fast_graphs: fast with each
                decoder layer replayed as a CUDA graph (tools/finetune/layer_graphs.py: the host's launch cost
                gone; dropout seeds read on the device; full-length rows); fast_rows / fast_rows_graphs
                (with --lengths real): packed as --batch rows of --seq tokens (tools/finetune/row_packing.py),
                without / with the graphs; fast_mlp: fast with each SwiGLU MLP computing the down
                projection's input again in the backward instead of keeping it (fused_lora recompute_mlp),
                fast_mlp_ckpt7 / fast_ckpt7: with / without it, every 7th layer checkpointed; fast_mlp_graphs:
                with the CUDA graphs too
    packed      (with --lengths real) the same rows packed padding-free instead of padded batches

``--lengths real`` trains rows of chain-of-thought-like lengths (log-normal, median 700 tokens, cut to --seq)
instead of full-length random sequences: the baseline pads each batch of --batch rows to its longest row, the
``packed`` variant concatenates rows into --batch × --seq tokens per step with position ids restarting per row;
tokens/s then counts real (non-padding) tokens only.

    python evals/gpu/speed_bench.py --out OUT --configs 7b:lora,7b:qlora --variants base,liger,liger_fused
    (variants: base, base_gc, liger, liger_fused, liger_gc, unsloth, unsloth_gc — the last two when unsloth is
    installed on the GPU machine)
        [--steps 30] [--warmup 3] [--batch 4] [--seq 2048]

Prints one table per configuration and writes ``OUT/speed-<shape>-<method>.json``. MFU uses the FLOP count in
``tools/finetune/speed.py`` (LoRA ≈ 4P + 2·P_trainable + 6·s·h·L per token) against 989 TFLOP/s dense bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = {
    "base": {},
    "base_gc": {"gc": True},
    "liger": {"liger": True},
    "liger_fused": {"liger": True, "fused_adamw": True},
    "liger_gc": {"liger": True, "fused_adamw": True, "gc": True},
    "liger_ckpt2": {"liger": True, "gc": True, "every": 2},
    "liger_ckpt4": {"liger": True, "gc": True, "every": 4},
    "fp8": {"fp8": True},
    "liger_fp8": {"liger": True, "fp8": True},
    "liger_fp8_ckpt2": {"liger": True, "fp8": True, "gc": True, "every": 2},
    "liger_fp8_ckpt4": {"liger": True, "fp8": True, "gc": True, "every": 4},
    "liger_compile": {"liger": True, "compile": True},
    "packed": {"packed": True},
    "fused": {"fused_lora": True},
    "fast": {"liger": True, "fused_lora": True},
    "fast_ckpt2": {"liger": True, "fused_lora": True, "gc": True, "every": 2},
    "fast_ckpt4": {"liger": True, "fused_lora": True, "gc": True, "every": 4},
    "fast_fp8": {"liger": True, "fused_lora": True, "fp8": True},
    "fast_fp8_ckpt2": {"liger": True, "fused_lora": True, "fp8": True, "gc": True, "every": 2},
    "fast_fp8_ckpt4": {"liger": True, "fused_lora": True, "fp8": True, "gc": True, "every": 4},
    "fast_packed": {"liger": True, "fused_lora": True, "packed": True},
    "fast_keep": {"liger": True, "fused_lora": True, "keep_dropped": True, "kernels": False},
    "fast_flat": {"liger": True, "fused_lora": True, "kernels": False},
    "fast_graphs": {"liger": True, "fused_lora": True, "graphs": True},   # full-length rows
    "fast_rows": {"liger": True, "fused_lora": True, "packed": "rows"},   # --lengths real: packed rows of --seq
    "fast_rows_graphs": {"liger": True, "fused_lora": True, "packed": "rows", "graphs": True},
    "fast_mlp": {"liger": True, "fused_lora": True, "recompute_mlp": True},
    "fast_mlp_ckpt7": {"liger": True, "fused_lora": True, "recompute_mlp": True, "gc": True, "every": 7},
    "fast_ckpt7": {"liger": True, "fused_lora": True, "gc": True, "every": 7},
    "fast_mlp_graphs": {"liger": True, "fused_lora": True, "recompute_mlp": True, "graphs": True},
    "fused_fp8": {"fused_lora": True, "fp8": True},
    "liger_packed": {"liger": True, "packed": True},
    "unsloth": {"unsloth": True},                 # unsloth's FastLanguageModel (when installed; needs a GPU)
    "unsloth_gc": {"unsloth": True, "gc": True},  # ... with its own ("unsloth") gradient checkpointing
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def model_dir(shape: str, work: Path) -> Path:
    """The random-weight model at ``shape``, saved once (bf16 safetensors + the tiny tokenizer)."""
    from transformers import AutoTokenizer

    from evals.gpu.finetune_check import SHAPES, build_model
    from evals.gpu.worker_check import TINY
    from tools.finetune.tiny import build_tiny_model

    folder = work / f"model-{shape}"
    if not (folder / "config.json").is_file():
        tokenizer = work / "tokenizer"
        if not (tokenizer / "tokenizer.json").is_file():
            build_tiny_model(tokenizer)
        SHAPES.setdefault("tiny", {**TINY, "vocab_size": len(AutoTokenizer.from_pretrained(tokenizer))})
        build_model(shape, folder, tokenizer)
    return folder


def unsloth_model(folder: Path, method: str, options: dict, args: argparse.Namespace):
    """The same LoRA (r16, α32, --dropout, all linear layers) built by unsloth's FastLanguageModel."""
    import torch
    from unsloth import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(model_name=str(folder), max_seq_length=args.seq, dtype=torch.bfloat16,
                                                 load_in_4bit=method == "qlora", local_files_only=True)
    return FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, lora_dropout=args.dropout,
                                            target_modules=LORA_TARGETS,
                                            bias="none", random_state=0,
                                            use_gradient_checkpointing="unsloth" if options.get("gc") else False)


def apply_variant(model, options: dict, speed, *, cuda: bool, offload: bool):
    """The speed-ups a variant adds to a built LoRA model: partial checkpointing (``every``), FP8 frozen weights
    (``fp8``; recorded in ``speed``), ``torch.compile`` (``compile``). Returns the model to train."""
    if options.get("every"):
        from tools.finetune.train_config import PartialCheckpointing

        PartialCheckpointing(options["every"]).apply(model)
    if options.get("fused_lora"):
        from tools.finetune import fused_lora

        if len(fused_lora.enable(model, keep_dropped=bool(options.get("keep_dropped")),
                                 kernels=bool(options.get("kernels", True)),
                                 device_seeds=bool(options.get("graphs")),
                                 recompute_mlp=bool(options.get("recompute_mlp")))):
            speed.applied.append("fused_lora")
        else:
            speed.skipped["fused_lora"] = "no LoRA layer it can take"
    if options.get("fp8"):
        from tools.finetune import fp8

        reason = fp8.supported(cuda)
        if reason:
            speed.skipped["fp8"] = reason
        else:
            fp8.enable(model, offload=offload)
            speed.applied.append("fp8")
    if options.get("compile"):
        import torch

        model = torch.compile(model)
    return model


def report_one(measure, labels: dict) -> int:
    """The child side of one isolated measurement: ``measure()``'s row (or its failure, as a row with
    ``labels``) printed as one ``RESULT`` line, so that a failing variant never stops the others."""
    try:
        result = measure()
    except Exception as exc:    # report the failure as a row; the other variants still run
        result = {**labels, "error": f"{type(exc).__name__}: {str(exc)[:500]}"}
    print("RESULT " + json.dumps(result), flush=True)
    return 0


def run_isolated(cmd: list[str], labels: dict) -> dict:
    """The parent side: run ``cmd`` (this script or another with ``--one``) in a fresh process (Liger patches
    model classes process-wide) and return its ``RESULT`` row, or a row with ``labels`` saying how it died."""
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=os.environ)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    return json.loads(line[7:]) if line else {**labels, "error": f"exit {proc.returncode}: {proc.stderr[-800:]}"}


def row_lengths(args: argparse.Namespace, count: int) -> list[int]:
    """Chain-of-thought-like row lengths: log-normal, median 700 tokens, between 64 and ``--seq``."""
    import random

    rng = random.Random(0)
    return [max(64, min(args.seq, round(rng.lognormvariate(6.55, 0.6)))) for _ in range(count)]


def make_batches(vocab: int, args: argparse.Namespace, *, packed: bool | str) -> list[dict]:
    """The steps' inputs. Full-length random sequences (labels = inputs), or with ``--lengths real`` the same
    stream of rows either padded per batch (attention mask, padding labelled -100) or packed padding-free into
    ``batch × seq`` tokens per step (position ids restart at each row; a row's first token predicts nothing) —
    as one flattened row (trl's padding-free packing), or with ``packed="rows"`` as ``batch`` rows of ``seq``
    tokens each, filled in order and padded at the end (position 0 and label -100 on padding; the trainer's
    ``tools/finetune/row_packing.py`` form, one fixed shape)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    steps = args.warmup + args.steps
    if args.lengths == "full":
        out = []
        for _ in range(steps):
            if args.data == "repeat":      # a random 64-token segment repeated: learnable by copying
                segment = torch.randint(0, vocab, (args.batch, 64), generator=generator)
                ids = segment.repeat(1, -(-args.seq // 64))[:, : args.seq].contiguous()
            else:
                ids = torch.randint(0, vocab, (args.batch, args.seq), generator=generator)
            out.append({"input_ids": ids, "labels": ids})
        return out
    lengths = iter(row_lengths(args, steps * args.batch * 8))
    rows = (torch.randint(0, vocab, (n,), generator=generator) for n in lengths)
    out = []
    pool: list = []
    for _ in range(steps):
        if packed == "rows":
            # best-fit decreasing over a window of rows (as trl's "bfd" packing): the rows that fit nowhere
            # wait for the next step
            while len(pool) < 8 * args.batch:
                pool.append(next(rows))
            pool.sort(key=len, reverse=True)
            bins: list[list] = [[] for _ in range(args.batch)]
            free = [args.seq] * args.batch
            left = []
            for row in pool:
                fits = [i for i in range(args.batch) if free[i] >= len(row)]
                if not fits:
                    left.append(row)
                    continue
                best = min(fits, key=lambda i: free[i] - len(row))
                bins[best].append(row)
                free[best] -= len(row)
            pool = left
            ids = torch.zeros(args.batch, args.seq, dtype=torch.long)
            positions = torch.zeros(args.batch, args.seq, dtype=torch.long)
            for i, parts in enumerate(bins):
                used = 0
                for row in parts:
                    ids[i, used:used + len(row)], positions[i, used:used + len(row)] = row, torch.arange(len(row))
                    used += len(row)
            labels = ids.masked_fill(positions == 0, -100)
            out.append({"input_ids": ids, "position_ids": positions, "labels": labels,
                        "real_tokens": args.batch * args.seq - sum(free)})
        elif packed:
            budget, parts = args.batch * args.seq, []
            while True:
                row = next(rows)
                if sum(len(p) for p in parts) + len(row) > budget:
                    break
                parts.append(row)
            ids = torch.cat(parts)[None]
            positions = torch.cat([torch.arange(len(p)) for p in parts])[None]
            labels = ids.clone()
            labels[positions == 0] = -100
            out.append({"input_ids": ids, "position_ids": positions, "labels": labels, "real_tokens": ids.numel()})
        else:
            parts = [next(rows) for _ in range(args.batch)]
            longest = max(len(p) for p in parts)
            ids = torch.zeros(args.batch, longest, dtype=torch.long)
            mask = torch.zeros(args.batch, longest, dtype=torch.long)
            for i, p in enumerate(parts):
                ids[i, : len(p)], mask[i, : len(p)] = p, 1
            labels = ids.masked_fill(mask == 0, -100)
            out.append({"input_ids": ids, "attention_mask": mask, "labels": labels,
                        "real_tokens": int(mask.sum())})
    return out


def profile_steps(model, optimizer, batches: list[dict], path: Path) -> None:
    """Two more steps under the PyTorch profiler; the kernels that took the most GPU time go to ``path``."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for batch in batches:
            inputs = {k: v.cuda(non_blocking=True) for k, v in batch.items() if k != "real_tokens"}
            model(**inputs).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
    path.write_text(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=70),
                    encoding="utf-8")


def run_one(shape: str, method: str, variant: str, args: argparse.Namespace) -> dict:
    """One measurement, in this process."""
    if VARIANTS[variant].get("unsloth"):
        import unsloth  # noqa: F401  (first: it patches transformers and peft as they are imported)
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

    from tools.finetune.speed import Speedups, apply_before_load, flops_per_token, mfu, optimizer_name

    options = VARIANTS[variant]
    cuda = torch.cuda.is_available()      # a CPU dry run of the script when there is no GPU
    folder = Path(args.work) / f"model-{shape}"
    config = AutoConfig.from_pretrained(folder).to_dict()
    speed = Speedups(liger=options.get("liger", False), fused_adamw=options.get("fused_adamw", False),
                     fp8=options.get("fp8", False))
    apply_before_load(speed, config["model_type"], cuda=cuda)
    kwargs = {"dtype": torch.bfloat16 if cuda else torch.float32, "attn_implementation": "sdpa"}
    if method == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_use_double_quant=True,
                                                           bnb_4bit_compute_dtype=torch.bfloat16)
        kwargs["device_map"] = {"": 0}
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    if options.get("unsloth"):
        model = unsloth_model(folder, method, options, args)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        if method != "qlora" and cuda:
            model.to("cuda")
        if options.get("gc"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=args.dropout,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
        model = apply_variant(model, options, speed, cuda=cuda, offload=True)
    model.config.use_cache = False
    model.train()
    batches = make_batches(config["vocab_size"], args, packed=options.get("packed", False))
    if options.get("graphs"):
        from tools.finetune import layer_graphs

        reason = layer_graphs.why_not(model, lora_dropout=args.dropout, device_seeds="fused_lora" in speed.applied)
        if reason:
            speed.skipped["graphs"] = reason
        else:
            layer_graphs.capture(model, {k: v.cuda() for k, v in batches[0].items() if k != "real_tokens"})
            speed.applied.append("graphs")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    params = [p for p in model.parameters() if p.requires_grad]
    fused = optimizer_name(speed, cuda=cuda) == "adamw_torch_fused"
    optimizer = torch.optim.AdamW(params, lr=2e-4, fused=fused) if fused else torch.optim.AdamW(params, lr=2e-4)
    torch.manual_seed(0)
    losses, started, real_tokens = [], None, 0
    for step, batch in enumerate(batches):
        if step == args.warmup:
            if cuda:
                torch.cuda.synchronize()
            started = time.perf_counter()
        inputs = {k: (v.cuda(non_blocking=True) if cuda else v) for k, v in batch.items() if k != "real_tokens"}
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())         # read after the loop: no host sync inside the timed steps
        if step >= args.warmup:
            real_tokens += int(batch["real_tokens"]) if "real_tokens" in batch else batch["input_ids"].numel()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    losses = [float(x) for x in losses]
    if args.profile and cuda:
        profile_steps(model, optimizer, batches[-2:], Path(args.out) / f"profile-{shape}-{method}-{variant}.txt")
    tokens_per_s = real_tokens / seconds
    per_token = flops_per_token(config, seq_len=args.seq, trainable=trainable, full=False)
    gpu = torch.cuda.get_device_name(0) if cuda else "cpu"
    return {"shape": shape, "method": method, "variant": variant, "gpu": gpu, "batch": args.batch,
            "seq": args.seq, "steps": args.steps, "warmup": args.warmup, "tokens_per_s": round(tokens_per_s, 1),
            "lengths": args.lengths, "dropout": args.dropout, "data": args.data,
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else 0.0,
            "mfu": round(mfu(tokens_per_s, per_token, gpu) or 0.0, 4), "flops_per_token": per_token,
            "final_loss": round(sum(losses[-5:]) / len(losses[-5:]), 5), "losses": [round(x, 5) for x in losses],
            "speed": speed.to_dict(), "trainable": trainable}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--configs", default="7b:lora,0.5b:lora")
    parser.add_argument("--variants", default="base,liger,liger_fused,liger_gc")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--qlora-batch", type=int, default=None, help="batch for QLoRA configs (default --batch)")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--lengths", choices=("full", "real"), default="full",
                        help="full-length random rows, or chain-of-thought-like lengths (padded vs packed)")
    parser.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout (0 saves memory)")
    parser.add_argument("--data", choices=("random", "repeat"), default="random",
                        help="random tokens, or a random 64-token segment repeated (a loss that falls: compare "
                             "the loss curves of the variants over --steps 50)")
    parser.add_argument("--work", default="/tmp/sw-speed")
    parser.add_argument("--profile", action="store_true", help="also write each variant's top GPU kernels")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        shape, method, variant = args.one.split(":")
        return report_one(lambda: run_one(shape, method, variant, args),
                          {"shape": shape, "method": method, "variant": variant})

    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    for config in args.configs.split(","):
        shape, method = config.split(":")
        model_dir(shape, work)
        batch = args.qlora_batch if method == "qlora" and args.qlora_batch else args.batch
        rows = []
        for variant in args.variants.split(","):
            cmd = [sys.executable, __file__, "--one", f"{shape}:{method}:{variant}", "--out", str(out),
                   "--work", str(work), "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--batch", str(batch), "--seq", str(args.seq), "--lengths", args.lengths,
                   "--dropout", str(args.dropout), "--data", args.data] + (["--profile"] if args.profile else [])
            row = run_isolated(cmd, {"shape": shape, "method": method, "variant": variant})
            rows.append(row)
            print("ROW " + json.dumps({k: v for k, v in row.items() if k != "losses"}), flush=True)
            (out / f"speed-{shape}-{method}.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
        base = next((r for r in rows if r["variant"] == "base" and "error" not in r), None)
        print(f"\n{shape} {method}, batch {batch} × {args.seq} ({args.lengths} lengths, {args.data} tokens), LoRA "
              f"dropout {args.dropout:g}, {args.steps} timed steps")
        print(f"{'variant':<16} {'tokens/s':>9} {'×base':>6} {'peak GiB':>9} {'×base':>6} {'MFU':>6} "
              f"{'loss':>9} {'Δloss':>8}  notes")
        for r in rows:
            if "error" in r:
                print(f"{r['variant']:<16} error: {r['error'][:300]}")
                continue
            speedup = r["tokens_per_s"] / base["tokens_per_s"] if base else float("nan")
            memory = r["peak_gib"] / base["peak_gib"] if base and base["peak_gib"] else float("nan")
            dloss = (r["final_loss"] - base["final_loss"]) / base["final_loss"] if base else float("nan")
            notes = ", ".join(f"{k}: {v}" for k, v in r["speed"]["skipped"].items())
            print(f"{r['variant']:<16} {r['tokens_per_s']:>9.0f} {speedup:>6.2f} {r['peak_gib']:>9.2f} "
                  f"{memory:>6.2f} {r['mfu']:>6.1%} {r['final_loss']:>9.4f} {dloss:>+8.2%}  {notes}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
