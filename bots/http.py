"""``stackwise serve``: the HTTP API (FastAPI) — an OpenAI-compatible chat endpoint plus native routes.

OpenAI-compatible (any OpenAI client works; ``base_url=http://host:port/v1``, ``model="stackwise"``):

- ``POST /v1/chat/completions`` — the *last user message* is the turn; earlier messages are ignored because
  the thread keeps the history. The thread is the ``X-Stackwise-Thread`` request header, else the ``user``
  field (hashed to ``user-<hex>`` when it is not a valid thread id), else a new id; the response always
  carries it in ``X-Stackwise-Thread``. Mapping of a ``Reply``: ``answer`` → ``choices[0].message.content``;
  ``steps`` → ``choices[0].message.reasoning_content`` (one ``kind: text`` line per step); ``tool_calls``,
  ``citations``, ``attachments``, ``pending`` and ``thread_id`` → the extension object
  ``choices[0].message.stackwise`` (not OpenAI's ``tool_calls``: these tools already ran on the server).
  A pending confirmation is answered by sending "yes"/"no" as the next message of the thread.
  With ``stream: true`` the answer comes as server-sent ``chat.completion.chunk`` events, produced from
  ``Agent.astream`` as the turn runs: a role chunk, one ``delta.reasoning_content`` chunk per step as it
  happens, the answer as ``delta.content``, a final chunk with ``finish_reason: "stop"`` whose
  ``delta.stackwise`` holds the extension, a usage chunk when ``stream_options.include_usage`` is set, then
  ``data: [DONE]``. An error after the stream started is sent as one ``data: {"error": …}`` event.
  ``usage`` is approximate: characters / 4 (no tokenizer behind the local brain) of the turn's message
  (prompt) and of answer + trace (completion).
  Only ``model: "stackwise"`` exists (others → 404 ``model_not_found``); sampling parameters are ignored.
- ``GET /v1/models`` and ``GET /v1/models/{id}``.

Native: ``POST /v1/threads/{id}/messages`` ``{"text", "approve"}`` → ``Reply``; ``GET /v1/threads/{id}`` →
``{"thread_id", "messages"}`` (404 when this user has no such thread); ``POST /v1/threads/{id}/resume``
``{"approve"}`` → ``Reply``; ``GET /v1/tools``; ``POST /v1/tools/{name}`` (body: the args) → the tool-call
record; ``GET /v1/jobs`` (the latest job), ``GET /v1/jobs/{id}``, ``POST /v1/jobs/{id}/cancel`` run the
``finetune_status`` / ``cancel_finetune`` tools (the HTTP call itself is the explicit confirmation); ``POST
/v1/files`` (multipart ``file``) saves it, name sanitised, as ``$STACKWISE_HOME/uploads/<user>/<name>``
(replacing an earlier upload of that name) → ``{"name", "path", "bytes"}``; ``GET /healthz`` needs no token.
Thread ids are 1–128 visible ASCII characters from ``[A-Za-z0-9._:@+~=-]``, starting with a letter or digit.
Tool records always come back as JSON, with the status mapped from ``error.type``: see ``RECORD_STATUS``
(anything else that failed → 400).

Auth: with tokens (``STACKWISE_API_TOKENS=token1:user1,token2:user2``) every route but ``/healthz`` and the
OpenAPI document needs ``Authorization: Bearer <token>`` and runs as that token's user; threads, uploads and
jobs are per user. Without tokens (allowed on loopback only) everyone is user ``local``.
Errors are always JSON (shapes in ``bots/http_schemas.py``), never a traceback; bodies over the limit → 413.
The Agent computes one thing at a time: turns and tool runs queue FIFO in the event loop (so turns of one
thread never interleave) and run in a worker thread, so cheap routes stay responsive under load.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import logging
import os
import re
import socket
import sqlite3
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import aclosing, contextmanager
from functools import partial
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, FastAPI, File, Header, Request, Response, UploadFile
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse, StreamingResponse

from agent import Agent, InputError, Reply, Settings, SettingsError
from agent.facade import StoreError
from agent.reply import ToolCall
from bots import http_guard as G
from bots import http_schemas as S

log = logging.getLogger("stackwise.http")
TOKENS_ENV = "STACKWISE_API_TOKENS"
RECORD_STATUS = {"not_available": 501, "invalid_args": 422, "not_found": 404, "unknown_job": 404,
                 "unknown_tool": 404, "forbidden_path": 403, "too_large": 413, "internal_error": 500}
ThreadId = Annotated[str, PathParam(pattern=S.THREAD_ID_PATTERN, max_length=128)]


# --- configuration -----------------------------------------------------------------------------
def parse_tokens(raw: str | None) -> dict[str, str] | None:
    """``token1:user1,token2:user2`` → ``{token: user}``; empty → None (no auth). Never echoes a token."""
    if raw is None or not raw.strip():
        return None
    tokens: dict[str, str] = {}
    for n, entry in enumerate(raw.split(","), 1):
        if not entry.strip():
            continue
        token, sep, user = (part.strip() for part in entry.partition(":"))
        if not sep or not token or not user:
            raise SettingsError(f"{TOKENS_ENV}: entry {n} is not 'token:user' (expected token1:user1,token2:user2)")
        if any(ch.isspace() for ch in token) or not token.isprintable():
            raise SettingsError(f"{TOKENS_ENV}: the token of entry {n} contains whitespace or control characters")
        if tokens.get(token, user) != user:
            raise SettingsError(f"{TOKENS_ENV}: entry {n} repeats a token of another user")
        tokens[token] = user
    if not tokens:
        raise SettingsError(f"{TOKENS_ENV} is set but holds no token:user entry")
    return tokens


def is_loopback(host: str) -> bool:
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class _Gate:
    """One Agent call at a time, FIFO; callers wait in the event loop, not in worker threads."""

    def __init__(self) -> None:
        self._lock: asyncio.Lock | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._lock, self._loop = asyncio.Lock(), loop
        assert self._lock is not None
        return self._lock


# --- the app -----------------------------------------------------------------------------------
def create_app(agent: Agent, *, tokens: dict[str, str] | None, max_body_bytes: int = 1_000_000,
               max_upload_bytes: int = 20 * 2**20) -> FastAPI:
    """The ASGI app around ``agent``; ``tokens`` maps bearer tokens to user ids (None: everyone is "local")."""
    app = FastAPI(title="stackwise", version="1", description=__doc__)
    app.state.agent, app.state.gate, app.state.max_upload_bytes = agent, _Gate(), max_upload_bytes
    app.include_router(router)
    app.add_middleware(G.RequestGuard, tokens=tokens, max_body_bytes=max_body_bytes,
                       max_upload_bytes=max_upload_bytes)
    S.install_error_handlers(app)
    if tokens:
        def openapi() -> dict:
            if app.openapi_schema is None:
                schema = FastAPI.openapi(app)
                schema.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http",
                                                                                     "scheme": "bearer"}}
                for path, ops in schema["paths"].items():
                    for op in ops.values():
                        if path not in S.PUBLIC_PATHS:
                            op["security"] = [{"bearer": []}]
                app.openapi_schema = schema
            return app.openapi_schema

        app.openapi = openapi  # type: ignore[method-assign]
    return app


def _agent(request: Request) -> Agent:
    return request.app.state.agent


def _user(request: Request) -> str:
    user = request.scope.get("state", {}).get("user")
    if not user:  # the guard sets it on every non-public route; never fall back to a default user
        raise RuntimeError("request reached a route without an authenticated user")
    return user


AgentDep = Annotated[Agent, Depends(_agent)]
UserDep = Annotated[str, Depends(_user)]
router = APIRouter()


async def _serialized(request: Request, fn: Callable, *args: Any, **kwargs: Any) -> Any:
    async with request.app.state.gate.lock():
        return await anyio.to_thread.run_sync(partial(fn, *args, **kwargs))


def _record_response(record: dict) -> JSONResponse:
    status = 200 if record["ok"] else RECORD_STATUS.get((record.get("error") or {}).get("type", ""), 400)
    return JSONResponse(json.loads(json.dumps(record, default=str)), status)


# Tool routes answer with the record; the guard and validation can still answer with an error body.
RECORD_DOCS = {s: {"model": ToolCall | S.ErrorBody,
                   "description": f"The tool-call record (ok: false) or an error body. {S.HTTP_ERRORS.get(s, '')}"}
               for s in (400, 403, 404, 413, 422, 500, 501)}
NATIVE = S.error_responses(401, 413, 422, 500, 503)
OPENAI = S.error_responses(400, 401, 404, 413, 422, 500, 503, openai=True)


@router.get("/healthz", response_model=S.Health, tags=["meta"])
async def healthz() -> dict:
    return {"status": "ok"}


# --- OpenAI-compatible -------------------------------------------------------------------------
MODEL_CARD = {"id": S.MODEL_ID, "object": "model", "created": int(time.time()), "owned_by": "stackwise"}


@router.get("/v1/models", response_model=S.ModelList, responses=OPENAI, tags=["openai"])
async def list_models() -> dict:
    return {"object": "list", "data": [MODEL_CARD]}


@router.get("/v1/models/{model_id}", response_model=S.ModelCard, responses=OPENAI, tags=["openai"])
async def get_model(model_id: str) -> dict:
    if model_id != S.MODEL_ID:
        raise S.ApiError(404, "model_not_found", f"The model {model_id!r} does not exist; this server has "
                       f"{S.MODEL_ID!r}.")
    return MODEL_CARD


def _thread_for(header: str | None, user_field: str | None) -> str:
    if header:
        return header
    if user_field:
        if re.fullmatch(S.THREAD_ID_PATTERN, user_field):
            return user_field
        return "user-" + hashlib.sha256(user_field.encode()).hexdigest()[:32]
    return f"t-{uuid.uuid4().hex[:16]}"


@router.post("/v1/chat/completions", response_model=S.ChatCompletion, tags=["openai"], responses={
    **OPENAI, 200: {"description": "A chat.completion, or with stream=true an SSE stream of chat.completion.chunk",
                    "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    "headers": {S.THREAD_HEADER: {"schema": {"type": "string"}, "description": "The thread"}}}})
async def chat_completions(body: S.ChatCompletionRequest, request: Request, response: Response, agent: AgentDep,
                           user: UserDep, x_stackwise_thread: Annotated[str | None, Header(
                               pattern=S.THREAD_ID_PATTERN, max_length=128)] = None) -> Any:
    if body.model != S.MODEL_ID:
        raise S.ApiError(404, "model_not_found", f"The model {body.model!r} does not exist; use {S.MODEL_ID!r}.")
    turns = [m for m in body.messages if m.role == "user"]
    if not turns:
        raise S.ApiError(400, "no_user_message", "The messages hold no user message; the last one is the turn.")
    try:
        text = S.message_text(turns[-1])
    except ValueError as exc:
        raise S.ApiError(400, "unsupported_content", str(exc)) from None
    text, prompt_chars = agent.check_input(text), len(text)
    thread = _thread_for(x_stackwise_thread, body.user)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = _sse(request, agent, text, thread, user, prompt_chars, include_usage)
        return StreamingResponse(events, media_type="text/event-stream", headers={
            S.THREAD_HEADER: thread, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    reply = await _serialized(request, agent.ask, text, thread_id=thread, user_id=user)
    response.headers[S.THREAD_HEADER] = thread
    return S.completion(reply, prompt_chars=prompt_chars)


def _sse_line(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, default=str)}\n\n"


async def _sse(request: Request, agent: Agent, text: str, thread: str, user: str, prompt_chars: int,
               include_usage: bool) -> AsyncIterator[str]:
    cid, created = S.new_completion_id(), int(time.time())
    yield _sse_line(S.chunk(cid, created, {"role": "assistant", "content": ""}))
    reply: Reply | None = None
    try:
        async with request.app.state.gate.lock(), aclosing(agent.astream(text, thread_id=thread,
                                                                           user_id=user)) as events:
            async for event in events:
                if event["type"] == "step":
                    step = f"{event['kind']}: {event['text']}\n"
                    yield _sse_line(S.chunk(cid, created, {"reasoning_content": step}))
                elif event["type"] == "reply":
                    reply = event["reply"]
        if reply is None:
            raise RuntimeError("the turn ended without a reply")
    except Exception as exc:
        if isinstance(exc, InputError):
            status, kind, message = 400, exc.type, exc.message
        elif isinstance(exc, StoreError | sqlite3.Error):
            status, kind, message = 503, "store", str(exc) if isinstance(exc, StoreError) else "store error"
        else:
            log.exception("streamed turn failed (thread %s)", thread)
            status, kind, message = 500, "internal_error", "The turn failed unexpectedly; it has been logged."
        yield _sse_line(S.error_payload("/v1/chat/completions", status, kind, message))
        yield "data: [DONE]\n\n"
        return
    yield _sse_line(S.chunk(cid, created, {"content": reply.answer}))
    yield _sse_line(S.chunk(cid, created, {"stackwise": S.extension(reply)}, finish_reason="stop"))
    if include_usage:
        yield _sse_line(S.usage_chunk(cid, created, S.usage(prompt_chars, len(reply.answer) + len(S.trace(reply)))))
    yield "data: [DONE]\n\n"


# --- native ------------------------------------------------------------------------------------
@router.post("/v1/threads/{thread_id}/messages", response_model=Reply, tags=["threads"],
             responses={**NATIVE, **S.error_responses(400)})
async def post_message(thread_id: ThreadId, body: S.ThreadMessageIn, request: Request, agent: AgentDep,
                       user: UserDep) -> Reply:
    return await _serialized(request, agent.ask, body.text, thread_id=thread_id, user_id=user, approve=body.approve)


@router.get("/v1/threads/{thread_id}", response_model=S.ThreadHistory, tags=["threads"],
            responses={**NATIVE, **S.error_responses(404)})
async def get_thread(thread_id: ThreadId, agent: AgentDep, user: UserDep) -> dict:
    messages = await anyio.to_thread.run_sync(partial(agent.history, thread_id, user_id=user))
    if not messages:
        raise S.ApiError(404, "thread_not_found", f"You have no thread {thread_id!r}.")
    return {"thread_id": thread_id, "messages": messages}


@router.post("/v1/threads/{thread_id}/resume", response_model=Reply, tags=["threads"], responses=NATIVE)
async def resume(thread_id: ThreadId, body: S.ResumeIn, request: Request, agent: AgentDep, user: UserDep) -> Reply:
    return await _serialized(request, agent.resume, thread_id, body.approve, user_id=user)


@router.get("/v1/tools", response_model=S.ToolList, tags=["tools"], responses=NATIVE)
async def list_tools(agent: AgentDep) -> dict:
    return {"tools": await anyio.to_thread.run_sync(agent.tools)}


@router.post("/v1/tools/{name}", response_model=ToolCall, tags=["tools"], responses={**NATIVE, **RECORD_DOCS},
             openapi_extra={"requestBody": {"required": False, "content": {"application/json": {
                 "schema": {"type": "object", "description": "The tool's arguments (see GET /v1/tools)"}}}}})
async def run_tool(name: str, request: Request, agent: AgentDep, user: UserDep) -> JSONResponse:
    raw = await request.body()
    try:
        args = json.loads(raw) if raw.strip() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        error = {"type": "invalid_json", "message": f"The request body is not valid JSON: {exc}."}
        return _record_response({"tool": name, "args": None, "ok": False, "result": None, "error": error})
    return _record_response(await _serialized(request, agent.call_tool, name, args, user_id=user))


@router.get("/v1/jobs", response_model=ToolCall, tags=["jobs"], responses={**NATIVE, **RECORD_DOCS})
async def latest_job(request: Request, agent: AgentDep, user: UserDep) -> JSONResponse:
    return _record_response(await _serialized(request, agent.call_tool, "finetune_status", {}, user_id=user))


@router.get("/v1/jobs/{job_id}", response_model=ToolCall, tags=["jobs"], responses={**NATIVE, **RECORD_DOCS})
async def job_status(job_id: str, request: Request, agent: AgentDep, user: UserDep) -> JSONResponse:
    args = {"job_id": job_id}
    return _record_response(await _serialized(request, agent.call_tool, "finetune_status", args, user_id=user))


@router.post("/v1/jobs/{job_id}/cancel", response_model=ToolCall, tags=["jobs"], responses={**NATIVE, **RECORD_DOCS})
async def cancel_job(job_id: str, request: Request, agent: AgentDep, user: UserDep) -> JSONResponse:
    args = {"job_id": job_id}
    return _record_response(await _serialized(request, agent.call_tool, "cancel_finetune", args, user_id=user))


@router.post("/v1/files", response_model=S.FileInfo, status_code=201, tags=["files"],
             responses={**NATIVE, **S.error_responses(400)})
async def upload(file: Annotated[UploadFile, File(description="The file")], request: Request, agent: AgentDep,
                 user: UserDep) -> dict:
    name = G.safe_filename(file.filename)
    folder = agent.toolbox.context(user).uploads_dir
    size = await anyio.to_thread.run_sync(G.save_upload, file.file, folder, name, request.app.state.max_upload_bytes)
    return {"name": name, "path": str(folder / name), "bytes": size}


# --- running -----------------------------------------------------------------------------------
@contextmanager
def background_server(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run ``app`` with uvicorn in a daemon thread; yields its base URL and stops it cleanly on exit."""
    import uvicorn

    sock = socket.create_server((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", ws="none", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="stackwise-http", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.01)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def serve(settings: Settings, host: str = "127.0.0.1", port: int = 8000, *,
          env: Mapping[str, str] | None = None) -> int:
    """Run the API until interrupted. 2 for a usage problem (no tokens off loopback, malformed tokens)."""
    import uvicorn

    try:
        tokens = parse_tokens((os.environ if env is None else env).get(TOKENS_ENV))
    except SettingsError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    if tokens is None and not is_loopback(host):
        sys.stderr.write(f"error: refusing to listen on {host} without authentication: set {TOKENS_ENV}="
                         "token1:user1,... or serve on 127.0.0.1.\n")
        return 2
    try:
        sock = socket.create_server((host.strip("[]"), port), family=socket.AF_INET6 if ":" in host else
                                    socket.AF_INET)
    except OSError as exc:
        sys.stderr.write(f"error: cannot listen on {host}:{port}: {exc.strerror or exc}\n")
        return 1
    agent = Agent(settings, channel="http")
    try:
        app = create_app(agent, tokens=tokens)
        auth = f"bearer tokens for {len(set(tokens.values()))} user(s)" if tokens else "none (loopback, user 'local')"
        sys.stderr.write(f"stackwise HTTP API on http://{host}:{sock.getsockname()[1]}/v1  (auth: {auth})\n")
        level = settings.log_level.lower() if settings.log_level.lower() in uvicorn.config.LOG_LEVELS else "warning"
        config = uvicorn.Config(app, log_level=level, ws="none", lifespan="off",
                                server_header=False)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        agent.close()
        sock.close()
    return 0
