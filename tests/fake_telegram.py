"""A fake Telegram Bot API server on loopback (real HTTP, stdlib only) for the bot's tests and its benchmark.

It implements what the bot uses — getMe, getUpdates (long polling over a queue the test fills), sendMessage,
editMessageText, editMessageReplyMarkup, deleteMessage, sendPhoto, sendDocument, answerCallbackQuery, getFile and
the file download, sendChatAction, setMyCommands, setWebhook, deleteWebhook — records every call, and checks
what Telegram checks: HTML parse mode (known tags only, balanced, ``<``/``&`` escaped) and the 4,096-character
limit of the visible text in UTF-16 code units. ``edit_429`` answers a share of edits with 429 ``retry_after``.
"""

from __future__ import annotations

import email.parser
import email.policy
import html
import json
import random
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote

TAGS = {"b", "strong", "i", "em", "u", "ins", "s", "strike", "del", "a", "code", "pre", "blockquote", "tg-spoiler",
        "span", "tg-emoji"}
JSON_KEYS = {"chat_id", "message_id", "offset", "timeout", "limit", "reply_markup", "reply_parameters",
             "link_preview_options", "allowed_updates", "commands", "show_alert", "reply_to_message_id"}
_TAG = re.compile(r"<(/?)([a-z-]+)(?:\s[^<>]*)?>")
_ENTITY = re.compile(r"&(?:lt|gt|amp|quot|#\d+|#x[0-9a-fA-F]+);")


class ApiFailure(Exception):
    def __init__(self, code: int, description: str, parameters: dict | None = None):
        super().__init__(description)
        self.code, self.description, self.parameters = code, description, parameters


