"""The llm brain's line to the model: one chat call with tools, streamed, retried once, reasoning kept apart.

``ChatClient.complete`` sends the conversation through ``langchain-openai`` to any OpenAI-compatible
endpoint and returns a :class:`ModelTurn`: the answer text, the model's reasoning (``reasoning_content``,
or ``<think>…</think>`` in the text as DeepSeek-R1-style models write it) and the tool calls. A timeout,
a connection error, 429, 5xx or a malformed tool call is retried once after a short backoff; after that
(or at once for errors a retry cannot fix, such as 401) it raises :class:`LLMError`.

Example:
    >>> split_think("<think>user wants LoRA</think>LoRA adds low-rank adapters.")
    ('user wants LoRA', 'LoRA adds low-rank adapters.')
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
from langchain_core.messages import BaseMessage
from langchain_openai import ChatOpenAI

log = logging.getLogger(__name__)
OPEN, CLOSE = "<think>", "</think>"


class LLMError(Exception):
    """The model endpoint failed for this call: ``kind`` is timeout, connection, rate_limit, server,
    malformed or refused; ``retryable`` says whether a second try may help."""

    def __init__(self, kind: str, message: str, *, retryable: bool, wait_s: float | None = None):
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.retryable = retryable
        self.wait_s = wait_s


@dataclass
class ModelTurn:
    """One answer of the model: text for the user, reasoning for the trace, tool calls for the graph."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)   # {"id", "name", "args"}
    native_reasoning: bool = False          # the endpoint sent reasoning_content of its own


class ReasoningChatOpenAI(ChatOpenAI):
    """``ChatOpenAI`` that keeps the non-standard ``reasoning_content`` (DeepSeek, vLLM, llama.cpp, Ollama;
    ``reasoning`` on OpenRouter) in ``additional_kwargs`` — the base class drops it."""

    def _create_chat_result(self, response: Any, generation_info: dict | None = None) -> Any:
        result = super()._create_chat_result(response, generation_info)
        data = response if isinstance(response, dict) else response.model_dump()
        for gen, choice in zip(result.generations, data.get("choices") or [], strict=False):
            message = choice.get("message") or {}
            reasoning = message.get("reasoning_content") or message.get("reasoning")
            if isinstance(reasoning, str) and reasoning:
                gen.message.additional_kwargs["reasoning_content"] = reasoning
        return result

    def _convert_chunk_to_generation_chunk(self, chunk: dict, default_chunk_class: type,
                                           base_generation_info: dict | None) -> Any:
        gen = super()._convert_chunk_to_generation_chunk(chunk, default_chunk_class, base_generation_info)
        choices = chunk.get("choices") or []
        delta = (choices[0].get("delta") or {}) if choices else {}
        reasoning = delta.get("reasoning_content") or delta.get("reasoning")
        if gen is not None and isinstance(reasoning, str) and reasoning:
            gen.message.additional_kwargs["reasoning_content"] = reasoning
        return gen


def split_think(text: str) -> tuple[str, str]:
    """``(reasoning, answer)`` of a text that may hold ``<think>…</think>``; R1-style output that starts
    without the opening tag (it was in the prompt template) counts as reasoning up to ``</think>``."""
    reasoning: list[str] = []
    answer: list[str] = []
    rest = text
    if CLOSE in rest and (OPEN not in rest or rest.index(CLOSE) < rest.index(OPEN)):
        head, _, rest = rest.partition(CLOSE)
        reasoning.append(head)
    while OPEN in rest:
        head, _, tail = rest.partition(OPEN)
        answer.append(head)
        thought, closed, rest = tail.partition(CLOSE)
        reasoning.append(thought)
        if not closed:          # cut off while thinking: nothing after it is an answer
            rest = ""
    answer.append(rest)
    return "\n".join(r.strip() for r in reasoning if r.strip()), "".join(answer).strip()


class ThinkFilter:
    """Streams the visible part of a text that arrives in pieces, holding back ``<think>…</think>``
    even when a tag is split across pieces.

    Example:
        >>> f = ThinkFilter(); f.feed("Hi <thi") + f.feed("nk>hmm</think> there") + f.flush()
        'Hi  there'
    """

    def __init__(self) -> None:
        self.inside = False
        self.buffer = ""

    def feed(self, piece: str) -> str:
        self.buffer += piece
        shown: list[str] = []
        while True:
            tag = CLOSE if self.inside else OPEN
            at = self.buffer.find(tag)
            if at >= 0:
                if not self.inside:
                    shown.append(self.buffer[:at])
                self.buffer = self.buffer[at + len(tag):]
                self.inside = not self.inside
                continue
            keep = next((n for n in range(min(len(tag) - 1, len(self.buffer)), 0, -1)
                         if tag.startswith(self.buffer[-n:])), 0)
            ready = self.buffer[:len(self.buffer) - keep]
            if not self.inside:
                shown.append(ready)
            self.buffer = self.buffer[len(ready):]
            return "".join(shown)

    def flush(self) -> str:
        rest, self.buffer = ("" if self.inside else self.buffer), ""
        return rest


