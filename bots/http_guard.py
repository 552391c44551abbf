"""Uploads and the request guard of the HTTP API: safe file names, size-limited atomic saves, and the
ASGI middleware in front of every route (bearer auth, body limits, a last-resort plain 500)."""

from __future__ import annotations

import hmac
import json
import logging
import os
import re
import unicodedata
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bots.http_schemas import (
    DRAIN_LIMIT,
    MULTIPART_SLACK,
    PUBLIC_PATHS,
    UPLOAD_PATH,
    ApiError,
    error_payload,
)

log = logging.getLogger("bots.http")


# --- uploads -----------------------------------------------------------------------------------
def safe_filename(raw: str | None) -> str:
    """The last path component of ``raw`` with only letters, digits and ``._-+@ ()`` kept; never hidden/empty.

    Example:
        >>> safe_filename("../../etc/passwd"), safe_filename("C:\\x\\my data?.csv"), safe_filename("..")
        ('passwd', 'my data_.csv', 'upload')
    """
    name = unicodedata.normalize("NFC", (raw or "").replace("\\", "/").rsplit("/", 1)[-1])
    name = "".join(ch if ch.isalnum() or ch in "._-+@ ()" else "_" for ch in name)
    name = re.sub(r"\s+", " ", name).strip(" .")
    while len(name.encode()) > 200:
        stem, dot, ext = name.rpartition(".")
        name = f"{stem[:-1]}{dot}{ext}" if stem and len(ext) < 20 else name[:-1]
    return name.strip(" .") or "upload"


def save_upload(source: Any, folder: Path, name: str, limit: int) -> int:
    """Copy ``source`` to ``folder/name`` (atomically, at most ``limit`` bytes); the size written."""
    folder.mkdir(parents=True, exist_ok=True)
    part = folder / f".{uuid.uuid4().hex}.part"
    size = 0
    try:
        with part.open("wb") as out:
            while block := source.read(1 << 20):
                size += len(block)
                if size > limit:
                    raise ApiError(413, "too_large", f"The upload is larger than the limit of {limit:,} bytes.")
                out.write(block)
        if size == 0:
            raise ApiError(400, "empty_file", "The uploaded file is empty.")
        os.replace(part, folder / name)
        return size
    finally:
        part.unlink(missing_ok=True)


# --- the guard: auth, body limits, last-resort 500 ---------------------------------------------
async def _send_json(send: Callable, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
    data = json.dumps(body, ensure_ascii=False).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.lower().encode(), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


async def _drain(receive: Callable, budget: int) -> bool:
    """Read and drop the rest of a request body; False when it is larger than ``budget``."""
    while budget >= 0:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return True
        budget -= len(message.get("body", b""))
    return False


class RequestGuard:
    """Pure ASGI middleware in front of every route (so it also covers bodies FastAPI never parses).

    - auth: with tokens, a missing/wrong bearer token → 401; the user id goes to ``scope["state"]["user"]``;
    - body limit: a declared or counted body over the limit → 413 (the app's own answer is dropped);
    - an exception no handler took → logged with its traceback, answered with a plain 500 message.
    """

    def __init__(self, app: Any, *, tokens: dict[str, str] | None, max_body_bytes: int, max_upload_bytes: int):
        self.app = app
        self.tokens = {t.encode(): u for t, u in tokens.items()} if tokens else None
        self.max_body, self.max_upload = max_body_bytes, max_upload_bytes

    def _user(self, scope: dict) -> tuple[str | None, str]:
        if self.tokens is None:
            return "local", ""
        given = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = given.partition(b" ")
        if not given or scheme.lower() != b"bearer" or not token.strip():
            return None, "Send your API token as 'Authorization: Bearer <token>'."
        found = None
        for known, user in self.tokens.items():  # compare with every token: no timing hint about which
            if hmac.compare_digest(known, token.strip()):
                found = user
        return found, "" if found else "The API token is not valid."

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        limit = self.max_upload + MULTIPART_SLACK if path == UPLOAD_PATH else self.max_body
        if path not in PUBLIC_PATHS:
            user, why = self._user(scope)
            if user is None:  # read the (bounded) body first, so the client sees the 401, not a reset
                drained = await _drain(receive, limit)
                return await _send_json(send, 401, error_payload(path, 401, "unauthorized", why),
                                        {"WWW-Authenticate": "Bearer", **({} if drained else {"Connection": "close"})})
            scope.setdefault("state", {})["user"] = user
        declared = dict(scope["headers"]).get(b"content-length", b"")
        state = {"received": 0, "over": declared.isdigit() and int(declared) > limit, "started": False,
                 "complete": False}

        async def limited_receive() -> dict:
            message = await receive()
            if message["type"] == "http.request":
                state["complete"] = not message.get("more_body", False)
                state["received"] += len(message.get("body", b""))
                if state["received"] > limit:
                    state["over"] = True
                    raise ApiError(413, "too_large", "too large")  # whatever the app makes of it is dropped
            return message

        async def guarded_send(message: dict) -> None:
            if state["over"] and not state["started"]:
                return
            state["started"] = state["started"] or message["type"] == "http.response.start"
            await send(message)

        if not state["over"]:
            try:
                await self.app(scope, limited_receive, guarded_send)
            except Exception:
                if not state["over"]:
                    log.exception("unhandled error in %s %s", scope.get("method"), path)
                    if not state["started"]:
                        await _send_json(send, 500, error_payload(
                            path, 500, "internal_error", "The server hit an unexpected error; it has been logged."))
                    return
        if state["over"] and not state["started"]:
            drained = state["complete"] or await _drain(receive, DRAIN_LIMIT)
            what = "upload" if path == UPLOAD_PATH else "request body"
            message = f"The {what} is larger than the limit of {limit:,} bytes."
            await _send_json(send, 413, error_payload(path, 413, "too_large", message),
                             None if drained else {"Connection": "close"})
