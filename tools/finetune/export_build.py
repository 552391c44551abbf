"""Building the exports of :mod:`tools.finetune.export`: the vLLM folder (a merge in a subprocess, or the
weights linked from the run) and the GGUF file with its Modelfile. The caller holds the run's export lock.

Each is written in a hidden folder (or a ``.part`` file) and renamed into place only once complete, so a
server or a second reader never sees half an export, and a failed export leaves the previous one as it was.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tools.base import ToolError
from tools.finetune.export_folder import finish_folder, link_weights
from tools.finetune.export_gguf import gguf_command, is_plain_template, modelfile_text, run_converter
from tools.finetune.export_plan import ExportSource, read_config
from tools.finetune.export_serve import ExportPaths, readme_text, serve_commands


def up_to_date(record: Path, stamp: dict) -> bool:
    try:
        return json.loads(record.read_text(encoding="utf-8")).get("source") == stamp
    except (OSError, ValueError, AttributeError):
        return False


def _merge_in_subprocess(source: ExportSource, out: Path, log: Path, timeout_s: float) -> dict:
    from tools.finetune.backends import project_pythonpath

    command = [sys.executable, "-m", "tools.finetune.export_merge", "--base", str(source.base),
               "--adapter", str(source.weights), "--out", str(out), "--dtype", source.dtype]
    env = {**os.environ, "PYTHONPATH": project_pythonpath(), "TOKENIZERS_PARALLELISM": "false"}
    with log.open("ab") as err:
        err.write(f"--- {datetime.now(UTC).isoformat(timespec='seconds')} merge {source.job_id}\n".encode())
        err.flush()
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
                                   cwd=source.run, env=env, start_new_session=True)
        try:
            stdout, _ = process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise ToolError("timeout", f"Merging {source.job_id} took longer than {timeout_s:.0f} s and was "
                                       "stopped.") from None
        except BaseException:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise
    if process.returncode != 0:
        said = _last_line(log)
        if said.startswith("merge: "):
            kind = "disk_full" if "no space left" in said else "merge_failed"
            raise ToolError(kind, f"Merging {source.job_id} failed: {said.removeprefix('merge: ')}")
        raise ToolError("merge_failed", f"Merging {source.job_id} failed unexpectedly (exit {process.returncode}); "
                                        f"see {log}.")
    try:
        return json.loads(stdout.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {}


def _last_line(path: Path) -> str:
    try:
        lines = [x for x in path.read_text(encoding="utf-8", errors="replace").splitlines() if x.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


def ensure_vllm(source: ExportSource, paths: ExportPaths, *, force: bool, timeout_s: float) -> dict[str, Any]:
    """Make (or reuse) ``RUN/export/vllm``; returns what was done."""
    stamp = source.stamp()
    done = {"folder": str(paths.vllm), "made_from": source.kind, "dtype": source.dtype, "notes": source.notes}
    if not force and paths.vllm_ready() and up_to_date(paths.vllm / "serve.json", stamp):
        return {**done, "reused": True}
    for stale in paths.root.glob(".vllm-*"):       # left by an export that crashed (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = paths.root / f".vllm-{os.getpid()}"
    started = time.monotonic()
    try:
        if source.kind == "merge":
            done["merge"] = _merge_in_subprocess(source, tmp, paths.log, timeout_s)
        else:
            done["weights"] = link_weights(source.weights, tmp)
        done.update(finish_folder(tmp, source))
        served = serve_commands(source.job_id, source.run, method=source.method, base=source.base,
                                adapter=source.adapter, lora_rank=source.lora_rank,
                                model_type=read_config(tmp).get("model_type"))
        record = {"served_model_name": source.job_id, "job_id": source.job_id, "method": source.method,
                  "base_model": source.base_model, "base_model_path": str(source.base), "made_from": source.kind,
                  "dtype": source.dtype, "chat_template": done["chat_template"], "source": stamp,
                  "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
                  "commands": {"vllm": served["vllm"]["command"],
                               "vllm_for_stackwise": served["vllm"]["command_for_stackwise"],
                               "chat": served["chat"]["shell"]}}
        (tmp / "serve.json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(readme_text(source.job_id, served, source.kind, source.base_model),
                                       encoding="utf-8")
        _swap_in(tmp, paths.vllm)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno == errno.ENOSPC:
            raise ToolError("disk_full", f"The disk of {paths.root} filled up while exporting {source.job_id}; "
                                         "nothing was changed. Free some space and try again.") from None
        raise ToolError("export_failed", f"Exporting {source.job_id} failed: {exc}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**done, "reused": False, "seconds": round(time.monotonic() - started, 1)}


def _swap_in(tmp: Path, target: Path) -> None:
    """Put ``tmp`` where ``target`` is, replacing an older export only once the new one is complete."""
    old = target.with_name(f".{target.name}-old-{os.getpid()}")
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


# ---- GGUF --------------------------------------------------------------------------------------------------

def ensure_gguf(source: ExportSource, paths: ExportPaths, converter: Any, *, gguf_type: str, force: bool,
                timeout_s: float) -> dict[str, Any]:
    """Convert the vLLM folder to ``RUN/export/gguf/<job>.gguf`` and write the Modelfile (or reuse them)."""
    stamp = {"vllm": json.loads((paths.vllm / "serve.json").read_text(encoding="utf-8")).get("created_at"),
             "gguf_type": gguf_type}
    done = {"file": str(paths.gguf), "modelfile": str(paths.modelfile), "gguf_type": gguf_type,
            "converter": converter.where}
    if not force and paths.gguf_ready() and up_to_date(paths.gguf_record, stamp):
        return {**done, "reused": True}
    paths.gguf_dir.mkdir(parents=True, exist_ok=True)
    part = paths.gguf_dir / f".{paths.job_id}.partial.gguf"      # a .gguf name: the converter keeps it as given
    part.unlink(missing_ok=True)
    started = time.monotonic()
    try:
        run_converter(gguf_command(converter, paths.vllm, part, gguf_type), paths.gguf_dir / "convert.log", timeout_s)
        if not part.is_file() or part.stat().st_size == 0:
            raise ToolError("converter_failed", f"The GGUF converter finished without writing {part.name}; see "
                                                f"{paths.gguf_dir / 'convert.log'}.")
        part.replace(paths.gguf)
        paths.modelfile.write_text(modelfile_text(source.job_id, paths.gguf.name, paths.vllm,
                                                  is_plain_template(paths.vllm)), encoding="utf-8")
        paths.gguf_record.write_text(json.dumps({"source": stamp, "file": paths.gguf.name}) + "\n", encoding="utf-8")
    except OSError as exc:
        kind = "disk_full" if exc.errno == errno.ENOSPC else "export_failed"
        raise ToolError(kind, f"Writing the GGUF file of {source.job_id} failed: {exc}") from None
    finally:
        part.unlink(missing_ok=True)
    return {**done, "reused": False, "seconds": round(time.monotonic() - started, 1),
            "bytes": paths.gguf.stat().st_size}
