"""Wire formats and plumbing of the HTTP API (``bots/http.py``): models, error bodies, OpenAI builders, the guard.

The models document the API in ``/openapi.json``; the builders turn a ``Reply`` (and the events of
``Agent.astream``) into OpenAI ``chat.completion`` objects and ``chat.completion.chunk`` SSE events;
``RequestGuard`` (auth, body limits, last-resort 500) and ``install_error_handlers`` make sure every
error leaves as JSON in the shape of its route, never as a traceback.

Error bodies have two shapes, chosen by the route:

- native routes: ``{"error": {"type": "<kind>", "message": "…"}}``;
- OpenAI routes (``/v1/chat/…``, ``/v1/models…``): OpenAI's
  ``{"error": {"message": "…", "type": "<category>", "param": null, "code": "<kind>"}}``, where the category
  is OpenAI's (``invalid_request_error``, ``authentication_error``, ``server_error`` …) and ``code`` carries
  our kind (``model_not_found``, ``empty_message``, ``unauthorized`` …).
"""

from __future__ import annotations

import logging
import math
import sqlite3
import time
import uuid
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from agent import InputError
from agent.facade import StoreError
from agent.reply import Attachment, Citation, Pending, Reply, ToolCall

log = logging.getLogger("stackwise.http")

MODEL_ID = "stackwise"
THREAD_HEADER = "X-Stackwise-Thread"
# Thread ids travel in URL paths and in a response header: visible ASCII that needs no escaping.
THREAD_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@+~=-]{0,127}$"
OPENAI_PATHS = ("/v1/chat/", "/v1/models")
PUBLIC_PATHS = frozenset({"/healthz", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
UPLOAD_PATH = "/v1/files"
MULTIPART_SLACK = 64 * 1024  # multipart framing on top of the file itself
DRAIN_LIMIT = 32 * 2**20  # read (and drop) at most this much of an over-limit body so the client sees the 413
HTTP_KINDS = {404: "not_found", 405: "method_not_allowed", 413: "too_large", 415: "unsupported_media_type"}


# --- errors ------------------------------------------------------------------------------------
class ApiError(Exception):
    """An error a route answers with: HTTP status, machine-readable kind, a message a person can act on."""

    def __init__(self, status: int, kind: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, headers


class ErrorDetail(BaseModel):
    type: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorBody(BaseModel):
    error: OpenAIErrorDetail


def is_openai_path(path: str) -> bool:
    return path.startswith(OPENAI_PATHS)


def _openai_category(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 429:
        return "rate_limit_error"
    return "server_error" if status >= 500 else "invalid_request_error"


def error_payload(path: str, status: int, kind: str, message: str) -> dict:
    """The error body for ``path``: OpenAI's shape on OpenAI routes, ours elsewhere."""
    if is_openai_path(path):
        return {"error": {"message": message, "type": _openai_category(status), "param": None, "code": kind}}
    return {"error": {"type": kind, "message": message}}


def error_responses(*statuses: int, openai: bool = False) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for error statuses."""
    model = OpenAIErrorBody if openai else ErrorBody
    return {s: {"model": model, "description": HTTP_ERRORS.get(s, "Error")} for s in statuses}


HTTP_ERRORS = {
    400: "The request was refused (empty or invalid message, bad input)",
    401: "Missing or wrong bearer token",
    404: "No such thread, model, tool or job",
    413: "The request body (or upload) is too large",
    422: "The request does not match the schema",
    500: "Unexpected server error (logged on the server; no details leak)",
    501: "The capability is not available in this version",
    503: "The thread store cannot be used (damaged or locked)",
}


# --- OpenAI-compatible chat --------------------------------------------------------------------
class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """OpenAI's request; sampling parameters (temperature, top_p, n …) are accepted and ignored."""

    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="Used as the thread id when no X-Stackwise-Thread header is sent.")


class StackwiseExtension(BaseModel):
    """What a ``Reply`` has beyond the answer and the steps."""

    thread_id: str
    tool_calls: list[ToolCall] = Field(default_factory=list)
    citations: list[Citation] = Field(default_factory=list)
    attachments: list[Attachment] = Field(default_factory=list)
    pending: Pending | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    reasoning_content: str = Field(description='The step trace, one "kind: text" line per step.')
    stackwise: StackwiseExtension


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop"] = "stop"
    logprobs: None = None


class Usage(BaseModel):
    """Approximate: characters / 4 (the local brain has no tokenizer)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def message_text(message: ChatMessage) -> str:
    """The text of one message; only text content parts are understood."""
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    other = sorted({p.type for p in message.content if p.type != "text"})
    if other:
        raise ValueError(f"Only text content is supported, not {', '.join(other)}.")
    return "\n".join(p.text or "" for p in message.content)


def trace(reply: Reply) -> str:
    return "\n".join(f"{s.kind}: {s.text}" for s in reply.steps)


def extension(reply: Reply) -> dict:
    return StackwiseExtension(thread_id=reply.thread_id, tool_calls=reply.tool_calls, citations=reply.citations,
                              attachments=reply.attachments, pending=reply.pending).model_dump(mode="json")


def usage(prompt_chars: int, completion_chars: int) -> dict:
    prompt, completion = math.ceil(prompt_chars / 4), math.ceil(completion_chars / 4)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def new_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def completion(reply: Reply, *, prompt_chars: int, completion_id: str | None = None) -> dict:
    reasoning = trace(reply)
    message = {"role": "assistant", "content": reply.answer, "reasoning_content": reasoning,
               "stackwise": extension(reply)}
    return {"id": completion_id or new_completion_id(), "object": "chat.completion", "created": int(time.time()),
            "model": MODEL_ID, "choices": [{"index": 0, "message": message, "finish_reason": "stop", "logprobs": None}],
            "usage": usage(prompt_chars, len(reply.answer) + len(reasoning))}


def chunk(completion_id: str, created: int, delta: dict, finish_reason: str | None = None) -> dict:
    return {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": MODEL_ID,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}


def usage_chunk(completion_id: str, created: int, usage_body: dict) -> dict:
    return {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": MODEL_ID,
            "choices": [], "usage": usage_body}


# --- native ------------------------------------------------------------------------------------
class ThreadMessageIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str
    approve: bool | None = Field(None, description="true/false answers every confirmation of this turn up front.")


class ResumeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    approve: bool


class HistoryMessage(BaseModel):
    role: str
    content: str


class ThreadHistory(BaseModel):
    thread_id: str
    messages: list[HistoryMessage]


class ToolInfo(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    name: str
    description: str
    schema_: dict[str, Any] = Field(alias="schema", description="The JSON schema of the tool's arguments.")
    side_effects: bool


class ToolList(BaseModel):
    tools: list[ToolInfo]


class FileInfo(BaseModel):
    name: str = Field(description="The sanitised file name, as tools see it in your uploads.")
    path: str
    bytes: int


class Health(BaseModel):
    status: Literal["ok"] = "ok"


def install_error_handlers(app: FastAPI) -> None:
    """JSON errors in the route's shape for our errors, the Agent's, validation and HTTP errors."""

    def reply_error(request: Request, status: int, kind: str, message: str, headers: Any = None) -> JSONResponse:
        return JSONResponse(error_payload(request.url.path, status, kind, message), status, headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return reply_error(request, exc.status, exc.kind, exc.message, exc.headers)

    @app.exception_handler(InputError)
    async def _input_error(request: Request, exc: InputError) -> JSONResponse:
        return reply_error(request, 400, exc.type, exc.message)

    @app.exception_handler(StoreError)
    async def _store_error(request: Request, exc: StoreError) -> JSONResponse:
        return reply_error(request, 503, "store", str(exc))

    @app.exception_handler(sqlite3.Error)
    async def _sqlite_error(request: Request, exc: sqlite3.Error) -> JSONResponse:
        log.error("thread store error on %s: %s", request.url.path, exc)
        return reply_error(request, 503, "store", "The thread store cannot be used right now; try again.")

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
                 for e in exc.errors()]
        return reply_error(request, 422, "invalid_request", "; ".join(parts) or "The request is not valid.")

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        kind = HTTP_KINDS.get(exc.status_code, "http_error")
        return reply_error(request, exc.status_code, kind, str(exc.detail), getattr(exc, "headers", None))
