"""A fake Slack for the Slack bot's tests: the Web API on loopback (real HTTP, so the real ``slack_sdk``
``WebClient`` talks to it through ``base_url``), and a sender of signed Events API / interactivity requests.

The Web API part records every call (``calls``), keeps the messages it was sent (``messages``: posts and their
later edits, ephemerals, uploaded files), serves ``url_private`` downloads to the bot token only, can answer a
method with HTTP 429 + ``Retry-After`` a given number of times (``rate_limit``), and checks the bearer token
like Slack does (``invalid_auth``).

Example:
    >>> with FakeSlack(token="xoxb-1") as slack:                    # doctest: +SKIP
    ...     WebClient("xoxb-1", base_url=slack.api_url).chat_postMessage(channel="C1", text="hi")
    ...     slack.posts()[0]["text"]
    'hi'
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

TEAM = "T0TEAM"
BOT_USER = "U0BOT"
BOT_ID = "B0BOT"


@dataclass
class Call:
    """One Web API request as the fake received it."""

    method: str
    args: dict[str, Any]
    status: int = 200
    at: float = field(default_factory=time.monotonic)


@dataclass
class Message:
    """A message the bot posted (``edits`` holds what ``chat.update`` later made of it, oldest first)."""

    channel: str
    ts: str
    text: str
    blocks: list[dict]
    thread_ts: str | None
    edits: list[dict] = field(default_factory=list)
    deleted: bool = False

    @property
    def current(self) -> dict:
        """The message as a user sees it now: its last edit, or the post itself."""
        if self.edits:
            return self.edits[-1]
        return {"text": self.text, "blocks": self.blocks}


class FakeSlack:
    """The Slack Web API (and ``files.slack.com``) on ``127.0.0.1``; use as a context manager."""

    def __init__(self, token: str = "xoxb-test-token"):
        self.token = token
        self.calls: list[Call] = []
        self.messages: list[Message] = []
        self.ephemerals: list[dict] = []
        self.uploads: dict[str, dict] = {}           # file id → {name, title, data, channel, thread_ts, done}
        self.private_files: dict[str, tuple[str, bytes]] = {}   # path → (mimetype, content)
        self.downloads: list[dict] = []
        self._limits: dict[str, list[int]] = {}      # method → [times left, retry-after seconds]
        self._lock = threading.Lock()
        self._ts = itertools.count(1)
        self._ids = itertools.count(1)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.api_url = f"{self.base}/api/"
        self._thread = threading.Thread(target=self.server.serve_forever, name="fake-slack", daemon=True)

    def __enter__(self) -> FakeSlack:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()

    # --- set-up for a test ------------------------------------------------------------------------
    def rate_limit(self, method: str, times: int = 1, retry_after: int = 1) -> None:
        """Answer the next ``times`` calls of ``method`` with 429 and ``Retry-After: retry_after``."""
        with self._lock:
            self._limits[method] = [times, retry_after]

    def add_private_file(self, name: str, content: bytes, mimetype: str = "text/csv", *,
                         user: str = "U1") -> dict:
        """A file a user shared: the ``files`` item of its event, downloadable with the bot token."""
        file_id = f"F{next(self._ids):05d}"
        path = f"/files-pri/{TEAM}-{file_id}/{urllib.parse.quote(name)}"
        self.private_files[path] = (mimetype, content)
        return {"id": file_id, "name": name, "title": name, "mimetype": mimetype, "filetype": name.rpartition(".")[2],
                "size": len(content), "user": user, "url_private": self.base + path,
                "url_private_download": self.base + path + "?download=1"}

    def reset(self) -> None:
        with self._lock:
            self.calls.clear()
            self.messages.clear()
            self.ephemerals.clear()
            self.uploads.clear()
            self.downloads.clear()
            self._limits.clear()

    # --- what the bot did -------------------------------------------------------------------------
    def posts(self, channel: str | None = None, thread_ts: str | None = None, *,
              deleted: bool = False) -> list[Message]:
        """Messages the bot posted (and did not delete, unless ``deleted``), oldest first."""
        with self._lock:
            return [m for m in self.messages if (channel is None or m.channel == channel)
                    and (thread_ts is None or m.thread_ts == thread_ts) and (deleted or not m.deleted)]

    def files_in(self, channel: str, thread_ts: str | None = None) -> list[dict]:
        """Files completed into ``channel`` (and ``thread_ts``) with ``files_upload_v2``."""
        with self._lock:
            return [f for f in self.uploads.values() if f["done"] and f["channel"] == channel
                    and (thread_ts is None or f["thread_ts"] == thread_ts)]

    def methods(self) -> list[str]:
        with self._lock:
            return [c.method for c in self.calls]

    # --- the API ----------------------------------------------------------------------------------
    def _next_ts(self) -> str:
        return f"{1700000000 + next(self._ts)}.000100"

    def answer(self, method: str, args: dict[str, Any], auth: str) -> tuple[int, dict, dict[str, str]]:
        """(status, body, headers) for one Web API call."""
        with self._lock:
            limit = self._limits.get(method)
            if limit and limit[0] > 0:
                limit[0] -= 1
                self.calls.append(Call(method, args, 429))
                return 429, {"ok": False, "error": "ratelimited"}, {"Retry-After": str(limit[1])}
            self.calls.append(Call(method, args))
            if auth != f"Bearer {self.token}":
                return 200, {"ok": False, "error": "invalid_auth" if auth else "not_authed"}, {}
            handler = getattr(self, "api_" + method.replace(".", "_"), None)
            if handler is None:
                return 200, {"ok": False, "error": "unknown_method"}, {}
            return 200, handler(args), {}

    def api_auth_test(self, args: dict) -> dict:
        return {"ok": True, "url": "https://test.slack.com/", "team": "Test", "user": "stackwise", "team_id": TEAM,
                "user_id": BOT_USER, "bot_id": BOT_ID, "is_enterprise_install": False}

    def api_chat_postMessage(self, args: dict) -> dict:
        if not args.get("channel"):
            return {"ok": False, "error": "channel_not_found"}
        if not args.get("text") and not args.get("blocks"):
            return {"ok": False, "error": "no_text"}
        blocks = _blocks(args.get("blocks"))
        if len(blocks) > 50:
            return {"ok": False, "error": "invalid_blocks"}
        message = Message(args["channel"], self._next_ts(), args.get("text", ""), blocks, args.get("thread_ts"))
        self.messages.append(message)
        return {"ok": True, "channel": message.channel, "ts": message.ts,
                "message": {"text": message.text, "ts": message.ts, "bot_id": BOT_ID}}

    def api_chat_update(self, args: dict) -> dict:
        for message in self.messages:
            if message.channel == args.get("channel") and message.ts == args.get("ts"):
                message.edits.append({"text": args.get("text", ""), "blocks": _blocks(args.get("blocks"))})
                return {"ok": True, "channel": message.channel, "ts": message.ts}
        return {"ok": False, "error": "message_not_found"}

    def api_chat_delete(self, args: dict) -> dict:
        for message in self.messages:
            if message.channel == args.get("channel") and message.ts == args.get("ts") and not message.deleted:
                message.deleted = True
                return {"ok": True, "channel": message.channel, "ts": message.ts}
        return {"ok": False, "error": "message_not_found"}

    def api_chat_postEphemeral(self, args: dict) -> dict:
        self.ephemerals.append({"channel": args.get("channel"), "user": args.get("user"),
                                "text": args.get("text", ""), "thread_ts": args.get("thread_ts")})
        return {"ok": True, "message_ts": self._next_ts()}

    def api_files_getUploadURLExternal(self, args: dict) -> dict:
        if not args.get("filename") or not str(args.get("length", "")).isdigit():
            return {"ok": False, "error": "invalid_arguments"}
        file_id = f"F{next(self._ids):05d}"
        self.uploads[file_id] = {"id": file_id, "name": args["filename"], "length": int(args["length"]),
                                 "data": None, "done": False, "channel": None, "thread_ts": None, "title": None}
        return {"ok": True, "file_id": file_id, "upload_url": f"{self.base}/upload/v1/{file_id}"}

    def api_files_completeUploadExternal(self, args: dict) -> dict:
        files = json.loads(args.get("files") or "[]")
        done = []
        for item in files:
            upload = self.uploads.get(item.get("id"))
            if upload is None or upload["data"] is None:
                return {"ok": False, "error": "file_not_found"}
            upload.update(done=True, title=item.get("title"), channel=args.get("channel_id"),
                          thread_ts=args.get("thread_ts"), initial_comment=args.get("initial_comment"))
            done.append({"id": upload["id"], "name": upload["name"], "title": upload["title"]})
        return {"ok": True, "files": done}

    def receive_upload(self, file_id: str, data: bytes) -> int:
        with self._lock:
            upload = self.uploads.get(file_id)
            if upload is None:
                return 404
            upload["data"] = data
            return 200


def _blocks(raw: Any) -> list[dict]:
    if raw is None or raw == "":
        return []
    return json.loads(raw) if isinstance(raw, str) else list(raw)


def _handler_for(fake: FakeSlack) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet test output
            pass

        def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def do_GET(self) -> None:
            path = urllib.parse.urlsplit(self.path).path
            found = fake.private_files.get(path)
            auth = self.headers.get("Authorization", "")
            fake.downloads.append({"path": path, "authorized": auth == f"Bearer {fake.token}"})
            if found is None:
                return self._send(404, b"not found", "text/plain")
            if auth != f"Bearer {fake.token}":  # what real Slack does: a login page, not the file
                return self._send(200, b"<!DOCTYPE html><html>Sign in to Slack</html>", "text/html")
            self._send(200, found[1], found[0])

        def do_POST(self) -> None:
            path = urllib.parse.urlsplit(self.path).path
            raw = self._body()
            if path.startswith("/upload/v1/"):
                status = fake.receive_upload(path.rsplit("/", 1)[1], raw)
                return self._send(status, f"OK - {len(raw)}".encode(), "text/plain")
            if not path.startswith("/api/"):
                return self._send(404, b"not found", "text/plain")
            kind = self.headers.get("Content-Type", "")
            if kind.startswith("application/json"):
                args = json.loads(raw or b"{}")
            else:
                args = {k: v[-1] for k, v in urllib.parse.parse_qs(raw.decode(), keep_blank_values=True).items()}
            status, body, headers = fake.answer(path[len("/api/"):], args, self.headers.get("Authorization", ""))
            self._send(status, json.dumps(body).encode(), "application/json; charset=utf-8", headers)

    return Handler


# --- Slack → the bot: signed requests ------------------------------------------------------------
def sign(secret: str, timestamp: str, body: str) -> str:
    """Slack's request signature: ``v0=`` + HMAC-SHA256 of ``v0:{timestamp}:{body}``."""
    digest = hmac.new(secret.encode(), f"v0:{timestamp}:{body}".encode(), hashlib.sha256).hexdigest()
    return f"v0={digest}"


