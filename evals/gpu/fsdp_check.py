"""GPU check of a sharded (FSDP) full fine-tune against one GPU, with a tiny model: the training entry point run
directly, once on one GPU and once through PyTorch's launcher on two with ``"fsdp": true`` in spec.json, same
rows in the same order. Prints each run's status, data-parallel mode (from train.log), final loss and whether
the saved models agree.

    python3 evals/gpu/fsdp_check.py --out OUT [--steps 8]

(accelerate shards only on GPUs; on CPU the same spec trains with DDP — see tests/test_finetune_parallel.py.)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))

WORDS = ("red", "blue", "green", "cat", "dog", "sun", "moon")


def write_run(run_dir: Path, model: Path, *, batch: int, steps: int, fsdp: bool) -> Path:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)

    def row(i: int) -> str:
        word, n = WORDS[i % len(WORDS)], 1 + i % 5
        question = f"Say {word} {n} times."
        prompt = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)
        answer = " ".join([word] * n)
        return json.dumps({"prompt": prompt, "completion": answer + tok.eos_token, "question": question,
                           "reference": answer}) + "\n"

    (run_dir / "data").mkdir(parents=True, exist_ok=True)
    (run_dir / "data" / "train.jsonl").write_text("".join(row(i) for i in range(64)))
    (run_dir / "data" / "eval.jsonl").write_text("".join(row(i) for i in range(100, 104)))
    spec = {"base_model": "tiny", "dataset": "d.jsonl", "method": "full", "learning_rate": 1e-3, "batch_size": batch,
            "max_seq_len": 128, "seed": 7, "max_steps": steps, "base_model_path": str(model), "job_id": "ft-1",
            "sampling": "sequential", "fsdp": fsdp}
    (run_dir / "spec.json").write_text(json.dumps(spec))
    return run_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--work", default="/tmp/sw-fsdp-check")
    args = parser.parse_args(argv)
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    from tools.finetune.distributed import train_argv
    from tools.finetune.tiny import build_tiny_model

    model = build_tiny_model(work / "tiny")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    results = {}
    for name, processes, batch, fsdp in (("one", 1, 4, False), ("two-fsdp", 2, 2, True)):
        run_dir = write_run(work / name, model, batch=batch, steps=args.steps, fsdp=fsdp)
        run_env = {**env, "CUDA_VISIBLE_DEVICES": "0"} if processes == 1 else env
        done = subprocess.run(train_argv(sys.executable, run_dir, processes=processes, resume=False), cwd=run_dir,
                              env=run_env, capture_output=True, text=True, timeout=600)
        summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
        log = (run_dir / "train.log").read_text() if (run_dir / "train.log").exists() else ""
        mode = next((line.split("stackwise.finetune: ", 1)[1] for line in log.splitlines()
                     if "data-parallel on" in line), "one process")
        results[name] = {"exit": done.returncode, "status": summary.get("status"), "mode": mode,
                         "final_loss": summary.get("final_loss"), "error": summary.get("error"),
                         "peak_gpu_mem_gb": summary.get("peak_gpu_mem_gb"), "stderr_tail": done.stderr[-1500:]}
        print(f"{name}: exit {done.returncode}, {summary.get('status')}, {mode}, final loss "
              f"{summary.get('final_loss')}, error {summary.get('error')}", flush=True)
    try:
        from safetensors.torch import load_file

        a = load_file(work / "one" / "adapter" / "model.safetensors")
        b = load_file(work / "two-fsdp" / "adapter" / "model.safetensors")
        diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
        results["max_weight_difference"] = diff
        print(f"saved models: {len(a)} tensors each, largest difference {diff:.3g}", flush=True)
    except (OSError, KeyError, ValueError) as exc:
        print(f"saved models not compared: {exc}", flush=True)
    (out / "fsdp_check.json").write_text(json.dumps(results, indent=1))
    return 0 if all(r.get("status") == "succeeded" for k, r in results.items() if isinstance(r, dict)) else 1


if __name__ == "__main__":
    raise SystemExit(main())
