"""Gradient check of the training speed-ups: one LoRA step's loss and adapter gradients for each variant of
``speed_bench.py``, against an fp32 reference — "the gradients of a small model match the reference to bf16
tolerance".

Each variant runs in its own subprocess (Liger patches model classes process-wide) on the same random-weight
model, LoRA init (r16, α32, no dropout, B not zero so every adapter gets a gradient) and token batch, and saves
its loss and adapter gradients (safetensors). The table gives, per variant, the relative L2 error of all the
adapter gradients together and the loss difference, both against ``fp32`` (the same model in fp32, no
speed-ups); ``bf16`` (plain bf16) is the tolerance: a variant is within bf16 tolerance when its error is at most
1.5× plain bf16's (FP8 is reported against the same yardstick, knowing it rounds more).

    python3 evals/gpu/grad_check.py --out $OUT --shape 0.5b --variants liger,liger_ckpt2,fp8,liger_fp8
    python3 evals/gpu/grad_check.py --out $OUT --shape tiny --variants liger_ckpt2,packed   # CPU dry run
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))

from evals.gpu.speed_bench import VARIANTS, apply_variant, model_dir, report_one, run_isolated  # noqa: E402

TOLERANCE = 1.5     # × plain bf16's error


def run_one(variant: str, args: argparse.Namespace) -> dict:
    """One variant's loss and LoRA gradients, saved under ``--work``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from tools.finetune.speed import Speedups, apply_before_load

    options = {} if variant in ("fp32", "bf16") else VARIANTS[variant]
    cuda = torch.cuda.is_available()
    folder = model_dir(args.shape, Path(args.work))
    config = AutoConfig.from_pretrained(folder).to_dict()
    speed = Speedups(liger=options.get("liger", False), fp8=options.get("fp8", False))
    apply_before_load(speed, config["model_type"], cuda=cuda)
    dtype = torch.float32 if variant == "fp32" or not cuda else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa")
    if cuda:
        model.to("cuda")
    if options.get("gc"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM", init_lora_weights=False))
    model = apply_variant(model, options, speed, cuda=cuda, offload=False)
    model.config.use_cache = False
    model.train()
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config["vocab_size"], (args.batch, args.seq), generator=generator)
    if options.get("packed"):        # the same rows, packed padding-free into one sequence
        inputs = {"input_ids": ids.reshape(1, -1), "position_ids": torch.arange(args.seq).repeat(args.batch)[None]}
        labels = inputs["input_ids"].clone()
        labels[inputs["position_ids"] == 0] = -100
        inputs["labels"] = labels
    else:
        labels = ids.clone()
        inputs = {"input_ids": ids, "labels": labels}
    if cuda:
        inputs = {k: v.cuda() for k, v in inputs.items()}
    loss = model(**inputs).loss
    loss.backward()
    grads = {name: p.grad.detach().float().cpu().contiguous() for name, p in model.named_parameters()
             if p.requires_grad and p.grad is not None}
    path = Path(args.work) / f"grads-{args.shape}-{variant}.safetensors"
    save_file(grads, str(path))
    return {"variant": variant, "loss": float(loss.detach()), "grads": str(path), "tensors": len(grads),
            "speed": speed.to_dict(), "dtype": str(dtype).replace("torch.", ""),
            "gpu": torch.cuda.get_device_name(0) if cuda else "cpu"}


def compare(reference: dict, row: dict) -> dict:
    """Relative L2 error of all adapter gradients together, and the cosine, against ``reference``."""
    import torch
    from safetensors.torch import load_file

    ref, got = load_file(reference["grads"]), load_file(row["grads"])
    if ref.keys() != got.keys():
        return {"error": f"different adapter tensors ({len(ref)} vs {len(got)})"}
    a = torch.cat([ref[k].flatten() for k in sorted(ref)]).double()     # float64: millions of terms summed
    b = torch.cat([got[k].flatten() for k in sorted(ref)]).double()
    return {"grad_rel_err": float((b - a).norm() / a.norm()),
            "cosine": float(torch.nn.functional.cosine_similarity(a, b, dim=0)),
            "loss_rel_diff": (row["loss"] - reference["loss"]) / reference["loss"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--shape", default="0.5b")
    parser.add_argument("--variants", default="liger,liger_ckpt2,fp8,liger_fp8")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--work", default="/tmp/sw-speed")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        return report_one(lambda: run_one(args.one, args), {"variant": args.one})

    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    model_dir(args.shape, work)
    rows = []
    for variant in ["fp32", "bf16", *[v for v in args.variants.split(",") if v not in ("fp32", "bf16")]]:
        cmd = [sys.executable, __file__, "--one", variant, "--out", str(out), "--work", str(work), "--shape",
               args.shape, "--batch", str(args.batch), "--seq", str(args.seq)]
        rows.append(run_isolated(cmd, {"variant": variant}))
    reference = rows[0]
    if "error" in reference:
        print(f"fp32 reference failed: {reference['error']}")
        return 1
    bf16 = next((r for r in rows if r["variant"] == "bf16" and "error" not in r), None)
    yardstick = compare(reference, bf16)["grad_rel_err"] if bf16 else None
    print(f"\n{args.shape} LoRA r16, one step on {args.batch} × {args.seq} tokens; errors against fp32")
    print(f"{'variant':<16} {'loss':>9} {'Δloss':>9} {'grad err':>9} {'cosine':>8} {'× bf16':>7}  verdict / notes")
    for row in rows:
        if "error" in row:
            print(f"{row['variant']:<16} error: {row['error'][:300]}")
            continue
        row.update(compare(reference, row))
        if yardstick:
            ratio = row["grad_rel_err"] / yardstick
            within = ratio <= TOLERANCE
        else:            # on CPU "bf16" runs in fp32 too: no yardstick, so within float rounding
            ratio, within = float("nan"), row["grad_rel_err"] <= 1e-5
        row["vs_bf16"] = ratio
        verdict = "reference" if row is reference else "bf16 tolerance" if row["variant"] == "bf16" else \
            "not applied" if row["speed"]["skipped"] else "within" if within else "OUTSIDE"
        notes = ", ".join(f"{k}: {v}" for k, v in row["speed"]["skipped"].items())
        print(f"{row['variant']:<16} {row['loss']:>9.4f} {row['loss_rel_diff']:>+9.3%} {row['grad_rel_err']:>9.2e} "
              f"{row['cosine']:>8.5f} {ratio:>7.2f}  {verdict}{'; ' + notes if notes else ''}", flush=True)
    (out / f"grads-{args.shape}.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
