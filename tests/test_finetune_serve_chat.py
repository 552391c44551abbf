"""Serving a fine-tune from the conversation: the router sends "merge ft-3 and export it for vLLM" /
"把 ft-3 合并导出" to ``export_finetune`` (which asks first) and "how do I serve ft-3?" to ``finetune_serve_info``;
and "chat with the model you just trained": ``Agent.use_model`` / the REPL's ``/model`` / ``stackwise chat
--llm-url`` switch the brain to the served model — here the scripted OpenAI-compatible server on loopback plays
it — with the local brain answering when it fails.
"""

from __future__ import annotations

import io
import itertools
import json
from pathlib import Path

import pytest
from fake_openai import FakeOpenAI, Say, Status
from rich.console import Console

from agent import Agent, Settings, SettingsError
from bots.cli import main
from bots.repl import run_repl
from memory.jobs import JobStore

_ids = itertools.count()


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("serve-home")


@pytest.fixture(scope="module")
def agent(home):
    bot = Agent.from_settings(Settings.from_env({"STACKWISE_HOME": str(home), "OPENAI_API_KEY": "sk-secret"}))
    yield bot
    bot.close()


@pytest.fixture(scope="module")
def job(home) -> str:
    """A succeeded LoRA job of alice's: a run folder with its adapter, and a base model folder (nothing is loaded:
    routing, the preflight and the serving commands only look at the files)."""
    base = home / "models" / "tiny-base"
    base.mkdir(parents=True)
    (base / "config.json").write_text(json.dumps({"model_type": "qwen2", "torch_dtype": "bfloat16"}))
    (base / "model.safetensors").write_bytes(b"\0" * 1024)
    run = home / "jobs" / "alice" / "ft-1"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    spec = {"base_model": "Qwen2.5-0.5B", "dataset": "med.jsonl", "method": "lora", "lora_rank": 8,
            "base_model_path": str(base)}
    (run / "spec.json").write_text(json.dumps(spec))
    with JobStore.for_home(home) as store:
        created = store.create("alice", spec, {}, run)
        store.claim("w1")
        store.finish(created.id, "succeeded", artifacts={"adapter": str(run / "adapter")})
    return created.id


@pytest.fixture(scope="module")
def fake():
    with FakeOpenAI(model="ft-1") as server:
        yield server


@pytest.fixture(autouse=True)
def clean(fake, agent):
    fake.reset()
    yield
    agent.use_local_brain()


def ask(agent: Agent, text: str, **kw):
    return agent.ask(text, thread_id=f"serve{next(_ids)}", user_id="alice", **kw)


# ---- routing -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "args"), [
    ("merge {job} and export it for vLLM", {"format": "vllm"}),
    ("把 {job} 合并导出", {}),
])
def test_export_requests_ask_first_with_what_they_will_write(agent, job, home, text, args):
    reply = ask(agent, text.format(job=job))
    assert reply.pending is not None, reply.answer
    assert reply.pending.tool == "export_finetune" and reply.pending.args == {"job_id": job, **args}
    assert str(home / "jobs" / "alice" / "ft-1" / "export" / "vllm") in reply.pending.preview
    assert ("磁盘" if "合并" in text else "disk") in reply.pending.preview
    assert agent.resume(reply.thread_id, approve=False, user_id="alice").tool_calls[0].error["type"] == "declined"
    assert not (home / "jobs" / "alice" / "ft-1" / "export" / "vllm").exists()


def test_gguf_without_the_converter_fails_before_the_question(agent, job, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))            # no convert_hf_to_gguf.py anywhere
    reply = ask(agent, f"export {job} to GGUF for Ollama")
    assert reply.pending is None
    [call] = reply.tool_calls
    assert (call.tool, call.args, call.ok) == ("export_finetune", {"job_id": job, "format": "gguf"}, False)
    assert call.error["type"] == "converter_missing" and "STACKWISE_LLAMA_CPP" in reply.answer


@pytest.mark.parametrize("text", ["how do I serve {job}?", "怎么部署 {job}？",
                                  "how do I chat with the model I just trained"])
def test_serving_questions_get_the_commands(agent, job, text):
    reply = ask(agent, text.format(job=job))
    assert [c.tool for c in reply.tool_calls] == ["finetune_serve_info"], reply.steps
    call = reply.tool_calls[0]
    assert call.ok and call.result["job_id"] == job
    assert f"--served-model-name {job}" in reply.answer and f"/model http://127.0.0.1:8000/v1 {job}" in reply.answer


def test_status_questions_still_go_to_status(agent, job):
    reply = ask(agent, f"what's the status of {job}")
    assert [c.tool for c in reply.tool_calls] == ["finetune_status"]


# ---- chatting with the served model ------------------------------------------------------------------------

def test_use_model_answers_from_the_served_model_and_falls_back_when_it_fails(agent, fake):
    assert agent.brain_label == "local"
    assert agent.use_model(fake.base_url, "ft-1") == "llm · ft-1"
    agent.brain.client.backoff_s = 0.01
    assert agent.brain.client.model.openai_api_key.get_secret_value() == "not-needed"   # the key stays home
    fake.script(Say("<think>a greeting</think>Hello, I am ft-1, fine-tuned on medical reasoning."))
    reply = ask(agent, "hi there")
    assert reply.answer == "Hello, I am ft-1, fine-tuned on medical reasoning."
    assert fake.requests[0]["model"] == "ft-1" and "a greeting" in [s.text for s in reply.steps if s.kind == "plan"]

    fake.script(Status(500), Status(500))                 # the served model is down: the local brain answers
    reply = ask(agent, "hi there")
    assert any("endpoint failed" in s.text for s in reply.steps) and reply.answer.strip()
    assert fake.left() == 0

    assert agent.use_local_brain() == "local"
    fake.reset()
    ask(agent, "hi there")
    assert fake.requests == []
    for url, name in (("localhost:8000", "ft-1"), (fake.base_url, " ")):
        with pytest.raises(SettingsError):
            agent.use_model(url, name)
    assert agent.brain_label == "local"


def test_the_repl_model_command_switches_and_switches_back(agent, fake):
    fake.script(Say("Served answer from ft-1."))
    lines = iter(["/model", "/model http://nowhere", f"/model {fake.base_url} ft-1", "hello", "/model",
                  "/model local", "/quit"])
    out = io.StringIO()
    code = run_repl(agent, user_id="alice", thread_id=f"serve{next(_ids)}", input_fn=lambda _: next(lines),
                    console=Console(file=out, width=200, highlight=False))
    shown = out.getvalue()
    assert code == 0
    assert "Answering with local" in shown and "Usage: /model URL NAME" in shown
    assert f"Now answering with llm · ft-1 at {fake.base_url}" in shown
    assert "Served answer from ft-1." in shown and "Answering with llm · ft-1" in shown
    assert "Back to the local brain" in shown and agent.brain_label == "local"
    assert [r["model"] for r in fake.requests] == ["ft-1"]


def test_chat_flags_go_together(capsys):
    assert main(["chat", "--llm-url", "http://127.0.0.1:8000/v1"]) == 2
    assert "--llm-url and --llm-model go together" in capsys.readouterr().err
