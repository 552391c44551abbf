"""The MCP server (``bots.mcp_server``) driven by the official ``mcp`` client.

A real server process over stdio (one per module: starting it and loading the embedder is the slow
part) and another over streamable HTTP on a loopback port; the bridge's own rules (images only from
``$STACKWISE_HOME``, confirmation with a preflight, crashes answered plainly) in-process.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from mcp import Client, ClientSession, StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from pydantic import BaseModel

from agent import Toolbox
from agent.settings import Settings
from bots.mcp_server import CONFIRM, ToolBridge, mcp_user, run_mcp
from tools.base import tool
from tools.registry import ToolRegistry

ROOT = Path(__file__).resolve().parents[1]
SERVER = [str(Path(sys.executable).parent / "stackwise"), "mcp"]  # the command users run
RECORD_KEYS = {"tool", "args", "ok", "result", "error"}
BUILTINS = {"explain_concept", "embedding_distance", "launch_finetune", "finetune_status", "cancel_finetune",
            "shap_report", "kb_ingest"}
SIDE_EFFECTS = {"launch_finetune", "cancel_finetune", "export_finetune"}
PNG = b"\x89PNG\r\n\x1a\n"


def server_env(home: Path) -> dict[str, str]:
    """Like ``cli_env``: this home only, the test plugin on PYTHONPATH, quiet warnings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STACKWISE_")}
    env["STACKWISE_HOME"] = str(home)
    env["PYTHONWARNINGS"] = "ignore"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def record_of(result: Any) -> dict:
    """The tool-call record: the first content item, JSON text, and the same as structuredContent."""
    assert result.content[0].type == "text"
    record = json.loads(result.content[0].text)
    assert set(record) == RECORD_KEYS
    assert result.structured_content == record
    assert result.is_error is (not record["ok"])
    return record


def images_of(result: Any) -> list[bytes]:
    return [base64.b64decode(c.data) for c in result.content if c.type == "image"]


