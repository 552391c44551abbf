"""``stackwise kb``: ingest documents into the shared knowledge base, search it, list and remove sources."""

from __future__ import annotations

import argparse
import sys

from bots.cli import _fail, _print_json, _settings


def add_kb_parser(sub: argparse._SubParsersAction) -> None:
    kb = sub.add_parser("kb", help="the knowledge base: ingest, search, stats, remove")
    kb_sub = kb.add_subparsers(dest="kb_command", metavar="ACTION", required=True)
    ingest = kb_sub.add_parser("ingest", help="add .md/.txt/.pdf/.html files or folders (unchanged files are skipped)")
    ingest.add_argument("paths", nargs="+", metavar="PATH")
    ingest.add_argument("--json", action="store_true")
    search = kb_sub.add_parser("search", help="search cards and documents")
    search.add_argument("query", metavar="Q")
    search.add_argument("--k", type=int, default=5, help="how many results (1–50)")
    search.add_argument("--retriever", default="hybrid", choices=["hybrid", "dense", "bm25", "dense+bm25"])
    search.add_argument("--json", action="store_true")
    stats = kb_sub.add_parser("stats", help="cards, documents and chunks in the base")
    stats.add_argument("--json", action="store_true")
    remove = kb_sub.add_parser("remove", help="remove an ingested source (its path, or its file name if unique)")
    remove.add_argument("source", metavar="SOURCE")
    remove.add_argument("--json", action="store_true")


def cmd_kb(args: argparse.Namespace) -> int:
    from agent import Toolbox

    toolbox = Toolbox(_settings(args))
    try:
        return {"ingest": _ingest, "search": _search, "stats": _stats, "remove": _remove}[args.kb_command](
            toolbox, args)
    finally:
        toolbox.close()


def _ingest(toolbox, args) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    with Progress(TextColumn("ingesting"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.description}"), console=console, transient=True) as bar:
        task = bar.add_task("", total=None)

        def progress(done: int, total: int, name: str) -> None:
            bar.update(task, completed=done, total=total, description=name[:40])

        result = toolbox.ingest(args.paths, progress=progress)
    if args.json:
        _print_json(result)
    else:
        rate = f", {result['chunks_per_s']} chunks/s" if result["chunks_per_s"] else ""
        print(f"added {len(result['added'])}, updated {len(result['updated'])}, unchanged {len(result['unchanged'])}"
              f" — {result['chunks']} chunks in {result['seconds']:.1f} s{rate}")
        for failure in result["failed"]:
            sys.stderr.write(f"not ingested: {failure['path']}: {failure['error']}\n")
    return 1 if result["failed"] else 0


def _search(toolbox, args) -> int:
    query = " ".join(args.query.split())
    if not query:
        return _fail("The query is empty.", as_json=args.json, kind="empty_query", code=2)
    if len(query) > 2000:
        return _fail(f"The query has {len(query)} characters; the limit is 2000.", as_json=args.json,
                     kind="query_too_long", code=2)
    if not 1 <= args.k <= 50:
        return _fail("--k must be between 1 and 50.", as_json=args.json, kind="bad_k", code=2)
    hits = toolbox.knowledge().search(query, k=args.k, retriever=args.retriever)
    if args.json:
        _print_json({"query": query, "retriever": args.retriever, "results": [h.to_dict() for h in hits]})
        return 0
    for rank, hit in enumerate(hits, start=1):
        where = f"card {hit.card}" if hit.kind == "card" else f"{hit.source} › {hit.section}"
        snippet = " ".join(hit.text.split())[:150]
        print(f"{rank}. [{hit.score:.4f}] {hit.title} ({where})\n   {snippet}")
    if not hits:
        print("no results")
    return 0


def _stats(toolbox, args) -> int:
    stats = toolbox.knowledge().stats()
    if args.json:
        _print_json(stats)
        return 0
    print(f"{stats['cards']} concept cards ({stats['card_chunks']} chunks), {stats['documents']} documents "
          f"({stats['document_chunks']} chunks); embedder {stats['embedder']}; store {stats['store']}")
    for source in stats["sources"]:
        print(f"  {source['source']}  ({source['chunks']} chunks, {source['bytes']:,} bytes)")
    return 0


def _remove(toolbox, args) -> int:
    result = toolbox.knowledge().remove(args.source)
    if args.json:
        _print_json(result)
    else:
        print(f"removed {result['source']} ({result['removed_chunks']} chunks)")
    return 0
