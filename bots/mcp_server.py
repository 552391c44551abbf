"""``stackwise mcp``: every stackwise tool as a Model Context Protocol tool (the official ``mcp`` SDK).

How the tools map:

- **Listing.** Each tool of the registry (built-ins and ``stackwise.tools`` plugins alike) is one MCP
  tool: its name, its description (the tool's docstring) and, as ``inputSchema``, the JSON schema of
  its pydantic args model — all from the one declaration, through ``Toolbox.tools()``. The low-level
  ``Server`` is used because it takes those schemas as they are.
- **Confirmation.** A tool with side effects (``launch_finetune``, ``cancel_finetune``) gets a
  required boolean ``confirm`` property in its advertised schema. A call without ``confirm: true``
  validates the arguments, runs the tool's preflight (read-only checks, if it has one) and answers an
  error result (``isError``) of type ``confirmation_required`` saying what would happen and how to
  confirm — the tool itself never runs. With ``confirm: true`` the flag is stripped and the tool runs.
  MCP clients (usually an LLM) should ask their user before confirming, as the chat channels do.
- **Results.** The tool-call record of the public contract, ``{"tool", "args", "ok", "result",
  "error"}``, as JSON text (and as ``structuredContent``); ``ok: false`` records come back with
  ``isError: true``. Images a tool made (``result["attachments"]`` items of kind ``image``,
  ``result["plot"]``, the values of ``result["plots"]``) follow as MCP image content (base64 PNG or
  JPEG) — only files inside ``$STACKWISE_HOME``, where the tools write; other paths are ignored.
- **Errors.** Nothing unexpected reaches the client as a traceback: a crash becomes an error result
  with a plain message (type ``internal_error``), and the traceback goes to the log (stderr).
- **User.** MCP carries no user identity; every call of one server runs as ``$STACKWISE_MCP_USER``
  (default ``mcp``): that user's uploads folder and jobs. Run one server per user.
- **Transports.** ``stackwise mcp`` serves over stdio (stdout is the protocol channel, so all logs go
  to stderr); ``stackwise mcp --http [--host H] --port P`` serves streamable HTTP at
  ``http://H:P/mcp``. HTTP has no authentication: keep it on loopback (the default, with the SDK's
  DNS-rebinding protection) or behind an authenticating proxy.

Tool calls run one at a time in a worker thread, so the event loop keeps answering (lists, pings)
while a long SHAP report or model load runs.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mcp import types

log = logging.getLogger(__name__)

SERVER_NAME = "stackwise"
USER_ENV = "STACKWISE_MCP_USER"
DEFAULT_USER = "mcp"
CONFIRM = "confirm"
CONFIRM_DESCRIPTION = ("Set true to confirm: this starts or changes a job (the call has side effects). "
                       "Without it nothing runs and the error result says what would happen.")
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}
MAX_IMAGES = 8
MAX_IMAGE_BYTES = 8 * 1024 * 1024
INSTRUCTIONS = (
    "stackwise: tools for people who build with the AI stack — explain a concept from a bilingual "
    "knowledge base, measure embedding distances, fine-tune models and watch the jobs, explain a model "
    "with SHAP. Each result is the tool-call record as JSON (tool, args, ok, result, error), plus any "
    "plots as images. Tools with a required `confirm` argument have side effects: call them without it "
    "to see what would happen, ask the user, and call again with confirm: true only after they agree."
)


def mcp_user(env: dict[str, str] | None = None) -> str:
    """The user every MCP call runs as: ``$STACKWISE_MCP_USER``, else ``mcp``."""
    value = (os.environ if env is None else env).get(USER_ENV, "").strip()
    return value or DEFAULT_USER


def _record(tool: str, args: Any, *, ok: bool, result: Any = None, error: dict | None = None) -> dict:
    return {"tool": tool, "args": args, "ok": ok, "result": result, "error": error}


def _tool_error(exc: Exception) -> dict | None:
    """``{"type", "message"}`` of a tool's ``ToolError`` (a user mistake), None for anything else.
    Bots do not import ``tools``; a ToolError is known by its ``to_dict()``."""
    to_dict = getattr(exc, "to_dict", None)
    if callable(to_dict) and isinstance(getattr(exc, "type", None), str):
        error = to_dict()
        if isinstance(error, dict) and {"type", "message"} <= set(error):
            return error
    return None


class ToolBridge:
    """The MCP face of a ``Toolbox``: tool definitions, and calls answered as ``CallToolResult``."""

    def __init__(self, toolbox: Any, *, user_id: str = DEFAULT_USER):
        self.toolbox = toolbox
        self.user_id = user_id
        self.home = Path(toolbox.settings.home).expanduser().resolve()
        self._described = {t["name"]: t for t in toolbox.tools()}
        self._tools = [self._definition(t) for t in self._described.values()]
        self._lock = threading.Lock()  # one call at a time: models and stores are shared

    # --- listing ----------------------------------------------------------------------------
    @staticmethod
    def _definition(described: dict) -> types.Tool:
        schema = json.loads(json.dumps(described["schema"]))  # a private copy
        description = described["description"]
        annotations = None
        if described["side_effects"]:
            props = schema.setdefault("properties", {})
            if CONFIRM not in props:
                props[CONFIRM] = {"type": "boolean", "title": "Confirm", "description": CONFIRM_DESCRIPTION}
            required = schema.setdefault("required", [])
            if CONFIRM not in required:
                required.append(CONFIRM)
            description += ("\n\nHas side effects: only runs with confirm: true — ask the user first. "
                            "Without it the reply says what would happen.")
            annotations = types.ToolAnnotations(read_only_hint=False, destructive_hint=True)
        return types.Tool(name=described["name"], description=description, input_schema=schema,
                          annotations=annotations)

    def list_tools(self) -> list[types.Tool]:
        return [t.model_copy(deep=True) for t in self._tools]

    def input_schema(self, name: str) -> dict | None:
        for t in self._tools:
            if t.name == name:
                return t.input_schema
        return None

    # --- calls ------------------------------------------------------------------------------
    def call(self, name: str, arguments: dict[str, Any] | None) -> types.CallToolResult:
        """Run one call (blocking; never raises): the record as JSON text, images, ``isError``."""
        args = dict(arguments or {})
        try:
            with self._lock:
                record = self._run(name, args)
            return self._result(record)
        except Exception as exc:  # a bug: log it, answer plainly, keep serving
            log.exception("MCP call of %s failed unexpectedly", name)
            message = f"{name} failed unexpectedly ({type(exc).__name__}); the stackwise server log has the details."
            return self._result(_record(name, args, ok=False, error={"type": "internal_error", "message": message}))

    def _run(self, name: str, args: dict[str, Any]) -> dict:
        described = self._described.get(name)
        if described is not None and described["side_effects"]:
            confirmed = args.get(CONFIRM) is True
            if CONFIRM not in described["schema"].get("properties", {}):  # ours, not the tool's own field
                args.pop(CONFIRM, None)
            if not confirmed:
                return self._unconfirmed(name, args)
        return self.toolbox.call_tool(name, args, user_id=self.user_id)

    def _unconfirmed(self, name: str, args: dict[str, Any]) -> dict:
        """What the call would do (arguments checked, preflight run), and how to confirm it; never runs it."""
        from agent.brains.local import LocalBrain

        registry = self.toolbox.registry
        try:
            preflight = registry.preflight(name, args, self.toolbox.context(self.user_id))
        except Exception as exc:
            error = _tool_error(exc)
            if error is None:
                raise
            return _record(name, args, ok=False, error=error)
        preview = LocalBrain.preview_text(registry.get(name), args, preflight, "en")
        message = (f"Not run — {name} has side effects and needs a confirmation. It would do this:\n{preview}\n"
                   f"If the user agrees, call {name} again with the same arguments and \"{CONFIRM}\": true.")
        return _record(name, args, ok=False, error={"type": "confirmation_required", "message": message})

    def _result(self, record: dict) -> types.CallToolResult:
        text = json.dumps(record, ensure_ascii=False, default=str)
        content: list[Any] = [types.TextContent(text=text)]
        if record.get("ok"):
            content += self._images(record.get("result"))
        return types.CallToolResult(content=content, structured_content=json.loads(text),
                                    is_error=not record.get("ok"))

    # --- images -----------------------------------------------------------------------------
    def _images(self, result: Any) -> list[types.ImageContent]:
        if not isinstance(result, dict):
            return []
        candidates: list[Any] = [a.get("path") for a in result.get("attachments") or []
                                 if isinstance(a, dict) and a.get("kind") == "image"]
        candidates.append(result.get("plot"))
        plots = result.get("plots")
        if isinstance(plots, dict):
            candidates += list(plots.values())
        elif isinstance(plots, list | tuple):
            candidates += list(plots)
        images: list[types.ImageContent] = []
        seen: set[Path] = set()
        for raw in candidates:
            if len(images) >= MAX_IMAGES:
                break
            image = self._image(raw, seen)
            if image is not None:
                images.append(image)
        return images

    def _image(self, raw: Any, seen: set[Path]) -> types.ImageContent | None:
        """An image file the tool wrote inside ``$STACKWISE_HOME``, as base64; anything else: None."""
        if not isinstance(raw, str) or not raw:
            return None
        try:
            path = Path(raw).resolve(strict=True)  # follows links: a link out of home stays out
        except (OSError, RuntimeError):
            return None
        if path in seen:
            return None
        if not path.is_relative_to(self.home):
            log.warning("not sending %s: images are sent only from %s", path, self.home)
            return None
        mime = IMAGE_TYPES.get(path.suffix.lower())
        try:
            if mime is None or not path.is_file() or path.stat().st_size > MAX_IMAGE_BYTES:
                return None
            data = path.read_bytes()
        except OSError as exc:
            log.warning("could not read image %s: %s", path, exc)
            return None
        sniffed = "image/png" if data.startswith(b"\x89PNG\r\n\x1a\n") else (
            "image/jpeg" if data.startswith(b"\xff\xd8\xff") else None)
        if sniffed != mime:
            return None
        seen.add(path)
        return types.ImageContent(data=base64.b64encode(data).decode("ascii"), mime_type=mime)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("stackwise")
    except PackageNotFoundError:
        return "0"


def build_server(bridge: ToolBridge) -> Any:
    """The low-level MCP ``Server`` answering ``tools/list`` and ``tools/call`` from ``bridge``."""
    import anyio
    from mcp.server import Server

    async def list_tools(ctx: Any, params: types.PaginatedRequestParams | None) -> types.ListToolsResult:
        return types.ListToolsResult(tools=bridge.list_tools())

    async def call_tool(ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
        return await anyio.to_thread.run_sync(bridge.call, params.name, params.arguments)

    return Server(SERVER_NAME, version=_version(), title="stackwise", instructions=INSTRUCTIONS,
                  get_tool_input_schema=bridge.input_schema, on_list_tools=list_tools, on_call_tool=call_tool)


async def _serve_stdio(server: Any) -> None:
    from mcp.server.stdio import stdio_server

    async with stdio_server() as (read_stream, write_stream):
        await server.run(read_stream, write_stream, server.create_initialization_options())


async def _serve_http(server: Any, sock: socket.socket, host: str, log_level: str) -> None:
    import uvicorn

    app = server.streamable_http_app(host=host)  # loopback hosts get DNS-rebinding protection
    # log_config=None: uvicorn's loggers go through ours (stderr); its default access log writes to stdout.
    config = uvicorn.Config(app, log_config=None, log_level=log_level.lower(), access_log=False,
                            lifespan="on", timeout_graceful_shutdown=3)
    await uvicorn.Server(config).serve(sockets=[sock])


def _listen(host: str, port: int) -> socket.socket:
    """A bound socket for ``host:port`` (port 0: any free one); OSError when it cannot be had."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


