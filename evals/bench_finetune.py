"""Preflight and launch to ``queued`` for a 10,000-row chain-of-thought data set (issue 4's target: ≤ 2 s).

Warm: ``launch_finetune`` through a ``Toolbox`` in this process (tokenizer already loaded), each time on a new
copy of the data set so nothing is remembered from the last run. Cold: ``stackwise tool launch_finetune`` in a
new process (Python start-up, imports and the tokenizer included). The model is the tiny local Qwen2 model;
tokenising the rows is what the time goes to, and a real model's tokenizer is of the same kind (a fast BPE).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ["patient", "fever", "cough", "blood", "pressure", "diabetes", "insulin", "kidney", "dose", "renal",
         "chronic", "acute", "therapy", "risk", "marker"]
ZH = "患者发热咳嗽血压糖尿病胰岛素肾脏肝脏心脏感染抗生素剂量治疗诊断"


def _rows(n: int) -> list[dict]:
    rnd = random.Random(0)

    def sentence(k: int) -> str:
        return " ".join(rnd.choice(WORDS) for _ in range(k))

    return [{"Question": sentence(15) + "?" if i % 2 else "".join(rnd.choices(ZH, k=30)) + "？",
             "Complex_CoT": sentence(60), "Response": sentence(25)} for i in range(n)]


def bench_finetune(rows: int = 10_000, rounds: int = 3) -> dict:
    from agent.settings import Settings
    from agent.toolbox import Toolbox
    from tools.finetune.tiny import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="sw-ft-bench-"))
    try:
        model = build_tiny_model(work / "Qwen2.5-0.5B", arch="qwen2")
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in _rows(rows))
        env = {**os.environ, "STACKWISE_HOME": str(work / "home"), "STACKWISE_DATA_ROOTS": str(work),
               "STACKWISE_WORKER_GPU": "unknown", "HF_HUB_OFFLINE": "1"}
        toolbox = Toolbox(Settings.from_env(env))
        warm, cold = [], []
        for i in range(rounds + 1):                 # the first warm round loads the tokenizer: not counted
            data = work / f"cot-{i}.jsonl"
            data.write_text(text, encoding="utf-8")
            args = {"base_model": str(model), "dataset": str(data), "max_seq_len": 512}
            t0 = time.perf_counter()
            record = toolbox.call_tool("launch_finetune", args, user_id="bench")
            if not record["ok"]:
                raise RuntimeError(f"launch failed: {record['error']}")
            if i:
                warm.append(time.perf_counter() - t0)
        for i in range(rounds):
            data = work / f"cold-{i}.jsonl"
            data.write_text(text, encoding="utf-8")
            args = json.dumps({"base_model": str(model), "dataset": str(data), "max_seq_len": 512})
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-c", "import sys; from bots.cli import main; sys.exit(main())",
                                   "tool", "launch_finetune", "--args", args, "--json", "--user", "bench"],
                                  env=env, capture_output=True, text=True)
            cold.append(time.perf_counter() - t0)
            if proc.returncode != 0:
                raise RuntimeError(f"cold launch failed: {proc.stdout[-500:]} {proc.stderr[-500:]}")
        queued = len(toolbox.jobs().list("bench", limit=100))
        toolbox.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"rows": rows, "warm_median_s": statistics.median(warm), "warm_max_s": max(warm),
            "cold_median_s": statistics.median(cold), "cold_max_s": max(cold), "queued": queued}


if __name__ == "__main__":
    print(json.dumps(bench_finetune(), indent=1))
