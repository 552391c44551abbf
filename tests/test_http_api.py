"""The HTTP API (bots/http.py) served by uvicorn on loopback: OpenAI client, native routes, schemathesis."""

from __future__ import annotations

import json
import socket
import threading
import time
from types import SimpleNamespace

import httpx
import hypothesis
import openai
import pytest
import schemathesis
from openai import OpenAI
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from agent import Agent, Settings, SettingsError
from agent.facade import StoreError
from bots.http import background_server, create_app, is_loopback, parse_tokens, serve
from bots.http_guard import safe_filename

ALICE, BOB = "alice-token-0123456789", "bob-token-9876543210"
MAX_BODY, MAX_UPLOAD = 64_000, 200_000


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    home = tmp_path_factory.mktemp("http-home")
    agent = Agent(Settings.from_env({"STACKWISE_HOME": str(home)}))
    app = create_app(agent, tokens={ALICE: "alice", BOB: "bob"}, max_body_bytes=MAX_BODY,
                     max_upload_bytes=MAX_UPLOAD)
    with background_server(app) as url:
        clients = {name: httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60)
                   for name, token in (("alice", ALICE), ("bob", BOB))}
        yield SimpleNamespace(url=url, agent=agent, home=home, alice=clients["alice"], bob=clients["bob"])
        for client in clients.values():
            client.close()
    agent.close()


def _openai(api, token: str = ALICE) -> OpenAI:
    return OpenAI(base_url=f"{api.url}/v1", api_key=token, max_retries=0, timeout=60)


@pytest.fixture
def client(api):
    with _openai(api) as client:
        yield client


# --- OpenAI-compatible ---------------------------------------------------------------------------
def test_models_and_the_openai_error_shape(api, client):
    assert [m.id for m in client.models.list()] == ["stackwise"]
    assert client.models.retrieve("stackwise").owned_by == "stackwise"
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert err.value.code == "model_not_found" and err.value.type == "invalid_request_error"
    with pytest.raises(openai.AuthenticationError) as err, _openai(api, "wrong") as stranger:
        stranger.models.list()
    assert err.value.code == "unauthorized"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="stackwise", messages=[{"role": "user", "content": "   "}])
    assert err.value.code == "empty_message"
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model="stackwise", messages=[{"role": "user", "content": "hi"}],
                                       extra_headers={"X-Stackwise-Thread": "../other"})
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="stackwise", messages=[{"role": "system", "content": "hi"}])
    assert err.value.code == "no_user_message"


def test_chat_completion_plain_continues_the_thread(api, client):
    raw = client.chat.completions.with_raw_response.create(
        model="stackwise", messages=[{"role": "user", "content": "hi"}])
    thread = raw.headers["x-stackwise-thread"]
    first = raw.parse()
    message = first.choices[0].message
    assert thread.startswith("t-") and first.model == "stackwise" and first.choices[0].finish_reason == "stop"
    assert message.content and "stackwise" in message.content
    assert message.reasoning_content.splitlines()[0].startswith("plan: ")
    assert any(line.startswith("route: ") for line in message.reasoning_content.splitlines())
    assert message.stackwise == {"thread_id": thread, "tool_calls": [], "citations": [], "attachments": [],
                                 "pending": None}
    assert first.usage.total_tokens == first.usage.prompt_tokens + first.usage.completion_tokens > 0

    raw = client.chat.completions.with_raw_response.create(
        model="stackwise", messages=[{"role": "user", "content": "thanks"}],
        extra_headers={"X-Stackwise-Thread": thread})
    assert raw.headers["x-stackwise-thread"] == thread
    second = raw.parse().choices[0].message.content
    history = api.alice.get(f"/v1/threads/{thread}").json()["messages"]
    assert history == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": message.content},
                       {"role": "user", "content": "thanks"}, {"role": "assistant", "content": second}]

    # The `user` field names the thread when there is no header; one that is no valid id is hashed.
    named = [client.chat.completions.with_raw_response.create(
        model="stackwise", messages=[{"role": "user", "content": "hi"}], user="Ada Lovelace") for _ in range(2)]
    assert named[0].headers["x-stackwise-thread"] == named[1].headers["x-stackwise-thread"]
    assert named[0].headers["x-stackwise-thread"].startswith("user-")
    assert len(api.alice.get(f"/v1/threads/{named[0].headers['x-stackwise-thread']}").json()["messages"]) == 4