class BackgroundSession:
    """One MCP client session kept open across tests. anyio needs the transport and the session
    entered and left by one task, so a private event loop in a thread owns them and the tests hand
    it coroutines."""

    def __init__(self, connect: Callable[[], Any], *, timeout: float = 120):
        self._connect = connect
        self._timeout = timeout
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.session: ClientSession | None = None
        self.home: Path | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="mcp-client", daemon=True)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            async with self._connect() as session:
                self.session = session
                self._ready.set()
                await self._stop.wait()
        except BaseException as exc:  # handed to the test thread by __enter__
            self._error = exc
        finally:
            self._ready.set()

    def __enter__(self) -> BackgroundSession:
        self._thread.start()
        if not self._ready.wait(self._timeout) or self.session is None:
            raise RuntimeError(f"the MCP session did not start: {self._error!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def run(self, make: Callable[[ClientSession], Awaitable[Any]], timeout: float = 120) -> Any:
        assert self._loop is not None and self.session is not None
        return asyncio.run_coroutine_threadsafe(make(self.session), self._loop).result(timeout)

    def call(self, name: str, args: dict) -> Any:
        return self.run(lambda s: s.call_tool(name, args))


@pytest.fixture(scope="module")
def stdio(tmp_path_factory) -> Any:
    """``stackwise mcp`` over stdio; its stderr must never show a traceback."""
    home = tmp_path_factory.mktemp("mcp-stdio-home")
    log_path = home.parent / "mcp-stdio-server.log"
    params = StdioServerParameters(command=SERVER[0], args=SERVER[1:], env=server_env(home), cwd=str(ROOT))
    with log_path.open("w+", encoding="utf-8") as errlog:

        @asynccontextmanager
        async def connect() -> AsyncIterator[ClientSession]:
            async with stdio_client(params, errlog=errlog) as (read, write), ClientSession(read, write) as session:
                await session.initialize()
                yield session

        with BackgroundSession(connect) as client:
            client.home = home
            yield client
    log = log_path.read_text(encoding="utf-8")
    assert "Traceback" not in log, log


# --- stdio: the official client against a real server process ------------------------------------

def test_lists_every_tool_with_its_schema_and_confirm_on_side_effect_tools(stdio):
    listed = {t.name: t for t in stdio.run(lambda s: s.list_tools()).tools}
    declared = {t["name"]: t for t in Toolbox(Settings.from_env()).tools()}
    assert BUILTINS | {"word_count"} <= set(listed)  # the plugin appears from the same declaration
    assert set(listed) == set(declared)
    for name, t in listed.items():
        spec = declared[name]
        assert t.description.startswith(spec["description"])
        if name in SIDE_EFFECTS:
            schema = json.loads(json.dumps(t.input_schema))
            confirm = schema["properties"].pop(CONFIRM)
            assert confirm["type"] == "boolean" and "confirm" in confirm["description"].lower()
            assert schema.pop("required")[-1] == CONFIRM
            expected = dict(spec["schema"])
            expected.pop("required", None)
            assert schema == expected
            assert t.annotations is not None and t.annotations.destructive_hint is True
        else:
            assert t.input_schema == spec["schema"]
            assert CONFIRM not in t.input_schema.get("properties", {})
    assert listed["embedding_distance"].input_schema["required"] == ["texts"]
    assert set(listed["launch_finetune"].input_schema["required"]) == {"base_model", "dataset", CONFIRM}


def test_embedding_distance_answers_the_record_as_json(stdio):
    result = stdio.call("embedding_distance", {"texts": ["king", "queen"]})
    record = record_of(result)
    assert record["ok"] is True and record["error"] is None
    assert record["args"] == {"texts": ["king", "queen"]}
    (pair,) = record["result"]["pairs"]
    assert (pair["a"], pair["b"]) == (0, 1) and 0 < pair["cosine"] <= 1
    assert images_of(result) == []  # two texts: no plot


def test_three_texts_bring_the_pca_plot_as_image_content(stdio):
    result = stdio.call("embedding_distance", {"texts": ["king", "queen", "banana"]})
    record = record_of(result)
    plot = Path(record["result"]["plot"])
    assert plot.is_relative_to(stdio.home)
    (image,) = images_of(result)
    assert [c.mime_type for c in result.content if c.type == "image"] == ["image/png"]
    assert image.startswith(PNG) and image == plot.read_bytes()


def test_bad_arguments_are_an_error_result_with_the_validation_message(stdio):
    result = stdio.call("embedding_distance", {"texts": ["lonely"]})
    record = record_of(result)
    assert result.is_error is True
    assert record["error"]["type"] == "invalid_args"
    assert "give at least 2 texts to compare" in record["error"]["message"]
    record = record_of(stdio.call("embedding_distance", {"texts": ["a", "b"], "colour": "red"}))
    assert record["error"]["type"] == "invalid_args" and "colour" in record["error"]["message"]


def test_unknown_tool_is_an_error_result(stdio):
    record = record_of(stdio.call("no_such_tool", {}))
    assert record["error"]["type"] == "unknown_tool" and "embedding_distance" in record["error"]["message"]


@pytest.mark.parametrize("confirm", [None, False, "yes", 1])
def test_side_effect_tool_without_confirm_true_runs_nothing(stdio, confirm):
    args: dict[str, Any] = {"job_id": "ft-3"}
    if confirm is not None:
        args[CONFIRM] = confirm
    result = stdio.call("cancel_finetune", args)
    record = record_of(result)
    assert result.is_error is True
    # Not "not_available": the tool itself was never called.
    assert record["error"]["type"] == "confirmation_required"
    message = record["error"]["message"]
    assert "Cancel job ft-3" in message and '"confirm": true' in message
    assert record["args"] == {"job_id": "ft-3"}


def test_unconfirmed_call_checks_the_arguments_first(stdio):
    record = record_of(stdio.call("launch_finetune", {"base_model": "Qwen/Qwen2.5-0.5B"}))
    assert record["error"]["type"] == "invalid_args" and "dataset" in record["error"]["message"]


def test_confirmed_side_effect_tool_runs(stdio):
    result = stdio.call("cancel_finetune", {"job_id": "ft-3", CONFIRM: True})
    record = record_of(result)
    # It ran (without "confirm" in its args): there is no job ft-3 for the MCP user, and it says so.
    assert result.is_error is True
    assert record["error"]["type"] == "not_found" and "ft-3" in record["error"]["message"]
    assert record["args"] == {"job_id": "ft-3"}


def test_plugin_tool_runs(stdio):
    record = record_of(stdio.call("word_count", {"texts": ["a b", "c"]}))
    assert record["ok"] is True and record["result"] == {"counts": [2, 1], "total": 3}


# --- processes: stdio end of input, streamable HTTP -----------------------------------------------

def test_stdio_server_stops_cleanly_when_its_input_ends(tmp_path):
    proc = subprocess.run(SERVER, input="", env=server_env(tmp_path / "home"), cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and "Traceback" not in proc.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_listening(proc: subprocess.Popen, port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the HTTP server exited early"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"nothing answered on port {port} within {timeout} s")


async def _http_round_trip(url: str) -> tuple[set[str], Any, str, Any]:
    """The initialize handshake (ClientSession), then the 2026 per-request protocol (``Client``, auto mode)."""
    async with streamable_http_client(url) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        names = {t.name for t in (await session.list_tools()).tools}
        result = await session.call_tool("embedding_distance", {"texts": ["king", "queen"]})
    async with Client(url) as client:
        modern = await client.call_tool("cancel_finetune", {"job_id": "ft-3"})
        version = client.protocol_version
    return names, result, version, modern


def test_streamable_http_lists_and_calls_tools(tmp_path):
    port = _free_port()
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.Popen([*SERVER, "--http", "--port", str(port)], env=server_env(tmp_path / "home"),
                                cwd=ROOT, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr)
    try:
        _wait_until_listening(proc, port)
        names, result, version, modern = asyncio.run(_http_round_trip(f"http://127.0.0.1:{port}/mcp"))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert BUILTINS | {"word_count"} <= names
    record = record_of(result)
    assert record["ok"] is True and len(record["result"]["pairs"]) == 1
    assert version >= "2026" and record_of(modern)["error"]["type"] == "confirmation_required"
    log = err.read_text()
    assert code == 0, log  # SIGTERM is a clean stop
    assert f"http://127.0.0.1:{port}/mcp" in log and "Traceback" not in log
    assert out.read_text() == ""  # logs go to stderr only


# --- in-process: the bridge's rules --------------------------------------------------------------

class _Nothing(BaseModel):
    pass


def test_images_are_sent_only_from_inside_the_home(stackwise_home, tmp_path):
    inside = stackwise_home / "reports" / "plot.png"
    inside.parent.mkdir(parents=True)
    inside.write_bytes(PNG + b"inside")
    outside = tmp_path / "outside.png"
    outside.write_bytes(PNG + b"outside")
    link = stackwise_home / "reports" / "link.png"
    link.symlink_to(outside)
    (stackwise_home / "reports" / "fake.png").write_text("not an image")
    (stackwise_home / "reports" / "notes.txt").write_bytes(PNG)

    @tool(args=_Nothing)
    def pictures(args: _Nothing, ctx) -> dict:
        """Return image paths, good and bad."""
        paths = [inside, outside, link, stackwise_home / "reports" / "fake.png",
                 stackwise_home / "reports" / "notes.txt", stackwise_home / "missing.png"]
        return {"attachments": [{"kind": "image", "path": str(p), "caption": p.name} for p in paths],
                "plot": str(inside), "plots": {"again": str(inside), "etc": "/etc/passwd"}}

    bridge = ToolBridge(Toolbox(Settings.from_env(), ToolRegistry([pictures])), user_id="u1")
    result = bridge.call("pictures", {})
    assert record_of(result)["ok"] is True
    assert images_of(result) == [PNG + b"inside"]  # once, though named three times


def test_side_effect_tool_shows_its_preflight_and_runs_only_when_confirmed(stackwise_home):
    runs: list[str] = []

    class JobArgs(BaseModel):
        name: str

    @tool(args=JobArgs, side_effects=True, preflight=lambda args, ctx: {"rows": 3, "warnings": ["few rows"]},
          preview=lambda args, lang: f"Start job {args['name']}.")
    def start_job(args: JobArgs, ctx) -> dict:
        """Start a job."""
        runs.append(ctx.user_id)
        return {"started": args.name}

    bridge = ToolBridge(Toolbox(Settings.from_env(), ToolRegistry([start_job])), user_id="alice")
    (listed,) = bridge.list_tools()
    assert listed.input_schema["required"] == ["name", CONFIRM]
    record = record_of(bridge.call("start_job", {"name": "a"}))
    assert record["error"]["type"] == "confirmation_required"
    assert "Start job a." in record["error"]["message"] and "rows: 3" in record["error"]["message"]
    assert "few rows" in record["error"]["message"]
    assert runs == []
    record = record_of(bridge.call("start_job", {"name": "a", CONFIRM: True}))
    assert record == {"tool": "start_job", "args": {"name": "a"}, "ok": True, "result": {"started": "a"},
                      "error": None}
    assert runs == ["alice"]


def test_an_unexpected_error_is_a_plain_error_result(stackwise_home, caplog):
    class Broken(Toolbox):
        def call_tool(self, name, args, *, user_id="local"):
            raise RuntimeError("secret internals")

    bridge = ToolBridge(Broken(Settings.from_env()), user_id="u1")
    result = bridge.call("embedding_distance", {"texts": ["a", "b"]})
    record = record_of(result)
    assert record["error"]["type"] == "internal_error"
    assert "RuntimeError" in record["error"]["message"]
    assert "secret internals" not in result.content[0].text and "Traceback" not in result.content[0].text
    assert "secret internals" in caplog.text  # the details go to the log


def test_mcp_user_comes_from_the_environment():
    assert mcp_user({}) == "mcp"
    assert mcp_user({"STACKWISE_MCP_USER": "  "}) == "mcp"
    assert mcp_user({"STACKWISE_MCP_USER": "alice"}) == "alice"


def test_http_port_in_use_is_a_clear_error(capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        code = run_mcp(Settings.from_env(), http=True, port=busy.getsockname()[1])
    assert code == 1
    assert "cannot listen on 127.0.0.1" in capsys.readouterr().err