@contextmanager
def _sigterm_stops() -> Iterator[None]:
    """SIGTERM ends the server like Ctrl-C does (a clean stop, exit code 0), not as a killed process."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_mcp(settings: Any, *, http: bool = False, host: str = "127.0.0.1", port: int = 8765) -> int:
    """Serve the tools over stdio (default) or streamable HTTP at ``http://host:port/mcp``; returns the
    exit code: 0 after a clean stop (stdin closed, Ctrl-C, SIGTERM), 1 when the port cannot be had."""
    import anyio

    from agent import Toolbox

    user_id = mcp_user()
    toolbox = Toolbox(settings)
    try:
        server = build_server(ToolBridge(toolbox, user_id=user_id))
        with _sigterm_stops():
            if not http:
                log.info("stackwise MCP server on stdio, running tools as user %r", user_id)
                anyio.run(_serve_stdio, server)
                return 0
            try:
                sock = _listen(host, port)
            except OSError as exc:
                sys.stderr.write(f"error: cannot listen on {host}:{port}: {exc.strerror or exc}\n")
                return 1
            bound = sock.getsockname()
            shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
            if bound[0] not in ("127.0.0.1", "::1") and not bound[0].startswith("127."):
                log.warning("the MCP server on %s has no authentication; anyone who can reach it can run tools",
                            shown)
            sys.stderr.write(f"stackwise MCP server on http://{shown}:{bound[1]}/mcp (tools run as user "
                             f"{user_id!r}); Ctrl-C stops it\n")
            sys.stderr.flush()
            with sock:
                anyio.run(_serve_http, server, sock, host, settings.log_level)
    except KeyboardInterrupt:
        log.info("stackwise MCP server stopped")
    finally:
        toolbox.close()
    return 0


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0–65535, not {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    """``python -m bots.mcp_server [--http] [--host H] [--port P] [--home DIR]``."""
    for var, value in (("HF_HUB_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false"), ("ANONYMIZED_TELEMETRY", "False")):
        os.environ.setdefault(var, value)
    parser = argparse.ArgumentParser(prog="stackwise mcp", description="Serve the stackwise tools over MCP.")
    parser.add_argument("--http", action="store_true", help="serve streamable HTTP instead of stdio")
    parser.add_argument("--host", default="127.0.0.1", help="HTTP address (default 127.0.0.1)")
    parser.add_argument("--port", type=_port, default=8765, help="HTTP port (default 8765; 0: any free port)")
    parser.add_argument("--home", help="data folder (default: $STACKWISE_HOME or ~/.stackwise)")
    args = parser.parse_args(argv)

    from agent.settings import Settings, SettingsError

    try:
        settings = Settings.from_env(home=args.home)
    except SettingsError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    level = getattr(logging, str(settings.log_level).upper(), logging.WARNING)
    logging.basicConfig(level=level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    return run_mcp(settings, http=args.http, host=args.host, port=args.port)


if __name__ == "__main__":
    sys.exit(main())
