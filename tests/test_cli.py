"""The ``stackwise`` command line: exit codes, one JSON object on stdout, clear errors, no tracebacks.

Subprocess runs (the installed script, a fresh interpreter) cover what only a real process shows;
the rest calls ``bots.cli.main`` in-process, which runs the same code much faster.
"""

from __future__ import annotations

import io
import json
import sqlite3
import subprocess
import time

import pytest

from agent import Reply
from bots.cli import main
from memory.checkpoints import open_checkpointer

# Fine-tune requests in these conversations name a local model and data set (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("ft_workdir")

RECORD_KEYS = {"tool", "args", "ok", "result", "error"}


def run(bin_: str, env: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run([bin_, *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def one_json(stdout: str) -> dict:
    """stdout is exactly one JSON object and nothing else."""
    obj = json.loads(stdout)
    assert isinstance(obj, dict)
    assert stdout.strip().count("\n") == 0
    return obj


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# --- subprocess: the real script -----------------------------------------------------------------------

def test_tools_json_lists_every_tool_with_its_schema(stackwise_bin, cli_env):
    proc = run(stackwise_bin, cli_env, "tools", "--json")
    assert proc.returncode == 0
    listing = {t["name"]: t for t in one_json(proc.stdout)["tools"]}
    assert {"explain_concept", "embedding_distance", "launch_finetune", "finetune_status", "cancel_finetune",
            "shap_report", "word_count"} <= set(listing)
    assert listing["embedding_distance"]["schema"]["required"] == ["texts"]
    assert listing["launch_finetune"]["side_effects"] is True


def test_tool_runs_the_plugin_tool(stackwise_bin, cli_env):
    proc = run(stackwise_bin, cli_env, "tool", "word_count", "--args", '{"texts":["a b"]}', "--json")
    assert proc.returncode == 0, proc.stderr
    assert one_json(proc.stdout) == {"tool": "word_count", "args": {"texts": ["a b"]}, "ok": True,
                                     "result": {"counts": [2], "total": 2}, "error": None}


def test_tool_with_an_unknown_name_is_a_record_and_exit_1(stackwise_bin, cli_env):
    proc = run(stackwise_bin, cli_env, "tool", "no_such_tool", "--args", "{}", "--json")
    assert proc.returncode == 1
    record = one_json(proc.stdout)
    assert set(record) == RECORD_KEYS
    assert record["ok"] is False and record["error"]["type"] == "unknown_tool"
    assert "no_such_tool" in record["error"]["message"]


def test_tool_with_args_that_are_not_json(stackwise_bin, cli_env):
    proc = run(stackwise_bin, cli_env, "tool", "embedding_distance", "--args", "not json", "--json")
    assert proc.returncode == 1
    record = one_json(proc.stdout)
    assert (record["tool"], record["ok"], record["error"]["type"]) == ("embedding_distance", False, "invalid_json")
    assert "--args" in record["error"]["message"]


def test_ten_thousand_texts_are_refused_quickly_and_clearly(stackwise_bin, cli_env):
    args = json.dumps({"texts": [f"w{i}" for i in range(10_000)]})
    proc = run(stackwise_bin, cli_env, "tool", "embedding_distance", "--args", args, "--json")
    assert proc.returncode == 1
    record = one_json(proc.stdout)
    assert record["error"]["type"] == "invalid_args"
    assert "at most 64 texts" in record["error"]["message"]


def test_an_empty_message_is_exit_1_with_a_clear_message(stackwise_bin, cli_env):
    proc = run(stackwise_bin, cli_env, "ask", "")
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert "empty" in proc.stderr


@pytest.mark.parametrize("argv", [[], ["ask"], ["tool"], ["ask", "hi", "--brain", "gpt"], ["frobnicate"]])
def test_usage_errors_exit_2(stackwise_bin, cli_env, argv):
    proc = run(stackwise_bin, cli_env, *argv, timeout=60)
    assert proc.returncode == 2
    assert "usage" in proc.stderr.lower()
    assert proc.stdout == ""


def test_a_corrupt_thread_database_is_reported_and_left_untouched(stackwise_bin, cli_env, stackwise_home):
    stackwise_home.mkdir(parents=True, exist_ok=True)
    db = stackwise_home / "threads.sqlite"
    garbage = bytes(range(256)) * 16
    db.write_bytes(garbage)
    proc = run(stackwise_bin, cli_env, "ask", "hi", "--json")
    assert proc.returncode == 1
    error = one_json(proc.stdout)["error"]
    assert "database" in error["message"] and str(db) in error["message"]
    assert db.read_bytes() == garbage


def test_a_locked_thread_database_fails_fast_with_locked(stackwise_bin, cli_env, stackwise_home):
    db = stackwise_home / "threads.sqlite"
    open_checkpointer(db).conn.close()          # an existing thread store, as after any earlier use
    holder = sqlite3.connect(db, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        started = time.monotonic()
        proc = run(stackwise_bin, cli_env, "ask", "hi", "--json", timeout=90)
        elapsed = time.monotonic() - started
    finally:
        holder.rollback()
        holder.close()
    assert proc.returncode == 1
    assert "locked" in one_json(proc.stdout)["error"]["message"]
    assert elapsed < 25, f"took {elapsed:.1f} s to report the lock"


def test_ask_yes_attempts_the_launch_without_stopping(stackwise_bin, cli_env):
    proc = run(stackwise_bin, cli_env, "ask", "fine-tune Qwen2.5-0.5B on data.jsonl", "--yes", "--json")
    reply = Reply.model_validate(one_json(proc.stdout))
    assert reply.pending is None
    [call] = [c for c in reply.tool_calls if c.tool == "launch_finetune"]
    assert call.args["base_model"] == "Qwen2.5-0.5B" and call.args["dataset"] == "data.jsonl"
    assert call.ok or call.error["type"] != "declined"
    assert proc.returncode == (0 if call.ok else 1)


# --- in-process: same code, no interpreter start-up --------------------------------------------------------

def test_ask_json_prints_exactly_one_reply(capsys):
    code, out, _ = run_main(capsys, "ask", "hi", "--thread", "t9", "--user", "u9", "--json")
    assert code == 0
    reply = Reply.model_validate(one_json(out))
    assert reply.thread_id == "t9" and reply.pending is None and "I can" in reply.answer


def test_ask_json_stopping_for_confirmation_is_a_success(capsys):
    code, out, _ = run_main(capsys, "ask", "cancel ft-3", "--json", "--user", "u9")
    assert code == 0
    pending = one_json(out)["pending"]
    assert (pending["tool"], pending["args"]) == ("cancel_finetune", {"job_id": "ft-3"})


def test_plain_text_reply_shows_steps_answer_and_how_to_confirm(capsys):
    from bots.commands import render_reply

    _, out, _ = run_main(capsys, "ask", "用 LoRA 在 data.jsonl 上微调 Qwen2.5-0.5B", "--json", "--user", "u9")
    buf = io.StringIO()
    render_reply(Reply.model_validate(one_json(out)), out=buf)
    text = buf.getvalue()
    assert "plan:" in text and "route:" in text
    assert "微调 Qwen2.5-0.5B" in text
    assert "yes/no" in text and "--yes" in text


@pytest.mark.parametrize(("texts", "words"), [
    ([], ["at least 2", "got 0"]),
    (["only one"], ["at least 2", "got 1"]),
    ("king queen", ["texts", "list"]),
])
def test_tool_refuses_bad_texts_with_a_readable_message(capsys, texts, words):
    code, out, err = run_main(capsys, "tool", "embedding_distance", "--args", json.dumps({"texts": texts}), "--json")
    assert code == 1
    record = one_json(out)
    assert record["ok"] is False and record["error"]["type"] == "invalid_args"
    assert record["args"] == {"texts": texts}
    for word in words:
        assert word in record["error"]["message"]
    assert err == ""


def test_tool_with_args_that_are_not_an_object(capsys):
    code, out, _ = run_main(capsys, "tool", "word_count", "--args", '["a b"]', "--json")
    assert code == 1
    assert one_json(out)["error"]["type"] == "invalid_args"


def test_tool_without_json_prints_the_result_or_the_error(capsys):
    code, out, err = run_main(capsys, "tool", "word_count", "--args", '{"texts":["a b c"]}')
    assert code == 0 and json.loads(out) == {"counts": [3], "total": 3}
    code, out, err = run_main(capsys, "tool", "no_such_tool")
    assert code == 1 and out == "" and "unknown_tool" in err


@pytest.mark.parametrize(("text", "kind"), [
    ("x" * 100_000, "message_too_long"),
    ("hi\x07there", "invalid_message"),
    ("hi\x1b[2Jthere", "invalid_message"),
    ("   ", "empty_message"),
])
def test_bad_messages_exit_1_with_one_json_error(capsys, text, kind):
    code, out, _ = run_main(capsys, "ask", text, "--json")
    assert code == 1
    error = one_json(out)["error"]
    assert error["type"] == kind and error["message"]


def test_bad_messages_without_json_go_to_stderr(capsys):
    code, out, err = run_main(capsys, "ask", "x" * 100_000)
    assert code == 1 and out == ""
    assert "100,000" in err and "limit" in err


def test_a_bad_setting_exits_1_with_a_clear_message(capsys, monkeypatch):
    monkeypatch.setenv("STACKWISE_BRAIN", "foo")
    code, out, _ = run_main(capsys, "ask", "hi", "--json")
    assert code == 1
    error = one_json(out)["error"]
    assert error["type"] == "settings" and "foo" in error["message"]


def test_home_flag_puts_the_threads_there(capsys, tmp_path):
    home = tmp_path / "elsewhere"
    code, _, _ = run_main(capsys, "--home", str(home), "ask", "hi", "--json", "--user", "u9")
    assert code == 0
    assert (home / "threads.sqlite").is_file()


def test_tool_does_not_need_the_thread_database(capsys, stackwise_home):
    stackwise_home.mkdir(parents=True, exist_ok=True)
    (stackwise_home / "threads.sqlite").write_bytes(b"\x00garbage" * 100)
    code, out, _ = run_main(capsys, "tool", "word_count", "--args", '{"texts":["a b"]}', "--json")
    assert one_json(out)["ok"] is True
    assert code == 0
