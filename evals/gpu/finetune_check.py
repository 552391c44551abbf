"""GPU check of the fine-tune path: LoRA runs at real model shapes on the GPU machine, end to end
through the training entry, with the preflight's estimate next to what was measured.

No weights can be downloaded there, so each model is a Qwen2-architecture model at the real shape with
random weights (bf16, saved like a hub snapshot) and the tiny locally-trained tokenizer; rows are
synthetic chain-of-thought texts of about ``--seq`` tokens, so every step trains full-length sequences.

    python evals/gpu/finetune_check.py --out OUT [--shapes 0.5b,7b] [--steps 50] [--batch 4] [--seq 2048]

Writes ``OUT/<shape>.json`` (preflight estimate, summary, last progress line, wall time) as it goes.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {
    # Qwen2.5-0.5B and DeepSeek-R1-Distill-Qwen-7B (Qwen2.5-Math-7B) shapes.
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False, max_position_embeddings=131072),
}


def build_model(shape: str, folder: Path, tokenizer_dir: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**SHAPES[shape], rope_theta=1_000_000.0, torch_dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    return folder


def synthetic_rows(tokenizer, n: int, seq: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    words = ["patient", "pressure", "blood", "treatment", "dose", "symptom", "diagnosis", "therapy", "risk",
             "infection", "acute", "chronic", "cardiac", "renal", "hepatic", "fever", "pain", "imaging",
             "lab", "marker", "follow-up", "guideline", "first-line"]
    rows = []
    for i in range(n):
        question = f"Case {i}: " + " ".join(rng.choice(words) for _ in range(40)) + "?"
        reasoning = " ".join(rng.choice(words) for _ in range(4000))
        answer = " ".join(rng.choice(words) for _ in range(60)) + "."
        ids = tokenizer(reasoning)["input_ids"]
        budget = max(64, seq - 160)
        reasoning = tokenizer.decode(ids[:budget], skip_special_tokens=True)
        rows.append({"Question": question, "Complex_CoT": reasoning, "Response": answer})
    return rows


def check(shape: str, args: argparse.Namespace, work: Path, out: Path, tokenizer_dir: Path) -> dict:
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from tools.finetune.data import prepare_dataset
    from tools.finetune.preflight import preflight
    from tools.finetune.spec import FinetuneSpec

    t0 = time.time()
    model_dir = build_model(shape, work / f"model-{shape}", tokenizer_dir)
    built_s = time.time() - t0
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = synthetic_rows(tokenizer, args.batch * args.steps + 8, args.seq)
    data = work / f"data-{shape}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    spec = FinetuneSpec(base_model=str(model_dir), dataset=str(data), method="lora", lora_rank=16, lora_alpha=32,
                        max_steps=args.steps, batch_size=args.batch, max_seq_len=args.seq, eval_fraction=0.02,
                        learning_rate=2e-4)
    run = work / f"run-{shape}"
    (run / "data").mkdir(parents=True, exist_ok=True)
    prepared = prepare_dataset(spec, data, tokenizer, run / "data")
    gpu = None  # a CPU dry run of this script
    if torch.cuda.is_available():
        gpu = {"name": torch.cuda.get_device_name(0),
               "memory_gb": torch.cuda.get_device_properties(0).total_memory / 2**30}
    estimate = preflight(spec, run / "data", tokenizer, AutoConfig.from_pretrained(model_dir).to_dict(), gpu)
    extras = {"base_model_path": str(model_dir), "job_id": f"gpu-{shape}",
              "gradient_checkpointing": bool(args.checkpointing)}
    (run / "spec.json").write_text(json.dumps({**spec.model_dump(), **extras}, indent=1), encoding="utf-8")
    t1 = time.time()
    proc = subprocess.run([sys.executable, "-m", "tools.finetune.train", str(run)], capture_output=True, text=True)
    train_wall = time.time() - t1
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else None
    progress = [json.loads(line) for line in (run / "progress.jsonl").read_text().splitlines()] \
        if (run / "progress.jsonl").exists() else []
    result = {"shape": shape, "gpu": gpu, "model_build_s": round(built_s, 1), "prepared": prepared,
              "preflight": {k: estimate.get(k) for k in ("rows", "tokens", "training", "params", "vram", "time",
                                                         "fits", "warnings")},
              "exit_code": proc.returncode, "stderr_tail": proc.stderr[-2000:], "train_wall_s": round(train_wall, 1),
              "summary": summary, "progress_first": progress[:2], "progress_last": progress[-2:]}
    (out / f"{shape}.json").write_text(json.dumps(result, indent=1, default=str), encoding="utf-8")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--shapes", default="0.5b,7b")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--work", default="/tmp/sw-gpu-check")
    args = parser.parse_args(argv)
    from tools.finetune.tiny import build_tiny_model

    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = build_tiny_model(work / "tokenizer")
    for shape in args.shapes.split(","):
        result = check(shape, args, work, out, tokenizer_dir)
        s, pre = result["summary"] or {}, result["preflight"]
        vram, speed = (pre.get("vram") or {}).get("total_gb"), (pre.get("time") or {}).get("tokens_per_s")
        print(f"{shape}: exit {result['exit_code']}, tokens/s {s.get('tokens_per_s')}, peak "
              f"{s.get('peak_gpu_mem_gb')} GiB; estimate {vram} GiB, {speed} tokens/s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
