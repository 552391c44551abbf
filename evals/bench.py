"""``stackwise bench``: cold CLI start, warm turn overhead, embedding throughput, SHAP speed, thread-store growth
with and without retention, and kill -9 durability, as one table.

- cold ``stackwise ask``: wall time of a new process answering one message (median of N runs on a
  prepared home, i.e. after the first run that caches the router's exemplar embeddings);
- warm turn overhead: in one process, the time of a whole turn minus the time spent inside the
  tool's own ``run`` (routing, slot filling, graph, checkpointing, answer writing);
- embedding throughput: our embedder vs raw ``SentenceTransformer.encode`` on the same texts;
- SHAP: the reporter's explain stage vs raw ``shap.TreeExplainer`` and a 100k × 30 CSV end to end.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

WARM_MESSAGES = [
    "hi", "what can you do?", "谢谢", "how similar are 'king' and 'queen'?", "“猫”和“狗”有多相似？",
    "what is QLoRA?", "什么是注意力机制？", "status of ft-3", "which features drive churn in churn.csv?",
    "fine-tune Qwen2.5-0.5B on data.jsonl with lora rank 8", "no",
    "explain LoRA, then compare 'cat' and 'dog'",
]
COLD_MESSAGES = {"chit-chat": "hi", "embedding": "how similar are 'king' and 'queen'?"}


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q * (len(ordered) - 1))))
    return ordered[k]


def bench_cold(runs: int = 3) -> dict[str, dict[str, float]]:
    exe = str(Path(sys.executable).parent / "stackwise")
    out: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "STACKWISE_HOME": home}
        subprocess.run([exe, "ask", "hi", "--json"], env=env, capture_output=True, check=False)  # prepare
        for label, message in COLD_MESSAGES.items():
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                proc = subprocess.run([exe, "ask", message, "--json", "--thread", f"bench-{label}"], env=env,
                                      capture_output=True, text=True, check=False)
                times.append(time.perf_counter() - t0)
                if proc.returncode != 0:
                    raise RuntimeError(f"stackwise ask failed: {proc.stderr[-500:]}")
            out[label] = {"median_s": statistics.median(times), "max_s": max(times)}
    return out


def bench_warm(settings: Any, rounds: int = 8) -> dict[str, float]:
    from agent import Agent

    agent = Agent(settings)
    spent = {"tool": 0.0}
    for tool in agent.registry:
        inner = tool.run

        def timed(args, ctx, _inner=inner):
            t0 = time.perf_counter()
            try:
                return _inner(args, ctx)
            finally:
                spent["tool"] += time.perf_counter() - t0

        tool.run = timed
    try:
        for msg in WARM_MESSAGES:  # warm-up: models loaded, caches filled
            agent.ask(msg, thread_id="warmup")
        overheads, totals = [], []
        for r in range(rounds):
            for msg in WARM_MESSAGES:
                spent["tool"] = 0.0
                t0 = time.perf_counter()
                agent.ask(msg, thread_id=f"bench-{r}")
                total = time.perf_counter() - t0
                totals.append(total * 1000)
                overheads.append((total - spent["tool"]) * 1000)
    finally:
        agent.close()
    return {"turns": len(overheads), "overhead_p50_ms": _percentile(overheads, 0.5),
            "overhead_p95_ms": _percentile(overheads, 0.95), "total_p50_ms": _percentile(totals, 0.5)}


def run_bench(*, settings: Any, as_json: bool = False, quick: bool = False) -> int:
    from evals.bench_embedding import bench_embedding
    from evals.bench_finetune import bench_finetune
    from evals.bench_http import bench_http
    from evals.bench_kb import bench_kb
    from evals.bench_memory import bench_growth, bench_kill, format_memory_bench
    from evals.bench_shap import bench_shap
    from evals.bench_telegram import bench_telegram

    results = {
        "cold_ask": bench_cold(runs=2 if quick else 3),
        "warm_turn": bench_warm(settings.with_(home=Path(tempfile.mkdtemp(prefix="sw-bench-"))),
                                rounds=3 if quick else 8),
        "embedding": bench_embedding(n=300 if quick else 1000),
        "knowledge_base": bench_kb(settings, n_chunks=3000 if quick else 10_000),
        "http": bench_http(settings.with_(home=Path(tempfile.mkdtemp(prefix="sw-http-bench-")))),
        "telegram": bench_telegram(),
        "shap": bench_shap(repeat=1 if quick else 3),
        "memory_growth": bench_growth(settings, turns=250 if quick else 1000),
        "kill9": bench_kill(trials=5 if quick else 20),
        "finetune_launch": bench_finetune(rows=10_000, rounds=2 if quick else 3),
    }
    if as_json:
        sys.stdout.write(json.dumps(results) + "\n")
        return 0
    w, e, s, k = results["warm_turn"], results["embedding"], results["shap"], results["knowledge_base"]
    h = results["http"]
    rows = [(f"cold `stackwise ask` ({k})", f"{v['median_s']:.2f} s median, {v['max_s']:.2f} s max", "≤ 6 s")
            for k, v in results["cold_ask"].items()]
    rows += [
        ("warm turn overhead p50", f"{w['overhead_p50_ms']:.1f} ms", "≤ 20 ms"),
        ("warm turn overhead p95", f"{w['overhead_p95_ms']:.1f} ms", ""),
        ("warm turn total p50 (with tools)", f"{w['total_p50_ms']:.1f} ms", ""),
        (f"embedding throughput, {e['n']} texts", f"{e['tool_texts_per_s']:.0f} vs {e['raw_texts_per_s']:.0f} texts/s "
         f"(ratio {e['ratio']:.2f})", "≥ 0.9×"),
        ("embedding max |diff| vs sentence-transformers", f"{e['max_abs_diff']:.2e}", "≤ 1e-5"),
        (f"kb ingest ({k['filler_chunks']:,} chunks of filler)", f"{k['ingest_chunks_per_s']:.0f} chunks/s "
         f"({k['ingest_s']:.1f} s; cards index {k['cards_index_s']:.1f} s once)", ""),
        (f"kb query at {k['chunks']:,} chunks, p50 / p95", f"{k['search_p50_ms']:.1f} / {k['search_p95_ms']:.1f} ms "
         f"({k['queries']} queries, warm)", "p95 ≤ 30 ms"),
        ("explain_concept call at the same size, p50 / p95", f"{k['explain_p50_ms']:.1f} / "
         f"{k['explain_p95_ms']:.1f} ms", ""),
        (f"HTTP: {h['requests']} chat completions over {h['threads']} threads", f"{h['errors']} errors, "
         f"{h['throughput_rps']:.0f} req/s, p95 {h['latency_p95_ms']:.0f} ms, interleaved {h['interleaved_threads']}",
         "0 errors, 0 interleaved"),
        (f"Telegram: {results['telegram']['chats']} chats × 5 messages, 10 % of edits 429", f"lost "
         f"{results['telegram']['lost']}, duplicated {results['telegram']['duplicated']}, added latency p95 "
         f"{results['telegram']['added_p95_ms']:.0f} ms", "0 / 0, p95 ≤ 1 s"),
        (f"shap explain vs raw TreeExplainer, {s['explained_rows']} rows", f"{s['tool_explain_s']:.2f} vs "
         f"{s['raw_s']:.2f} s (ratio {s['ratio_no_plots']:.2f})", "≤ 1.2×"),
        ("shap explain + plots + report vs raw", f"ratio {s['ratio_with_plots']:.2f} "
         f"(plots+report {s['plots_and_report_s']:.2f} s)", ""),
        (f"shap_report end to end, {s['rows']:,} × {s['cols']} CSV", f"{s['end_to_end_s']:.1f} s "
         f"(read {s['stages']['read']:.1f}, model {s['stages']['model']:.1f}, explain {s['stages']['explain']:.1f})",
         "≤ 30 s"),
    ]
    rows += format_memory_bench(results["memory_growth"], results["kill9"])
    f = results["finetune_launch"]
    rows += [(f"launch_finetune to queued, {f['rows']:,} rows (preflight included)", f"{f['warm_median_s']:.2f} s "
              f"warm (median), {f['cold_median_s']:.2f} s in a new process", "≤ 2 s")]
    width = max(len(r[0]) for r in rows) + 2
    print(f"{'benchmark':<{width}}{'measured':<44}target")
    for name, value, target in rows:
        print(f"{name:<{width}}{value:<44}{target}")
    return 0
