"""A scripted OpenAI-compatible chat endpoint on loopback: real HTTP, JSON or SSE, for the llm brain's tests.

Each ``POST /v1/chat/completions`` takes the next scripted item (or asks ``responder(body)`` when the
script is empty) and answers it the way the request asked: a ``chat.completion`` object, or
``chat.completion.chunk`` server-sent events when ``stream`` is true (text split into small pieces, so
``<think>`` tags and tool arguments arrive across chunks). Every request body is kept in ``requests``.

Example:
    >>> with FakeOpenAI() as fake:                                    # doctest: +SKIP
    ...     fake.script(Say("<think>easy</think>Hello!"), Status(429), Stall(3.0),
    ...                 Say(calls=[Call("embedding_distance", {"texts": ["a", "b"]})]))
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Call:
    """A tool call the model makes; ``raw`` replaces the JSON arguments (to send malformed ones)."""

    name: str
    args: dict = field(default_factory=dict)
    id: str | None = None
    raw: str | None = None

    def arguments(self) -> str:
        return self.raw if self.raw is not None else json.dumps(self.args, ensure_ascii=False)


@dataclass
class Say:
    """A model reply: text, native reasoning (``reasoning_content``) and tool calls."""

    text: str = ""
    reasoning: str | None = None
    calls: list[Call] = field(default_factory=list)


@dataclass
class Status:
    """An HTTP error (429, 500 …) with an OpenAI-style error body."""

    code: int
    retry_after: str | None = None
    message: str = "scripted failure"


@dataclass
class Raw:
    """Any body with any status: a misconfigured endpoint (an HTML page where an API should be)."""

    body: str
    code: int = 200
    content_type: str = "text/html"


@dataclass
class Stall:
    """Say nothing for ``seconds`` (longer than the client's timeout), then close."""

    seconds: float


class FakeOpenAI:
    """The server; use as a context manager or call ``close()``."""

    def __init__(self, model: str = "scripted-1"):
        self.model = model
        self.requests: list[dict] = []
        self.queue: deque = deque()
        self.responder: Callable[[dict], Any] | None = None
        self.unscripted = 0
        self._lock = threading.Lock()
        self._ids = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
                body = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)) or b"{}")
                if self.path.rstrip("/") != "/v1/chat/completions":
                    return self._json(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
                item = fake._next(body)
                try:
                    fake._answer(self, body, item)
                except (BrokenPipeError, ConnectionResetError):
                    pass   # the client gave up (a timeout test): nothing to answer

            def _json(self, code: int, payload: dict, headers: dict | None = None) -> None:
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="fake-openai", daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def script(self, *items: Any) -> None:
        """Queue what the next requests get, in order."""
        with self._lock:
            self.queue.extend(items)

    def reset(self) -> None:
        with self._lock:
            self.queue.clear()
            self.requests.clear()
            self.responder = None
            self.unscripted = 0

    def left(self) -> int:
        return len(self.queue)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> FakeOpenAI:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --- answering ---------------------------------------------------------------------------------
    def _next(self, body: dict) -> Any:
        with self._lock:
            self.requests.append(body)
            if self.queue:
                return self.queue.popleft()
            if self.responder is not None:
                return self.responder(body)
            self.unscripted += 1
            return Status(500, message="the fake has no scripted reply for this request")

    def _call_id(self) -> str:
        with self._lock:
            self._ids += 1
            return f"call_{self._ids}"

    def _answer(self, handler: Any, body: dict, item: Any) -> None:
        if isinstance(item, Stall):
            time.sleep(item.seconds)
            handler.close_connection = True
            return
        if isinstance(item, Raw):
            data = item.body.encode()
            handler.send_response(item.code)
            handler.send_header("content-type", item.content_type)
            handler.send_header("content-length", str(len(data)))
            handler.end_headers()
            handler.wfile.write(data)
            return None
        if isinstance(item, Status):
            headers = {"retry-after": item.retry_after} if item.retry_after is not None else {}
            return handler._json(item.code, {"error": {"message": item.message, "type": "scripted",
                                                       "code": str(item.code)}}, headers)
        calls = [(c, c.id or self._call_id()) for c in item.calls]
        if body.get("stream"):
            return self._stream(handler, item, calls)
        message: dict[str, Any] = {"role": "assistant", "content": item.text or None}
        if item.reasoning is not None:
            message["reasoning_content"] = item.reasoning
        if calls:
            message["tool_calls"] = [{"id": cid, "type": "function",
                                      "function": {"name": c.name, "arguments": c.arguments()}} for c, cid in calls]
        handler._json(200, {"id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()),
                            "model": self.model, "choices": [{"index": 0, "message": message,
                                                              "finish_reason": "tool_calls" if calls else "stop"}],
                            "usage": {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20}})

    def _stream(self, handler: Any, item: Say, calls: list) -> None:
        handler.send_response(200)
        handler.send_header("content-type", "text/event-stream")
        handler.send_header("cache-control", "no-cache")
        handler.end_headers()
        handler.close_connection = True

        def send(delta: dict, finish: str | None = None) -> None:
            chunk = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": int(time.time()),
                     "model": self.model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            handler.wfile.write(f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode())
            handler.wfile.flush()

        send({"role": "assistant", "content": ""})
        for piece in _pieces(item.reasoning or ""):
            send({"reasoning_content": piece})
        for piece in _pieces(item.text):
            send({"content": piece})
        for index, (call, cid) in enumerate(calls):
            send({"tool_calls": [{"index": index, "id": cid, "type": "function",
                                  "function": {"name": call.name, "arguments": ""}}]})
            for piece in _pieces(call.arguments()):
                send({"tool_calls": [{"index": index, "function": {"arguments": piece}}]})
        send({}, "tool_calls" if calls else "stop")
        handler.wfile.write(b"data: [DONE]\n\n")
        handler.wfile.flush()


def _pieces(text: str, size: int = 5) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


def tool_messages(request: dict) -> list[dict]:
    """The ``tool`` messages of a request (what the model was shown of the tool results)."""
    return [m for m in request.get("messages", []) if m.get("role") == "tool"]


def system_text(request: dict) -> str:
    return next((m["content"] for m in request.get("messages", []) if m.get("role") == "system"), "")