def test_store_errors_become_503_also_mid_stream(api, client, monkeypatch):
    def locked(*args, **kwargs):
        raise StoreError("The thread database is locked by another process; close it and try again.")

    monkeypatch.setattr(api.agent, "ask", locked)
    monkeypatch.setattr(api.agent, "stream", locked)  # what astream runs in its worker thread
    native = api.alice.post("/v1/threads/s-1/messages", json={"text": "hi"})
    assert native.status_code == 503 and native.json()["error"]["type"] == "store"
    with pytest.raises(openai.InternalServerError) as err:
        client.chat.completions.create(model="stackwise", messages=[{"role": "user", "content": "hi"}])
    assert err.value.status_code == 503 and err.value.code == "store"
    body = {"model": "stackwise", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    with api.alice.stream("POST", "/v1/chat/completions", json=body) as r:
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert r.status_code == 200 and events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"] == {"message": "The thread database is locked by another process; "
                                               "close it and try again.", "type": "server_error", "param": None,
                                               "code": "store"}
    with pytest.raises(openai.APIError, match="locked"):
        list(client.chat.completions.create(model="stackwise", stream=True,
                                            messages=[{"role": "user", "content": "hi"}]))


def test_chat_completion_streams_steps_then_answer_then_extension(api, client):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "cancel ft-3"},
                {"role": "assistant", "content": "ok"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    chunks = list(client.chat.completions.create(model="stackwise", messages=messages, stream=True,
                                                 user="stream-1", stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant"
    kinds = ["reasoning" if getattr(d, "reasoning_content", None) else "content" if d.content else "other"
             for d in deltas]
    assert kinds.index("content") > kinds.index("reasoning") and kinds.count("content") >= 1
    assert "reasoning" not in kinds[kinds.index("content"):]  # steps stream before the answer
    reasoning = "".join(d.reasoning_content for d in deltas if getattr(d, "reasoning_content", None))
    assert reasoning.startswith("plan: ") and "\nroute: " in reasoning
    answer = "".join(d.content or "" for d in deltas)
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "stop"
    assert finals[0].choices[0].delta.stackwise["thread_id"] == "stream-1"
    assert finals[0].choices[0].delta.stackwise["pending"] is None  # only the last user message was the turn
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    history = api.alice.get("/v1/threads/stream-1").json()["messages"]
    assert history == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": answer}]

    # The raw stream: SSE framing, the thread header, [DONE] last.
    body = {"model": "stackwise", "stream": True, "messages": [{"role": "user", "content": "thanks"}]}
    with api.alice.stream("POST", "/v1/chat/completions", json=body, headers={"X-Stackwise-Thread": "stream-1"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-stackwise-thread"] == "stream-1"
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "stop"
    assert len(api.alice.get("/v1/threads/stream-1").json()["messages"]) == 4


# --- auth, privacy, errors ---------------------------------------------------------------------
def test_auth_and_thread_privacy(api):
    assert httpx.get(f"{api.url}/healthz").json() == {"status": "ok"}
    missing = httpx.get(f"{api.url}/v1/tools")
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert missing.json()["error"]["type"] == "unauthorized"
    wrong = httpx.get(f"{api.url}/v1/threads/x", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "unauthorized"
    posted = httpx.post(f"{api.url}/v1/threads/x/messages", json={"text": "hi " * 10_000},
                        headers={"Authorization": f"Basic {ALICE}"})
    assert posted.status_code == 401 and "Bearer" in posted.json()["error"]["message"]

    reply = api.alice.post("/v1/threads/private-1/messages", json={"text": "hi"})
    assert reply.status_code == 200 and reply.json()["thread_id"] == "private-1"
    assert len(api.alice.get("/v1/threads/private-1").json()["messages"]) == 2
    peek = api.bob.get("/v1/threads/private-1")
    assert peek.status_code == 404 and peek.json()["error"]["type"] == "thread_not_found"
    api.bob.post("/v1/threads/private-1/messages", json={"text": "thanks"})  # bob's own thread of that name
    assert [m["content"] for m in api.bob.get("/v1/threads/private-1").json()["messages"]][0] == "thanks"
    assert len(api.alice.get("/v1/threads/private-1").json()["messages"]) == 2


def test_errors_are_json_with_the_right_status(api):
    empty = api.alice.post("/v1/threads/e-1/messages", json={"text": "  "})
    assert empty.status_code == 400 and empty.json()["error"]["type"] == "empty_message"
    control = api.alice.post("/v1/threads/e-1/messages", json={"text": "a\x00b"})
    assert control.status_code == 400 and control.json()["error"]["type"] == "invalid_message"
    big = api.alice.post("/v1/threads/e-1/messages", json={"text": "x" * MAX_BODY})
    assert big.status_code == 413 and big.json()["error"]["type"] == "too_large"
    chunked = api.alice.post("/v1/threads/e-1/messages", content=(b"x" * 8192 for _ in range(10)),
                             headers={"Content-Type": "application/json"})
    assert chunked.status_code == 413 and "64,000 bytes" in chunked.json()["error"]["message"]
    bad_json = api.alice.post("/v1/threads/e-1/messages", content=b"{nope", headers={"Content-Type":
                                                                                     "application/json"})
    assert bad_json.status_code == 422 and bad_json.json()["error"]["type"] == "invalid_request"
    bad_thread = api.alice.get("/v1/threads/bad%20id")
    assert bad_thread.status_code == 422 and "error" in bad_thread.json()
    unknown = api.alice.get("/v1/nothing-here")
    assert unknown.status_code == 404 and unknown.json() == {"error": {"type": "not_found", "message": "Not Found"}}
    assert api.alice.get("/v1/threads/never-used").status_code == 404


def test_an_unexpected_error_is_logged_not_leaked(api, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(api.agent, "history", broken)
    with caplog.at_level("ERROR", logger="stackwise.http"):
        r = api.alice.get("/v1/threads/any")
    assert r.status_code == 500 and r.json()["error"]["type"] == "internal_error"
    assert "secret" not in r.text and "Traceback" not in r.text
    assert "secret internals" in caplog.text and "Traceback" in caplog.text


# --- tools, confirmations, jobs, files ---------------------------------------------------------
def test_tools_list_and_run(api):
    tools = {t["name"]: t for t in api.alice.get("/v1/tools").json()["tools"]}
    assert {"embedding_distance", "cancel_finetune", "finetune_status"} <= set(tools)
    assert tools["cancel_finetune"]["side_effects"] is True and "properties" in tools["embedding_distance"]["schema"]
    run = api.alice.post("/v1/tools/embedding_distance", json={"texts": ["king", "queen"]})
    record = run.json()
    assert run.status_code == 200 and record["ok"] is True and record["tool"] == "embedding_distance"
    assert 0.3 < record["result"]["pairs"][0]["cosine"] < 1.0
    unknown = api.alice.post("/v1/tools/no_such_tool", json={})
    assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "unknown_tool"
    assert unknown.json()["tool"] == "no_such_tool" and unknown.json()["ok"] is False
    bad = api.alice.post("/v1/tools/embedding_distance", json={"texts": "king"})
    assert bad.status_code == 422 and bad.json()["error"]["type"] == "invalid_args"
    not_json = api.alice.post("/v1/tools/embedding_distance", content=b"{texts")
    assert not_json.status_code == 400 and not_json.json()["error"]["type"] == "invalid_json"


def test_confirmation_through_resume(api):
    asked = api.alice.post("/v1/threads/confirm-1/messages", json={"text": "cancel ft-3"}).json()
    assert asked["pending"]["tool"] == "cancel_finetune" and asked["pending"]["args"] == {"job_id": "ft-3"}
    assert asked["tool_calls"] == []
    declined = api.alice.post("/v1/threads/confirm-1/resume", json={"approve": False})
    assert declined.status_code == 200
    body = declined.json()
    assert body["pending"] is None and body["tool_calls"][0]["tool"] == "cancel_finetune"
    assert body["tool_calls"][0]["error"]["type"] == "declined"
    again = api.alice.post("/v1/threads/confirm-1/resume", json={"approve": True}).json()
    assert again["tool_calls"] == [] and again["pending"] is None
    assert api.alice.post("/v1/threads/confirm-1/resume", json={"approve": "maybe"}).status_code == 422


def test_jobs_routes_map_tool_records_to_statuses(api):
    from memory.jobs import JobStore

    nothing = api.alice.get("/v1/jobs")
    assert nothing.status_code == 404 and nothing.json()["tool"] == "finetune_status"
    run_dir = api.home / "jobs" / "alice" / "manual"
    run_dir.mkdir(parents=True)
    with JobStore.for_home(api.home) as store:
        job = store.create("alice", {"base_model": "tiny", "dataset": "d.jsonl", "method": "lora"}, {}, run_dir)
    one = api.alice.get(f"/v1/jobs/{job.id}")
    assert one.status_code == 200 and one.json()["result"]["status"] == "queued"
    assert api.alice.get("/v1/jobs").json()["args"] == {}
    assert api.bob.get(f"/v1/jobs/{job.id}").status_code == 404          # another user's job: not found
    assert api.bob.post(f"/v1/jobs/{job.id}/cancel").status_code == 404
    bad = api.alice.get("/v1/jobs/not-a-job")
    assert bad.status_code == 422 and bad.json()["error"]["type"] == "invalid_args"
    cancel = api.alice.post(f"/v1/jobs/{job.id}/cancel")
    assert cancel.status_code == 200 and cancel.json()["result"]["status"] == "cancelled"
    again = api.alice.post(f"/v1/jobs/{job.id}/cancel")
    assert again.status_code == 409 or again.json()["error"]["type"] == "invalid_state"


def test_uploads(api):
    ok = api.alice.post("/v1/files", files={"file": ("notes.txt", b"LoRA notes\n", "text/plain")})
    assert ok.status_code == 201
    info = ok.json()
    uploads = api.home.resolve() / "uploads" / "alice"
    assert info == {"name": "notes.txt", "path": str(uploads / "notes.txt"), "bytes": 11}
    assert (uploads / "notes.txt").read_bytes() == b"LoRA notes\n"

    evil = api.alice.post("/v1/files", files={"file": ("../../../etc/cron.d/x y?.sh", b"#!/bin/sh\n")}).json()
    assert evil["name"] == "x y_.sh" and evil["path"] == str(uploads / "x y_.sh")
    hidden = api.bob.post("/v1/files", files={"file": ("..", b"data")}).json()
    assert hidden["path"] == str(api.home.resolve() / "uploads" / "bob" / "upload")

    too_big = api.alice.post("/v1/files", files={"file": ("big.bin", b"\0" * (MAX_UPLOAD + 1))})
    assert too_big.status_code == 413 and too_big.json()["error"]["type"] == "too_large"
    huge = api.alice.post("/v1/files", files={"file": ("huge.bin", b"\0" * (MAX_UPLOAD * 2))})
    assert huge.status_code == 413
    assert sorted(p.name for p in uploads.iterdir()) == ["notes.txt", "x y_.sh"]  # nothing half-written left
    empty = api.alice.post("/v1/files", files={"file": ("empty.txt", b"")})
    assert empty.status_code == 400 and empty.json()["error"]["type"] == "empty_file"
    assert api.alice.post("/v1/files", data={"nofile": "1"}).status_code == 422


def test_safe_filename():
    assert safe_filename("../../etc/passwd") == "passwd"
    assert safe_filename("C:\\Users\\me\\数据 (1).csv") == "数据 (1).csv"
    assert safe_filename(".env") == "env" and safe_filename("") == "upload" and safe_filename(None) == "upload"
    assert len(safe_filename("a" * 400 + ".csv").encode()) <= 200 and safe_filename("a" * 400 + ".csv").endswith(".csv")


# --- concurrency -------------------------------------------------------------------------------
def test_turns_queue_while_cheap_routes_stay_responsive(api, monkeypatch):
    """A turn that blocks holds later turns of the same thread back, but not /healthz or /v1/tools."""
    real_ask, entered, release = api.agent.ask, [], threading.Event()

    def slow_ask(text, **kwargs):
        entered.append(text)
        assert release.wait(30)
        return real_ask(text, **kwargs)

    monkeypatch.setattr(api.agent, "ask", slow_ask)
    results: dict[str, int] = {}

    def post(text: str) -> None:
        results[text] = api.alice.post("/v1/threads/queue-1/messages", json={"text": text}).status_code

    first = threading.Thread(target=post, args=("hi",))
    first.start()
    deadline = time.monotonic() + 10
    while not entered and time.monotonic() < deadline:
        time.sleep(0.01)
    second = threading.Thread(target=post, args=("thanks",))
    second.start()
    t0 = time.perf_counter()
    assert api.alice.get("/v1/tools").status_code == 200 and httpx.get(f"{api.url}/healthz").status_code == 200
    assert time.perf_counter() - t0 < 2.0
    time.sleep(0.2)
    assert entered == ["hi"]  # the second turn waits for the first
    release.set()
    first.join(30)
    second.join(30)
    assert results == {"hi": 200, "thanks": 200} and entered == ["hi", "thanks"]
    roles = [m["role"] for m in api.alice.get("/v1/threads/queue-1").json()["messages"]]
    assert roles == ["user", "assistant", "user", "assistant"]


# --- the OpenAPI document ----------------------------------------------------------------------
SLOW_OPERATIONS = {"POST /v1/chat/completions", "POST /v1/threads/{thread_id}/messages",
                   "POST /v1/threads/{thread_id}/resume", "POST /v1/tools/{name}"}


def test_openapi_document_conforms(api):
    schema = schemathesis.openapi.from_url(f"{api.url}/openapi.json")
    auth = {"Authorization": f"Bearer {ALICE}"}
    checks = [status_code_conformance, content_type_conformance, response_schema_conformance,
              response_headers_conformance]
    tested = set()
    for result in schema.get_all_operations():
        operation = result.ok()
        label = f"{operation.method.upper()} {operation.path}"
        if label in SLOW_OPERATIONS:
            continue

        @hypothesis.given(case=operation.as_strategy())
        @hypothesis.settings(max_examples=15, deadline=None, database=None, derandomize=True,
                             suppress_health_check=list(hypothesis.HealthCheck))
        def check(case):
            response = case.call(base_url=api.url, headers=auth)
            if response.status_code >= 500:  # the one 5xx by design: a capability not shipped yet
                assert response.status_code == 501, response.text
                assert response.json()["error"]["type"] == "not_available"
            case.validate_response(response, checks=checks, headers=auth)

        check()
        tested.add(label)
    assert {"GET /healthz", "GET /v1/models", "GET /v1/tools", "GET /v1/threads/{thread_id}", "GET /v1/jobs",
            "GET /v1/jobs/{job_id}", "POST /v1/jobs/{job_id}/cancel", "POST /v1/files"} <= tested
    spec = httpx.get(f"{api.url}/openapi.json").json()
    assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert "security" not in spec["paths"]["/healthz"]["get"]


# --- local mode and serve() --------------------------------------------------------------------
def test_without_tokens_everyone_is_local(api):
    with background_server(create_app(api.agent, tokens=None)) as url:
        r = httpx.post(f"{url}/v1/threads/local-1/messages", json={"text": "hi"}, timeout=60)
        assert r.status_code == 200
        assert len(httpx.get(f"{url}/v1/threads/local-1").json()["messages"]) == 2
    assert len(api.agent.history("local-1", user_id="local")) == 2
    assert api.alice.get("/v1/threads/local-1").status_code == 404


def test_parse_tokens_and_loopback():
    assert parse_tokens(None) is None and parse_tokens("  ") is None
    assert parse_tokens(" t1:alice , t2:slack:T1 ,") == {"t1": "alice", "t2": "slack:T1"}
    for bad in ("t1", "t1:", ":alice", "t 1:alice", "t1:alice,t1:bob", ","):
        with pytest.raises(SettingsError) as err:
            parse_tokens(bad)
        assert str(err.value).startswith("STACKWISE_API_TOKENS")
    with pytest.raises(SettingsError) as err:
        parse_tokens("supersecret")
    assert "supersecret" not in str(err.value)
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.9.9.9", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.5", "example.com"))


def test_serve_refuses_unsafe_or_broken_configurations(capsys, stackwise_home):
    settings = Settings.from_env({"STACKWISE_HOME": str(stackwise_home)})
    assert serve(settings, host="0.0.0.0", port=0, env={}) == 2
    assert "refusing to listen on 0.0.0.0" in capsys.readouterr().err
    assert serve(settings, host="127.0.0.1", port=0, env={"STACKWISE_API_TOKENS": "oops"}) == 2
    assert "entry 1 is not 'token:user'" in capsys.readouterr().err
    with socket.create_server(("127.0.0.1", 0)) as taken:
        assert serve(settings, port=taken.getsockname()[1], env={}) == 1
    assert "cannot listen on 127.0.0.1" in capsys.readouterr().err
    assert not (stackwise_home / "threads.sqlite").exists()  # refused before opening anything
