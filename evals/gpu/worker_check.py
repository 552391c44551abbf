"""GPU check of the whole launcher path: jobs launched through ``launch_finetune`` (offline model resolution,
data check, preflight against the probed GPU) and run by ``stackwise worker --drain`` — the same code a
chat's "yes" starts — at real model shapes, with the preflight's estimate next to what was measured.

Models are Qwen2-architecture with random weights at the real shapes (nothing can be downloaded on the
GPU machine) and the tiny locally trained tokenizer; rows are synthetic chain-of-thought texts of about
``--seq`` tokens, so every step trains full-length sequences.

    python evals/gpu/worker_check.py --out OUT [--jobs 0.5b:lora,0.5b:qlora,7b:lora] [--steps 50]
        [--batch 4] [--seq 2048] [--sequential] [--dropout 0.05] [--speed '{"cuda_graphs": true}']

A job may carry options after its method: ``7b:lora:gpus=2:batch=2`` (the spec's ``gpus`` and per-GPU
``batch_size``). ``--sequential`` writes ``"sampling": "sequential"`` into each queued run's spec.json, so jobs
with the same global batch (1 GPU × 4, 2 GPUs × 2) train on the same rows in the same order — the data-parallel
loss check (with ``--dropout 0``).

Writes ``OUT/worker-<shape>-<method>.json`` per job (the job record, preflight, summary, last progress
lines) and ``OUT/worker-<jobs>.log`` (the worker's output), and prints one line per job.
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
sys.path.insert(0, str(HERE.parents[1]))

from evals.gpu.finetune_check import SHAPES, build_model, synthetic_rows  # noqa: E402

# A CPU dry run of this script (the vocabulary is the tokenizer's).
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=4096)
USER = "gpu-check"


def prepare(shapes: set[str], args: argparse.Namespace, work: Path) -> dict[str, Path]:
    """A model folder and a data set per shape, under ``work`` (the launcher's data root)."""
    from transformers import AutoTokenizer

    from tools.finetune.tiny import build_tiny_model

    tokenizer_dir = build_tiny_model(work / "tokenizer")
    SHAPES.setdefault("tiny", {**TINY, "vocab_size": len(AutoTokenizer.from_pretrained(tokenizer_dir))})
    made = {}
    for shape in sorted(shapes):
        model_dir = work / "models" / f"qwen2-{shape}"
        if not (model_dir / "config.json").is_file():
            build_model(shape, model_dir, tokenizer_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        rows = synthetic_rows(tokenizer, args.batch * args.steps + 16, args.seq)
        data = work / f"cot-{shape}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        made[shape] = model_dir
    return made


def parse_job(text: str) -> tuple[str, str, dict]:
    """``7b:lora:gpus=2:batch=2`` → ("7b", "lora", {"gpus": 2, "batch_size": 2}); ``engine=unsloth`` and
    ``packing=1`` too."""
    shape, method, *rest = text.strip().split(":")
    names = {"gpus": "gpus", "batch": "batch_size", "engine": "engine", "packing": "packing"}
    options = {names[key]: value if key == "engine" else bool(int(value)) if key == "packing" else int(value)
               for key, _, value in (item.partition("=") for item in rest)}
    return shape, method, options


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--jobs", default="0.5b:lora,0.5b:qlora,7b:lora",
                        help="shape:method pairs (shapes: 0.5b, 7b, tiny)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--work", default="/tmp/sw-worker-check")
    parser.add_argument("--sequential", action="store_true", help="rows in file order (see the docstring)")
    parser.add_argument("--dropout", type=float, default=0.05, help="lora_dropout")
    parser.add_argument("--speed", type=json.loads, default=None,
                        help="spec.json speed options for every job, as JSON (default: the trainer's defaults)")
    parser.add_argument("--no-eval", action="store_true",
                        help="skip the held-out evaluation after training (spec.json \"evaluate\": false)")
    args = parser.parse_args(argv)
    out, work = Path(args.out).resolve(), Path(args.work).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    wanted = [parse_job(text) for text in args.jobs.split(",")]
    home = work / "home"
    env = {**os.environ, "STACKWISE_HOME": str(home), "STACKWISE_DATA_ROOTS": str(work), "HF_HUB_OFFLINE": "1",
           "STACKWISE_JOB_BACKEND": "local", "STACKWISE_WORKER_GPU": "auto"}
    os.environ.update(env)

    from agent.settings import Settings
    from agent.toolbox import Toolbox

    t0 = time.time()
    models = prepare({shape for shape, _, _ in wanted}, args, work)
    print(f"models and data ready in {time.time() - t0:.0f} s", flush=True)
    toolbox = Toolbox(Settings.from_env(env))
    launched = []
    for shape, method, options in wanted:
        spec = {"base_model": str(models[shape]), "dataset": str(work / f"cot-{shape}.jsonl"), "method": method,
                "lora_rank": 16, "lora_alpha": 32, "max_steps": args.steps, "batch_size": args.batch,
                "grad_accum": 1, "max_seq_len": args.seq, "eval_fraction": 0.02, "learning_rate": 2e-4,
                "lora_dropout": args.dropout, **options}
        t1 = time.time()
        record = toolbox.call_tool("launch_finetune", spec, user_id=USER)
        launch_s = time.time() - t1
        if not record["ok"]:
            print(f"{shape} {method}: launch refused: {json.dumps(record.get('error'))}", flush=True)
            continue
        job_id = record["result"]["job_id"]
        label = "-".join([shape, method, *(f"{k}{v}" for k, v in options.items()),
                          *(k for k, v in (args.speed or {}).items() if v)])
        run_keys = {**({"sampling": "sequential"} if args.sequential else {}),
                    **({"evaluate": False} if args.no_eval else {}),
                    **({"speed": args.speed} if args.speed is not None else {})}
        if run_keys:
            spec_path = Path(toolbox.jobs().show(job_id, USER)["run_dir"]) / "spec.json"
            queued = json.loads(spec_path.read_text())
            if "speed" in run_keys:        # on top of what the preflight asked for (e.g. recompute_mlp)
                run_keys["speed"] = {**(queued.get("speed") or {}), **run_keys["speed"]}
            spec_path.write_text(json.dumps({**queued, **run_keys}))
        launched.append((label, method, job_id, launch_s))
        print(f"{label}: queued {job_id} in {launch_s:.2f} s", flush=True)

    t2 = time.time()
    log_name = "worker-" + "_".join(f"{shape}-{method}" for shape, method, _ in wanted) + ".log"
    with open(out / log_name, "w", encoding="utf-8") as log:
        worker = subprocess.run([sys.executable, "-c", "import sys; from bots.cli import main; "
                                 "sys.exit(main(['worker', '--drain']))"],
                                cwd=HERE.parents[1], env=env, stdout=log, stderr=subprocess.STDOUT)
    print(f"worker --drain exit {worker.returncode} after {time.time() - t2:.0f} s", flush=True)

    jobs = toolbox.jobs()
    for label, method, job_id, launch_s in launched:
        job = jobs.show(job_id, USER)
        run = Path(job["run_dir"])
        progress = [json.loads(line) for line in (run / "progress.jsonl").read_text().splitlines()] \
            if (run / "progress.jsonl").exists() else []
        summary = job.get("summary") or {}
        pre = job.get("preflight") or {}
        result = {"job_label": label, "method": method, "job": {k: job.get(k) for k in ("id", "status", "error",
                                                                                    "attempts", "history")},
                  "launch_s": round(launch_s, 2), "preflight": {k: pre.get(k) for k in (
                      "rows", "tokens", "training", "params", "vram", "time", "fits", "gradient_checkpointing",
                      "warnings", "gpu")},
                  "summary": summary, "progress_last": progress[-3:],
                  "comparison": (json.loads((run / "comparison.json").read_text())[:1]
                                 if (run / "comparison.json").exists() else None)}
        (out / f"worker-{label}.json").write_text(json.dumps(result, indent=1, default=str),
                                                          encoding="utf-8")
        vram, speed = (pre.get("vram") or {}).get("total_gb"), (pre.get("time") or {}).get("tokens_per_s")
        last = progress[-1] if progress else {}
        print(f"{label} {job_id}: {job['status']}, steps {summary.get('steps')}/{summary.get('total_steps')}, "
              f"tokens/s {last.get('tokens_per_s')} (whole run {summary.get('tokens_per_s')}), peak "
              f"{summary.get('peak_gpu_mem_gb')} GiB, loss {summary.get('final_loss')}; estimate {vram} GiB, "
              f"{speed} tokens/s; error {job.get('error')}", flush=True)
    toolbox.close()
    return 0 if worker.returncode == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
