"""``bench_http``: the HTTP API under concurrent load — throughput, latency, and that threads never interleave.

The API runs on loopback (uvicorn in a background thread, no tokens). After a warm-up (models loaded,
the concept cards indexed — reported as ``warmup_s``), ``requests`` non-streaming ``/v1/chat/completions``
calls (chit-chat and concept questions) are spread round-robin over ``threads`` thread ids. Each thread
sends its requests one after another, so its expected history is known; the threads run concurrently,
with at most ``concurrency`` requests in flight (so in flight ≤ min(threads, concurrency)). Meanwhile
``/healthz`` is probed every 50 ms: its latency shows whether the event loop stays responsive while turns
queue. Afterwards every thread's history must hold exactly its turns, alternating user/assistant, with
the user messages in submission order; a thread that does not is counted in ``interleaved_threads``.

Example:
    >>> bench_http(Settings.from_env())["throughput_rps"]     # doctest: +SKIP
    91.4
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import httpx

from evals.bench import _percentile

MESSAGES = ["hi", "what is LoRA?", "thanks", "what can you do?", "what is QLoRA?", "谢谢", "how does attention work?",
            "hello", "什么是知识蒸馏？"]
THREAD_HEADER = "X-Stackwise-Thread"


def bench_http(settings: Any, requests: int = 200, threads: int = 20, concurrency: int = 50) -> dict:
    """Run the load against a fresh server on ``settings`` and return the measurements (prints nothing)."""
    from agent import Agent
    from bots.http import background_server, create_app

    agent = Agent(settings)
    try:
        with background_server(create_app(agent, tokens=None)) as url:
            return asyncio.run(_load(url, requests, threads, concurrency))
    finally:
        agent.close()


async def _chat(client: httpx.AsyncClient, thread: str, text: str) -> httpx.Response:
    body = {"model": "stackwise", "messages": [{"role": "user", "content": text}]}
    return await client.post("/v1/chat/completions", json=body, headers={THREAD_HEADER: thread})


async def _load(url: str, requests: int, threads: int, concurrency: int) -> dict:
    run = uuid.uuid4().hex[:8]
    plan: dict[str, list[str]] = {f"bench-{run}-{i:03d}": [] for i in range(threads)}
    ids = list(plan)
    for k in range(requests):
        plan[ids[k % threads]].append(MESSAGES[k % len(MESSAGES)])
    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=concurrency + 2)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=600) as client:
        t0 = time.perf_counter()
        for text in dict.fromkeys(MESSAGES):
            (await _chat(client, f"bench-{run}-warmup", text)).raise_for_status()
        warmup = time.perf_counter() - t0

        gate = asyncio.Semaphore(concurrency)
        latencies: list[float] = []
        errors: list[str] = []

        async def one_thread(thread: str, texts: list[str]) -> None:
            for text in texts:
                async with gate:
                    t = time.perf_counter()
                    try:
                        r = await _chat(client, thread, text)
                        if r.status_code != 200 or r.headers.get(THREAD_HEADER) != thread:
                            errors.append(f"{thread}: HTTP {r.status_code} {r.text[:200]}")
                        elif not r.json()["choices"][0]["message"]["content"]:
                            errors.append(f"{thread}: empty answer to {text!r}")
                    except (httpx.HTTPError, ValueError, KeyError) as exc:
                        errors.append(f"{thread}: {type(exc).__name__}: {exc}")
                    latencies.append(time.perf_counter() - t)

        probes: list[float] = []
        done = asyncio.Event()

        async def probe() -> None:
            while not done.is_set():
                t = time.perf_counter()
                r = await client.get("/healthz")
                if r.status_code == 200:
                    probes.append(time.perf_counter() - t)
                await asyncio.sleep(0.05)

        prober = asyncio.create_task(probe())
        start = time.perf_counter()
        await asyncio.gather(*(one_thread(t, texts) for t, texts in plan.items()))
        wall = time.perf_counter() - start
        done.set()
        await prober

        broken = []
        for thread, texts in plan.items():
            r = await client.get(f"/v1/threads/{thread}")
            messages = r.json().get("messages", []) if r.status_code == 200 else []
            roles_ok = [m["role"] for m in messages] == ["user", "assistant"] * len(texts)
            if not roles_ok or [m["content"] for m in messages[::2]] != texts:
                broken.append(thread)
    ms = [x * 1000 for x in latencies]
    health = [x * 1000 for x in probes] or [float("nan")]
    return {
        "requests": requests, "threads": threads, "concurrency": concurrency,
        "errors": len(errors), "error_samples": errors[:5],
        "wall_s": round(wall, 3), "throughput_rps": round(requests / wall, 1),
        "latency_p50_ms": round(_percentile(ms, 0.5), 1), "latency_p95_ms": round(_percentile(ms, 0.95), 1),
        "latency_max_ms": round(max(ms), 1),
        "healthz_under_load_p50_ms": round(_percentile(health, 0.5), 2),
        "healthz_under_load_p95_ms": round(_percentile(health, 0.95), 2), "healthz_probes": len(probes),
        "interleaved_threads": len(broken), "history_ok": not broken, "warmup_s": round(warmup, 2),
    }