class SlackSender:
    """Delivers Events API callbacks and Block Kit actions to the bot's endpoint, signed like Slack signs them."""

    def __init__(self, url: str, secret: str):
        self.url, self.secret = url, secret
        self.client = httpx.Client(timeout=30)
        self._ids = itertools.count(1)
        self._ts = itertools.count(1)

    def close(self) -> None:
        self.client.close()

    def next_ts(self) -> str:
        return f"{1800000000 + next(self._ts)}.000200"

    def post(self, body: str, content_type: str, *, secret: str | None = None,
             timestamp: int | None = None, retry_num: int | None = None) -> httpx.Response:
        stamp = str(int(time.time()) if timestamp is None else timestamp)
        headers = {"Content-Type": content_type, "X-Slack-Request-Timestamp": stamp,
                   "X-Slack-Signature": sign(secret or self.secret, stamp, body)}
        if retry_num is not None:
            headers["X-Slack-Retry-Num"], headers["X-Slack-Retry-Reason"] = str(retry_num), "http_timeout"
        return self.client.post(self.url, content=body.encode(), headers=headers)

    def event(self, event: dict, **kw: Any) -> httpx.Response:
        """An ``event_callback`` wrapping ``event`` (its ``ts`` and ``event_ts`` filled in when missing)."""
        event = dict(event)
        event.setdefault("ts", self.next_ts())
        event.setdefault("event_ts", event["ts"])
        envelope = {"token": "legacy", "team_id": TEAM, "api_app_id": "A0APP", "type": "event_callback",
                    "event_id": f"Ev{next(self._ids):06d}", "event_time": int(time.time()), "event": event,
                    "authorizations": [{"team_id": TEAM, "user_id": BOT_USER, "is_bot": True}]}
        envelope.update(kw.pop("envelope", {}))
        return self.post(json.dumps(envelope), "application/json", **kw)

    def mention(self, user: str, text: str, channel: str = "C0CHAN", thread_ts: str | None = None,
                files: list[dict] | None = None, **kw: Any) -> tuple[httpx.Response, dict]:
        event: dict[str, Any] = {"type": "app_mention", "user": user, "text": f"<@{BOT_USER}> {text}",
                                 "channel": channel, "ts": self.next_ts(), "team": TEAM}
        if thread_ts:
            event["thread_ts"] = thread_ts
        if files:
            event["files"] = files
        return self.event(event, **kw), event

    def dm(self, user: str, text: str, channel: str = "D0DM", thread_ts: str | None = None,
           files: list[dict] | None = None, **kw: Any) -> tuple[httpx.Response, dict]:
        event: dict[str, Any] = {"type": "message", "channel_type": "im", "user": user, "text": text,
                                 "channel": channel, "ts": self.next_ts(), "team": TEAM}
        if thread_ts:
            event["thread_ts"] = thread_ts
        if files:
            event["files"], event["subtype"] = files, "file_share"
        return self.event(event, **kw), event

    def action(self, user: str, message: Any, action_id: str, **kw: Any) -> httpx.Response:
        """A ``block_actions`` payload: ``user`` pressed the button ``action_id`` of a posted ``message`` (as first
        posted when its buttons are gone since — a client that has not refreshed yet)."""
        blocks = message.current["blocks"]
        if not any(b["type"] == "actions" for b in blocks):
            blocks = message.blocks
        button = next(e for b in blocks if b["type"] == "actions" for e in b["elements"]
                      if e["action_id"] == action_id)
        payload = {"type": "block_actions", "team": {"id": TEAM}, "user": {"id": user, "team_id": TEAM},
                   "api_app_id": "A0APP", "trigger_id": f"trig{next(self._ids)}",
                   "container": {"type": "message", "message_ts": message.ts, "channel_id": message.channel,
                                 "thread_ts": message.thread_ts, "is_ephemeral": False},
                   "channel": {"id": message.channel},
                   "message": {"ts": message.ts, "thread_ts": message.thread_ts, "text": message.current["text"],
                               "blocks": message.current["blocks"], "bot_id": BOT_ID},
                   "actions": [{"type": "button", "action_id": action_id, "block_id": button.get("block_id", ""),
                                "value": button.get("value", ""), "action_ts": self.next_ts()}]}
        body = urllib.parse.urlencode({"payload": json.dumps(payload)})
        return self.post(body, "application/x-www-form-urlencoded", **kw)
