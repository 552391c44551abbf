"""Merge a LoRA adapter into its base and save the weights: ``python -m tools.finetune.export_merge``.

The export runs this in a subprocess of its own (a 7B merge holds ~15 GB of RAM for minutes; when it ends the
memory is back, and a crash or an out-of-memory kill costs the export, not the bot). It writes the merged
weights (safetensors) and the model's config into ``--out``; config, tokenizer and chat template files for
serving are the export's job (:mod:`tools.finetune.export_folder`). Exit 0 with one JSON line on stdout
(``dtype``, ``params``, ``seconds``), or 1 with one line on stderr.
"""

from __future__ import annotations

import argparse
import errno
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from tools.finetune.export_plan import DTYPES, merge_load_kwargs

SHARD = "5GB"


class MergeError(Exception):
    """A merge that cannot be done, with a one-line reason."""


def merge_adapter(base: Path, adapter: Path, out: Path, dtype: str) -> dict[str, Any]:
    """Load ``base`` unquantized in ``dtype``, apply ``adapter``, merge, and save the model to ``out``."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    started = time.monotonic()
    try:
        model = AutoModelForCausalLM.from_pretrained(base, **merge_load_kwargs(dtype))
    except (OSError, ValueError, KeyError) as exc:
        raise MergeError(f"cannot load the base model from {base}: {_one_line(exc)}") from None
    try:
        model = PeftModel.from_pretrained(model, str(adapter))
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise MergeError(f"the adapter in {adapter} does not fit the base model {base}: {_one_line(exc)}") from None
    merged = model.merge_and_unload()
    params = sum(p.numel() for p in merged.parameters())
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out), max_shard_size=SHARD)
    return {"dtype": dtype, "params": params, "seconds": round(time.monotonic() - started, 1)}


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:400]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.finetune.export_merge", description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, type=Path, help="the base model folder")
    parser.add_argument("--adapter", required=True, type=Path, help="the LoRA adapter folder")
    parser.add_argument("--out", required=True, type=Path, help="where the merged weights go")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    args = parser.parse_args(argv)
    # Library deprecation chatter (peft calling renamed transformers helpers) is not the user's concern.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        result = merge_adapter(args.base, args.adapter, args.out, args.dtype)
    except MergeError as exc:
        print(f"merge: {exc}", file=sys.stderr)
        return 1
    except MemoryError:
        print("merge: out of memory while merging — the whole base model is loaded in RAM; free memory or merge "
              "on a machine with more", file=sys.stderr)
        return 1
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            print(f"merge: no space left on the disk of {args.out}", file=sys.stderr)
            return 1
        raise
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