def utf16(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def check_html(text: str) -> str:
    """The visible text of an HTML message, or ``ApiFailure`` 400 the way Telegram refuses bad markup."""
    stack, pos = [], 0
    for m in re.finditer(r"[<&]", text):
        if m.start() < pos:
            continue
        if m.group() == "&":
            if not _ENTITY.match(text, m.start()):
                raise ApiFailure(400, f"Bad Request: can't parse entities: unescaped & at byte {m.start()}")
            continue
        tag = _TAG.match(text, m.start())
        if not tag or tag.group(2) not in TAGS:
            raise ApiFailure(400, f"Bad Request: can't parse entities: unsupported start tag at {m.start()}")
        if tag.group(1):
            if not stack or stack.pop() != tag.group(2):
                raise ApiFailure(400, f"Bad Request: can't parse entities: unmatched end tag {tag.group(2)}")
        else:
            stack.append(tag.group(2))
        pos = tag.end()
    if stack:
        raise ApiFailure(400, f"Bad Request: can't parse entities: can't find end tag for {stack[-1]}")
    return html.unescape(_TAG.sub("", text))


@dataclass
class Call:
    method: str
    params: dict[str, Any]
    files: dict[str, tuple[str, bytes]]
    t: float
    status: int = 200
    result: Any = None


@dataclass
class FakeTelegram:
    token: str = "123456:TEST-token"
    bot_id: int = 999000
    username: str = "stackwise_test_bot"
    edit_429: float = 0.0            # share of editMessageText calls answered with 429
    retry_after: int = 1
    seed: int = 7
    calls: list[Call] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.cond = threading.Condition()
        self.updates: list[dict] = []
        self.next_update = 1
        self.next_message: dict[int, int] = {}
        self.messages: dict[tuple[int, int], dict] = {}
        self.files: dict[str, tuple[str, bytes]] = {}
        self.fail_next: dict[str, list[int]] = {}   # method -> retry_after of the next calls to refuse
        self.rng = random.Random(self.seed)
        self.server: ThreadingHTTPServer | None = None
        self.errors: list[str] = []

    # --- running ---------------------------------------------------------------------------------
    def start(self) -> FakeTelegram:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True   # headers and body go in two writes: no 40 ms delayed-ACK stalls

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                fake._http(self)

            def do_POST(self) -> None:
                fake._http(self)

        class Server(ThreadingHTTPServer):
            request_queue_size = 1024   # the default 5 drops connections under a burst: 1 s SYN retries

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass   # a client that hung up (the bot stopping mid long-poll) is not a failure of the fake

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    @property
    def env(self) -> dict[str, str]:
        return {"STACKWISE_TELEGRAM_TOKEN": self.token, "STACKWISE_TELEGRAM_BASE_URL": f"{self.url}/bot",
                "STACKWISE_TELEGRAM_FILE_URL": f"{self.url}/file/bot"}

    # --- what users do ---------------------------------------------------------------------------
    @staticmethod
    def user(uid: int, name: str = "Ann", lang: str = "en") -> dict:
        return {"id": uid, "is_bot": False, "first_name": name, "language_code": lang}

    @staticmethod
    def chat(chat_id: int, kind: str = "private") -> dict:
        return {"id": chat_id, "type": kind} | ({"title": "group"} if kind != "private" else {})

    def _message(self, chat: dict, user: dict, **fields: Any) -> dict:
        with self.cond:
            mid = self.next_message[chat["id"]] = self.next_message.get(chat["id"], 0) + 1
            msg = {"message_id": mid, "date": int(time.time()), "chat": chat, "from": user, **fields}
            self.messages[(chat["id"], mid)] = msg
        return msg

    def _push(self, kind: str, payload: dict) -> dict:
        with self.cond:
            update = {"update_id": self.next_update, kind: payload}
            self.next_update += 1
            self.updates.append(update)
            self.cond.notify_all()
        return update

    def send_text(self, chat_id: int, user: dict, text: str, *, kind: str = "private",
                  reply_to: int | None = None) -> dict:
        fields: dict[str, Any] = {"text": text}
        if text.startswith("/"):
            fields["entities"] = [{"type": "bot_command", "offset": 0, "length": utf16(text.split()[0])}]
        if reply_to is not None:
            fields["reply_to_message"] = self.messages[(chat_id, reply_to)]
        msg = self._message(self.chat(chat_id, kind), user, **fields)
        self._push("message", msg)
        return msg

    def send_document(self, chat_id: int, user: dict, filename: str, data: bytes, *, caption: str | None = None,
                      kind: str = "private", size: int | None = None) -> dict:
        file_id = f"doc{len(self.files) + 1}"
        self.files[file_id] = (f"documents/file_{len(self.files)}{Path(filename).suffix}", data)
        doc = {"file_id": file_id, "file_unique_id": f"u{file_id}", "file_name": filename,
               "file_size": len(data) if size is None else size}
        msg = self._message(self.chat(chat_id, kind), user, document=doc, **({"caption": caption} if caption else {}))
        self._push("message", msg)
        return msg

    def send_photo(self, chat_id: int, user: dict) -> dict:
        photo = [{"file_id": "ph1", "file_unique_id": "uph1", "width": 10, "height": 10}]
        msg = self._message(self.chat(chat_id), user, photo=photo)
        self._push("message", msg)
        return msg

    def press(self, chat_id: int, user: dict, message_id: int, data: str) -> dict:
        query = {"id": f"cb{self.next_update}", "from": user, "chat_instance": "ci",
                 "message": self.messages[(chat_id, message_id)], "data": data}
        return self._push("callback_query", query)

    # --- what the bot did ------------------------------------------------------------------------
    def calls_of(self, method: str, chat_id: int | None = None, ok: bool = True) -> list[Call]:
        with self.cond:
            return [c for c in self.calls if c.method == method and (not ok or c.status == 200)
                    and (chat_id is None or c.params.get("chat_id") == chat_id)]

    def texts(self, chat_id: int) -> list[str]:
        """Texts of the messages the bot sent to ``chat_id`` (not edits), in order."""
        return [c.params["text"] for c in self.calls_of("sendMessage", chat_id)]

    def wait_for(self, predicate: Any, timeout: float = 20.0) -> Any:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                got = predicate()
                if got:
                    return got
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out; last calls: {[c.method for c in self.calls[-10:]]}")
                self.cond.wait(min(left, 0.2))

    # --- the API ---------------------------------------------------------------------------------
    def _http(self, req: BaseHTTPRequestHandler) -> None:
        path = unquote(req.path.split("?")[0])
        length = int(req.headers.get("Content-Length") or 0)
        body = req.rfile.read(length) if length else b""
        if path.startswith(f"/file/bot{self.token}/"):
            wanted = path[len(f"/file/bot{self.token}/"):]
            data = next((d for p, d in self.files.values() if p == wanted), None)
            return self._reply(req, 200 if data is not None else 404, data or b"", "application/octet-stream")
        if not path.startswith(f"/bot{self.token}/"):
            return self._json(req, 401, {"ok": False, "error_code": 401, "description": "Unauthorized"})
        method = path.rsplit("/", 1)[1]
        params, files = self._parse(req.headers.get("Content-Type", ""), body)
        call = Call(method, params, files, time.monotonic())
        try:
            call.result = self._dispatch(call)
            payload = {"ok": True, "result": call.result}
        except (KeyError, ValueError, TypeError) as exc:   # a request the fake cannot make sense of
            self.errors.append(f"{method}: {exc!r}")
            call.status, payload = 400, {"ok": False, "error_code": 400, "description": f"Bad Request: {exc!r}"}
        except ApiFailure as exc:
            call.status = exc.code
            payload = {"ok": False, "error_code": exc.code, "description": exc.description}
            if exc.parameters:
                payload["parameters"] = exc.parameters
        with self.cond:
            if method != "getUpdates":
                self.calls.append(call)
            self.cond.notify_all()
        self._json(req, call.status, payload)

    def _json(self, req: BaseHTTPRequestHandler, status: int, payload: dict) -> None:
        self._reply(req, status, json.dumps(payload).encode(), "application/json")

    @staticmethod
    def _reply(req: BaseHTTPRequestHandler, status: int, data: bytes, kind: str) -> None:
        req.send_response(status)
        req.send_header("Content-Type", kind)
        req.send_header("Content-Length", str(len(data)))
        req.end_headers()
        req.wfile.write(data)

    @staticmethod
    def _parse(ctype: str, body: bytes) -> tuple[dict, dict]:
        raw: dict[str, str] = {}
        files: dict[str, tuple[str, bytes]] = {}
        if ctype.startswith("multipart/form-data"):
            msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                f"Content-Type: {ctype}\r\n\r\n".encode() + body)
            for part in msg.iter_parts():
                name = part.get_param("name", header="content-disposition")
                data = part.get_payload(decode=True) or b""
                if part.get_filename():
                    files[name] = (part.get_filename(), data)
                else:
                    raw[name] = data.decode()
        elif ctype.startswith("application/json"):
            raw = {k: v if isinstance(v, str) else json.dumps(v) for k, v in json.loads(body or b"{}").items()}
        else:
            raw = {k: v[0] for k, v in parse_qs(body.decode(), keep_blank_values=True).items()}
        return {k: json.loads(v) if k in JSON_KEYS else v for k, v in raw.items()}, files

    def _bot_message(self, chat_id: int, **fields: Any) -> dict:
        kind = "private" if chat_id > 0 else "supergroup"
        return self._message(self.chat(chat_id, kind), self.me(), **fields)

    def me(self) -> dict:
        return {"id": self.bot_id, "is_bot": True, "first_name": "stackwise", "username": self.username,
                "can_join_groups": True, "can_read_all_group_messages": False, "supports_inline_queries": False}

    def _dispatch(self, call: Call) -> Any:
        m, p = call.method, call.params
        queued = self.fail_next.get(m)
        if queued:
            wait = queued.pop(0)
            raise ApiFailure(429, f"Too Many Requests: retry after {wait}", {"retry_after": wait})
        if m == "getMe":
            return self.me()
        if m == "getUpdates":
            return self._get_updates(int(p.get("offset") or 0), float(p.get("timeout") or 0))
        if m in ("deleteWebhook", "setWebhook", "setMyCommands", "sendChatAction", "answerCallbackQuery"):
            return True
        if m in ("sendMessage", "editMessageText"):
            text = p.get("text", "")
            visible = check_html(text) if p.get("parse_mode") == "HTML" else text
            if not visible.strip():
                raise ApiFailure(400, "Bad Request: message text is empty")
            if utf16(visible) > 4096:
                raise ApiFailure(400, "Bad Request: message is too long")
            extra = {"reply_markup": p["reply_markup"]} if p.get("reply_markup") else {}
            if m == "sendMessage":
                return self._bot_message(p["chat_id"], text=visible, **extra)
            if self.edit_429 and self.rng.random() < self.edit_429:
                raise ApiFailure(429, f"Too Many Requests: retry after {self.retry_after}",
                                 {"retry_after": self.retry_after})
            msg = self.messages.get((p["chat_id"], p["message_id"]))
            if msg is None:
                raise ApiFailure(400, "Bad Request: message to edit not found")
            if msg.get("text") == visible:
                raise ApiFailure(400, "Bad Request: message is not modified")
            msg.update(text=visible, **extra)
            return msg
        if m == "editMessageReplyMarkup":
            msg = self.messages[(p["chat_id"], p["message_id"])]
            msg.pop("reply_markup", None)
            return msg
        if m == "deleteMessage":
            if self.messages.pop((p["chat_id"], p["message_id"]), None) is None:
                raise ApiFailure(400, "Bad Request: message to delete not found")
            return True
        if m in ("sendPhoto", "sendDocument"):
            key = "photo" if m == "sendPhoto" else "document"
            if key not in call.files:
                raise ApiFailure(400, f"Bad Request: there is no {key} in the request")
            name, data = call.files[key]
            media = ([{"file_id": f"out{len(self.files)}", "file_unique_id": "o", "width": 1, "height": 1}]
                     if key == "photo" else {"file_id": f"out{len(self.files)}", "file_unique_id": "o",
                                             "file_name": name})
            return self._bot_message(p["chat_id"], **{key: media}, **({"caption": p["caption"]}
                                                                      if p.get("caption") else {}))
        if m == "getFile":
            path, data = self.files[p["file_id"]]
            return {"file_id": p["file_id"], "file_unique_id": f"u{p['file_id']}", "file_size": len(data),
                    "file_path": path}
        raise ApiFailure(404, "Not Found: method not found")

    def _get_updates(self, offset: int, timeout: float) -> list[dict]:
        deadline = time.monotonic() + timeout
        with self.cond:
            self.updates = [u for u in self.updates if u["update_id"] >= offset]
            while not self.updates and time.monotonic() < deadline:
                self.cond.wait(deadline - time.monotonic())
            return list(self.updates[:100])
