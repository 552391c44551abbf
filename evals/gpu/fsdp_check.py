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

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--work", default="/tmp/sw-fsdp-check")
    args = parser.parse_args(argv)
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    from tools.finetune.distributed import train_argv
    from tools.finetune.tiny import build_tiny_model, write_pattern_run

    model = build_tiny_model(work / "tiny")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    results = {}
    for name, processes, batch, fsdp in (("one", 1, 4, False), ("two-fsdp", 2, 2, True)):
        run_dir = write_pattern_run(work / name, model, rows=64, method="full", learning_rate=1e-3, batch_size=batch,
                                    max_steps=args.steps, fsdp=fsdp)
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
