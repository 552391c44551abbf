"""Knowledge-base speed: ingest throughput and warm query latency at 10,000 chunks.

The base holds the shipped cards plus synthetic filler documents (Markdown with headings, English and
Chinese sentences built from the cards' own words, so BM25 and the dense index see realistic text).
Query latency is ``KnowledgeBase.search`` (embed + Chroma + BM25 + names + fusion) and the whole
``explain_concept`` call, over the retrieval eval's questions, after one warm-up pass.
"""

from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path
from typing import Any


def _filler(folder: Path, cards: list, n_chunks: int, sections_per_file: int = 25) -> int:
    rng = random.Random(7)
    words_en = [w for c in cards for w in c.en.definition.split() if w.isalpha()]
    zh_text = "".join(c.zh.definition for c in cards)
    files = max(1, n_chunks // sections_per_file)
    for f in range(files):
        parts = [f"# Team notes {f}"]
        for s in range(sections_per_file):
            parts.append(f"## Topic {f}-{s}")
            if rng.random() < 0.3:
                start = rng.randrange(0, max(1, len(zh_text) - 300))
                parts.append(zh_text[start:start + rng.randint(150, 300)])
            else:
                parts.append(" ".join(rng.choice(words_en) for _ in range(rng.randint(60, 110))) + ".")
        (folder / f"notes-{f:04d}.md").write_text("\n".join(parts) + "\n", encoding="utf-8")
    return files * sections_per_file


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q * (len(ordered) - 1))))]


def bench_kb(settings: Any, n_chunks: int = 10_000, queries: int = 300) -> dict:
    from agent.toolbox import embedder_factory
    from evals.retrieval import load_cases
    from memory.kb.store import KnowledgeBase
    from tools.base import ToolContext
    from tools.registry import ToolRegistry

    with tempfile.TemporaryDirectory(prefix="sw-kb-bench-") as tmp:
        root = Path(tmp)
        kb = KnowledgeBase(root / "home", embedder=settings.kb_embedder, embedder_factory=embedder_factory)
        try:
            started = time.perf_counter()
            kb.ensure_ready()
            cards_s = time.perf_counter() - started
            card_chunks = len(kb.records.chunk_ids("cards"))
            docs = root / "docs"
            docs.mkdir()
            written = _filler(docs, list(kb.cards().values()), n_chunks - card_chunks)
            started, ingested = time.perf_counter(), 0
            for path in sorted(docs.iterdir()):
                ingested += kb.ingest_file(path.resolve())["chunks"]
            ingest_s = time.perf_counter() - started
            texts = [c["query"] for c in load_cases()][:queries]
            for text in texts[:20]:
                kb.search(text)  # warm: models, BM25 matrices, Chroma caches
            search_ms = []
            for text in texts:
                t0 = time.perf_counter()
                kb.search(text, k=5)
                search_ms.append((time.perf_counter() - t0) * 1000)
            registry = ToolRegistry.default()
            ctx = ToolContext(home=root / "home", knowledge=lambda: kb)
            explain_ms = []
            for text in texts:
                t0 = time.perf_counter()
                registry.call("explain_concept", {"query": text}, ctx)
                explain_ms.append((time.perf_counter() - t0) * 1000)
        finally:
            kb.close()
    return {"chunks": card_chunks + ingested, "card_chunks": card_chunks, "filler_chunks": ingested,
            "filler_expected": written, "cards_index_s": round(cards_s, 2), "ingest_s": round(ingest_s, 2),
            "ingest_chunks_per_s": round(ingested / ingest_s, 1), "queries": len(search_ms),
            "search_p50_ms": round(_pct(search_ms, 0.5), 2), "search_p95_ms": round(_pct(search_ms, 0.95), 2),
            "explain_p50_ms": round(_pct(explain_ms, 0.5), 2), "explain_p95_ms": round(_pct(explain_ms, 0.95), 2)}