def classify(exc: BaseException) -> LLMError | None:
    """An endpoint failure as an :class:`LLMError`; ``None`` for anything else (a bug: let it raise)."""
    if isinstance(exc, openai.APITimeoutError | httpx.TimeoutException):
        return LLMError("timeout", "the model did not answer in time", retryable=True)
    if isinstance(exc, openai.APIConnectionError | httpx.TransportError):
        return LLMError("connection", f"cannot reach the model endpoint ({type(exc).__name__})", retryable=True)
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        said = exc.body.get("message") if isinstance(exc.body, dict) else None
        detail = f"HTTP {status}" + (f": {said}" if isinstance(said, str) and said else "")
        detail = detail[:300]
        if status == 429:
            return LLMError("rate_limit", detail, retryable=True, wait_s=_retry_after(exc.response))
        if status >= 500 or status == 408:
            return LLMError("server", detail, retryable=True)
        return LLMError("refused", detail, retryable=False)
    if isinstance(exc, openai.APIError):
        return LLMError("server", str(exc)[:300], retryable=True)
    return None


def _retry_after(response: httpx.Response | None) -> float | None:
    try:
        return float(response.headers.get("retry-after")) if response is not None else None
    except (TypeError, ValueError):
        return None


class ChatClient:
    """The model behind the llm brain, with its tool schemas bound and its retry policy."""

    def __init__(self, *, model: str, base_url: str | None, api_key: str | None, timeout_s: float,
                 tools: list[dict], known_tools: set[str], backoff_s: float = 1.0, max_wait_s: float = 10.0):
        self.model_name = model
        # max_retries=0: the retry policy is ours (once, then the local brain), not the SDK's three tries.
        self.model = ReasoningChatOpenAI(model=model, base_url=base_url, api_key=api_key or "not-needed",
                                         timeout=timeout_s, max_retries=0, use_responses_api=False)
        self.tools = tools
        self.known_tools = known_tools
        self.backoff_s = backoff_s
        self.max_wait_s = max_wait_s

    def complete(self, messages: list[BaseMessage], *, on_token: Callable[[str], None] | None = None) -> ModelTurn:
        """One model answer; one retry for failures a retry may fix; raises :class:`LLMError`."""
        for attempt in (1, 2):
            try:
                return self._call(messages, on_token)
            except LLMError as exc:
                error = exc
            except Exception as exc:
                error = classify(exc)
                if error is None:
                    raise
            log.warning("model call %d failed: %s: %s", attempt, error.kind, error.message)
            if attempt == 2 or not error.retryable:
                raise error
            time.sleep(min(self.max_wait_s, max(self.backoff_s, error.wait_s or 0.0)))
        raise AssertionError("unreachable")

    def _call(self, messages: list[BaseMessage], on_token: Callable[[str], None] | None) -> ModelTurn:
        runnable = self.model.bind_tools(self.tools) if self.tools else self.model
        try:
            message = runnable.invoke(messages) if on_token is None else self._stream(runnable, messages, on_token)
        except (ValueError, KeyError, TypeError) as exc:   # the SDK could not read the reply as a chat completion
            log.debug("unreadable reply from the model endpoint", exc_info=True)
            raise LLMError("malformed", f"the endpoint's reply is not an OpenAI chat completion "
                           f"({type(exc).__name__}: {str(exc)[:160]})", retryable=True) from exc
        return self._turn(message)

    @staticmethod
    def _stream(runnable: Any, messages: list[BaseMessage], on_token: Callable[[str], None]) -> Any:
        message, visible = None, ThinkFilter()
        for chunk in runnable.stream(messages):
            message = chunk if message is None else message + chunk
            if isinstance(chunk.content, str) and chunk.content and (shown := visible.feed(chunk.content)):
                on_token(shown)
        if rest := visible.flush():
            on_token(rest)
        if message is None:
            raise LLMError("malformed", "the model sent an empty stream", retryable=True)
        return message

    def _turn(self, message: Any) -> ModelTurn:
        content = message.content if isinstance(message.content, str) else _text_of(message.content)
        native = str(message.additional_kwargs.get("reasoning_content") or "").strip()
        thought, answer = split_think(content)
        bad = list(getattr(message, "invalid_tool_calls", None) or [])
        # A streamed reply's arguments are parsed leniently (partial JSON is "repaired"): check them strictly.
        for piece in getattr(message, "tool_call_chunks", None) or []:
            try:
                json.loads(piece.get("args") or "{}")
            except ValueError:
                bad.append({"name": piece.get("name"), "args": piece.get("args")})
        if bad:
            first = bad[0]
            raise LLMError("malformed", f"tool call {first.get('name')!r} has arguments that are not JSON: "
                           f"{str(first.get('args'))[:120]!r}", retryable=True)
        calls = []
        for n, call in enumerate(message.tool_calls or []):
            name, args = call.get("name"), call.get("args")
            if name not in self.known_tools:
                raise LLMError("malformed", f"the model called an unknown tool {name!r}", retryable=True)
            if not isinstance(args, dict):
                raise LLMError("malformed", f"the arguments of {name} are not a JSON object", retryable=True)
            calls.append({"id": call.get("id") or f"call_{n}", "name": name, "args": args})
        if not calls and not answer:
            raise LLMError("malformed", "the model sent neither an answer nor a tool call", retryable=True)
        reasoning = "\n".join(p for p in (native, thought) if p)
        return ModelTurn(content=answer, reasoning=reasoning, tool_calls=calls, native_reasoning=bool(native))


def _text_of(content: Any) -> str:
    """Text of list-shaped content (content blocks), ignoring anything that is not text."""
    parts = []
    for block in content or []:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") == "text":
            parts.append(str(block.get("text", "")))
    return "".join(parts)
