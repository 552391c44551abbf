"""``stackwise jobs merge|export|serve-info ID``: serve what a fine-tune job trained.

``merge`` writes ``RUN/export/vllm`` (a folder vLLM serves as is); ``export`` also a GGUF file for Ollama /
llama.cpp when llama.cpp's converter is available (``--format gguf`` insists on it); ``serve-info`` prints the
exact commands. Exit codes as for every ``jobs`` action: 0 done, 1 the job cannot do that (not found, not
succeeded, no converter for ``--format gguf``, disk full), 2 usage errors.
"""

from __future__ import annotations

import argparse
import sys

from bots.cli import _print_json, _user

ACTIONS = ("merge", "export", "serve-info")


def add_export_parsers(jobs_sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add ``merge``, ``export`` and ``serve-info`` to ``stackwise jobs``."""
    merge = jobs_sub.add_parser("merge", parents=[common],
                                help="merge a finished job's adapter into its base: a folder vLLM serves as is")
    export = jobs_sub.add_parser("export", parents=[common],
                                 help="export a finished job for vLLM and (with llama.cpp's converter) GGUF")
    export.add_argument("--format", choices=("vllm", "gguf", "all"), default="all",
                        help="vllm: the merged folder; gguf: also GGUF (needs the converter); "
                             "all (default): the folder, and GGUF when the converter is available")
    export.add_argument("--gguf-type", choices=("f16", "bf16", "q8_0"), default="f16",
                        help="precision of the GGUF file (default f16)")
    for parser in (merge, export):
        parser.add_argument("id", metavar="ID")
        parser.add_argument("--base", default=None, metavar="PATH",
                            help="merge onto this base model instead (e.g. the bf16 original of a 4-bit base)")
        parser.add_argument("--force", action="store_true", help="export again even when it is up to date")
    info = jobs_sub.add_parser("serve-info", parents=[common],
                               help="the commands that serve a finished job and point stackwise at it")
    info.add_argument("id", metavar="ID")


def run_export_action(jobs, args: argparse.Namespace) -> int:
    """Run ``merge`` / ``export`` / ``serve-info`` (``JobsError`` propagates to the caller's handler)."""
    if args.jobs_command == "serve-info":
        return _serve_info(jobs, args)
    if not args.json:
        what = "merging" if args.jobs_command == "merge" else "exporting"
        print(f"{what} {args.id} … (a real model takes minutes and several GB)", file=sys.stderr, flush=True)
    if args.jobs_command == "merge":
        result = jobs.merge(args.id, _user(args), base=args.base, force=args.force)
    else:
        result = jobs.export(args.id, _user(args), args.format, base=args.base, force=args.force,
                             gguf_type=args.gguf_type)
    if args.json:
        _print_json(result)
        return 0
    vllm, gguf = result["vllm"], result.get("gguf")
    state = "up to date (reused)" if vllm.get("reused") else f"written ({vllm['made_from']}, {vllm['dtype']})"
    print(f"{result['job_id']}  vLLM folder {state}: {vllm['folder']}")
    if gguf and gguf.get("skipped"):
        print(f"  GGUF skipped: {gguf['skipped']}")
    elif gguf:
        print(f"  GGUF ({gguf['gguf_type']}): {gguf['file']}")
        print(f"  Modelfile: {gguf['modelfile']}")
    print()
    _print_commands(result["serve"])
    return 0


def _serve_info(jobs, args: argparse.Namespace) -> int:
    info = jobs.serve_info(args.id, _user(args))
    if args.json:
        _print_json(info)
        return 0
    print(f"{info['job_id']}  {info['method']} · {info.get('base_model')}  (served model name {info['job_id']})")
    _print_commands(info)
    return 0


def _print_commands(info: dict) -> None:
    job, vllm, lora, gguf, chat = info["served_model_name"], info["vllm"], info.get("vllm_lora"), info["gguf"], \
        info["chat"]
    print("vLLM, the exported model" + ("" if vllm["ready"] else f"  (not exported yet: stackwise jobs merge {job})"))
    print(f"  {vllm['command']}")
    print("  # for stackwise's llm brain (it sends tool schemas, which vLLM accepts with a tool parser):")
    print(f"  {vllm['command_for_stackwise']}")
    if lora:
        print("vLLM, the LoRA adapter on its base (no merge)")
        print(f"  {lora['command']}")
    print("Ollama" + ("" if gguf["ready"] else f"  (no GGUF yet: stackwise jobs export {job} --format gguf)"))
    print(f"  {gguf['ollama']}")
    print(f"  {gguf['ollama_run']}")
    print("llama.cpp")
    print(f"  {gguf['llama_server']}")
    print(f"Chat with it from stackwise (vLLM at {vllm['url']}; Ollama: {gguf['ollama_url']}, llama.cpp: "
          f"{gguf['llama_server_url']})")
    print(f"  {chat['shell']}")
    print(f"  {chat['flags']}")
    print(f"  in a running chat: {chat['repl']}")
