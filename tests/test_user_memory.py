"""User memory: facts read from messages (EN/ZH), the SQL store behind it (a LangGraph BaseStore with semantic
search), recall, defaults and warnings the brain draws from it, and forgetting for real (gone from disk)."""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from langgraph.store.base import InvalidNamespaceError

from agent import Agent, Settings
from memory.facts import extract_facts
from memory.sql_store import SqlStore
from memory.user_memory import MAX_NOTES, UserMemory, UserMemoryError, user_namespace


# --- reading facts ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "kind", "data"), [
    ("my GPU is an RTX 4090 with 24 GB", "gpu", {"name": "RTX 4090", "memory_gb": 24.0, "memory_assumed": False}),
    ("我的显卡是 3060 12G", "gpu", {"name": "RTX 3060", "memory_gb": 12.0, "memory_assumed": False}),
    ("I'm training on my A100", "gpu", {"name": "A100", "memory_gb": 40.0, "memory_assumed": True}),
    ("I don't have a GPU", "gpu", {"name": None, "memory_gb": 0.0, "none": True}),
    ("answer in Chinese", "language", {"lang": "zh"}),
    ("以后用英文回答", "language", {"lang": "en"}),
    ("my data sets are medical Q&A", "dataset_domain", {"domain": "medical", "topic": "medical Q&A"}),
    ("我的数据集是法律文书", "dataset_domain", {"domain": "legal", "topic": "法律文书"}),
    ("my usual data set is med.jsonl", "usual_dataset", {"file": "med.jsonl"}),
    ("我常用的模型是 Qwen2.5-0.5B", "usual_model", {"model": "Qwen2.5-0.5B"}),
    ("I prefer QLoRA", "preferred_method", {"method": "qlora"}),
    ("我叫小王", "name", {"name": "小王"}),
    ("remember that my cluster uses Slurm", "note", {"text": "my cluster uses Slurm"}),
])
def test_statements_become_facts(text, kind, data):
    facts = extract_facts(text)
    assert [(f.kind, f.data) for f in facts] == [(kind, data)]


@pytest.mark.parametrize("text", [
    "is my GPU an RTX 4090?", "what GPU do I have?", "我的显卡是什么？", "if I had an A100 would it fit?",
    "my GPU is not a 4090", "my friend's GPU is a 4090", "I have 3060 rows in my data", "translate 'cat' into Chinese",
    "fine-tune Qwen2.5-0.5B on data.jsonl with lora rank 8", "what is LoRA?", "forget my GPU",
])
def test_questions_hypotheses_and_other_peoples_things_teach_nothing(text):
    assert extract_facts(text) == []


def test_an_implied_fact_inside_a_question_and_two_facts_in_one_sentence():
    assert [f.kind for f in extract_facts("I have a 3060 12G, can I fine-tune a 7B model?")] == ["gpu"]
    facts = extract_facts("my data sets are medical Q&A and my GPU is an RTX 4090")
    assert [(f.kind, f.data.get("domain") or f.data.get("name")) for f in facts] == [
        ("dataset_domain", "medical"), ("gpu", "RTX 4090")]


# --- the store ------------------------------------------------------------------------------------------
def _toy_embed(texts):
    """Three directions: GPU words, language words, anything else — enough to check the ranking."""
    out = []
    for t in texts:
        t = t.lower()
        out.append([1.0, 0.0, 0.1] if "gpu" in t else [0.0, 1.0, 0.1] if "chinese" in t else [0.0, 0.1, 1.0])
    return np.array(out)


@pytest.fixture
def store(tmp_path):
    s = SqlStore(tmp_path / "m.sqlite", index={"dims": 3, "embed": _toy_embed, "fields": ["text"]})
    yield s
    s.close()


def test_store_get_put_search_delete_and_namespaces(store, tmp_path):
    store.put(("users", "ada", "facts"), "gpu", {"text": "my GPU is a 4090", "kind": "gpu", "n": 1})
    store.put(("users", "ada", "facts"), "lang", {"text": "answer in Chinese", "kind": "language", "n": 2})
    store.put(("users", "bob", "facts"), "gpu", {"text": "my GPU is an A100", "kind": "gpu", "n": 3})
    item = store.get(("users", "ada", "facts"), "gpu")
    assert item.value["text"] == "my GPU is a 4090" and item.created_at <= item.updated_at
    ranked = store.search(("users", "ada"), query="which GPU?")
    assert [i.key for i in ranked] == ["gpu", "lang"] and ranked[0].score > ranked[1].score
    assert [i.namespace[1] for i in store.search(("users",), filter={"kind": "gpu"})] == ["bob", "ada"]  # newest first
    assert [i.value["n"] for i in store.search(("users",), filter={"n": {"$gte": 2}}, limit=1, offset=1)] == [2]
    assert store.list_namespaces(prefix=("users",)) == [("users", "ada", "facts"), ("users", "bob", "facts")]
    assert store.list_namespaces(max_depth=2) == [("users", "ada"), ("users", "bob")]
    store.delete(("users", "ada", "facts"), "gpu")
    assert store.get(("users", "ada", "facts"), "gpu") is None
    # "users.ad" is not a prefix of "users.ada": namespaces match by label, not by characters
    assert store.search(("users", "ad")) == []
    with pytest.raises(InvalidNamespaceError):
        store.put(("users", "a.b"), "k", {"text": "x"})
    # another process (another connection) sees the writes at once; nothing is cached
    other = SqlStore(tmp_path / "m.sqlite", index={"dims": 3, "embed": _toy_embed, "fields": ["text"]})
    try:
        assert other.get(("users", "bob", "facts"), "gpu").value["n"] == 3
        other.put(("users", "bob", "facts"), "gpu", {"text": "my GPU is an H100", "kind": "gpu", "n": 4})
        assert store.get(("users", "bob", "facts"), "gpu").value["text"] == "my GPU is an H100"
    finally:
        other.close()


def test_a_damaged_store_file_is_a_clear_error_and_is_left_alone(tmp_path):
    from memory.checkpoints import StoreError

    path = tmp_path / "memory.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    before = path.read_bytes()
    with pytest.raises(StoreError, match="damaged.*left untouched"):
        SqlStore(path)
    assert path.read_bytes() == before


# --- the memory ---------------------------------------------------------------------------------------
def test_learn_show_profile_recall_forget(tmp_path):
    from langgraph.store.memory import InMemoryStore

    memory = UserMemory(InMemoryStore())
    kept = memory.learn("ada", "my GPU is an RTX 3060 12G, and answer in Chinese")
    assert [f["key"] for f in kept] == ["gpu", "language"]
    memory.learn("ada", "I upgraded to an RTX 4090 with 24 GB")           # replaces the GPU, keeps one
    shown = memory.show("ada")
    assert [(f["key"], f["data"].get("name") or f["data"].get("lang")) for f in shown] == [
        ("gpu", "RTX 4090"), ("language", "zh")]
    assert shown[0]["said"] == "I upgraded to an RTX 4090 with 24 GB" and shown[0]["created_at"]
    assert memory.profile("ada")["gpu"]["memory_gb"] == 24.0 and memory.answer_language("ada") == "zh"
    assert memory.show("bob") == [] and memory.profile("bob") == {}
    assert memory.forget("ada", "nope") == 0
    assert memory.forget("ada", "gpu") == 1 and memory.forget("ada") == 1 and memory.show("ada") == []
    memory.learn("ada", "answer in Chinese")
    memory.learn("ada", "answer in the language I write in")
    assert memory.answer_language("ada") is None


def test_remember_refuses_empty_or_huge_text_and_caps_the_notes(tmp_path):
    from langgraph.store.memory import InMemoryStore

    memory = UserMemory(InMemoryStore())
    with pytest.raises(UserMemoryError, match="nothing to remember"):
        memory.remember("ada", "   ")
    with pytest.raises(UserMemoryError, match="1,000"):
        memory.remember("ada", "x" * 5000)
    for n in range(MAX_NOTES):
        memory.remember("ada", f"note number {n}")
    with pytest.raises(UserMemoryError, match="200 notes"):
        memory.remember("ada", "one too many")
    memory.remember("ada", "note number 7")            # the same note again is no new note
    assert len(memory.show("ada")) == MAX_NOTES


def test_user_ids_never_share_a_namespace():
    assert user_namespace("a.b") != user_namespace("a%2Eb") != user_namespace("a")
    assert "." not in user_namespace("a.b")[1]


# --- through the agent --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from evals.memory_eval import make_workdir

    return make_workdir(tmp_path_factory.mktemp("memory-work"))


@pytest.fixture(scope="module")
def agent(tmp_path_factory, work):
    home = tmp_path_factory.mktemp("memory-home")
    bot = Agent(Settings.from_env({"STACKWISE_HOME": str(home)}))
    yield bot
    bot.close()


@pytest.fixture
def in_work(work, monkeypatch):
    monkeypatch.chdir(work)
    return work


def test_a_stated_fact_is_noted_shown_and_recalled_in_another_thread(agent):
    reply = agent.ask("my GPU is an RTX 4090 with 24 GB", thread_id="t1", user_id="u-recall")
    assert reply.answer.startswith("Noted: your GPU is an RTX 4090 with 24 GB")
    assert any(s.kind == "observe" and s.text.startswith("remembered: your GPU") for s in reply.steps)
    assert "4090" in agent.ask("what GPU do I have?", thread_id="t2", user_id="u-recall").answer
    assert "4090" in agent.ask("我的显卡是什么？", thread_id="t3", user_id="u-recall").answer
    assert [f["key"] for f in agent.memory_show("u-recall")] == ["gpu"]
    assert "4090" not in agent.ask("what GPU do I have?", thread_id="t1", user_id="u-stranger").answer
    reply = agent.ask("forget my GPU", thread_id="t2", user_id="u-recall")
    assert "Forgot your GPU" in reply.answer and agent.memory_show("u-recall") == []
    assert "haven't told me your GPU" in agent.ask("what GPU do I have?", thread_id="t2", user_id="u-recall").answer


def test_the_answer_language_follows_the_users_preference(agent):
    agent.ask("answer in Chinese", thread_id="l1", user_id="u-lang")
    reply = agent.ask("how similar are 'cat' and 'dog'?", thread_id="l2", user_id="u-lang")
    assert "余弦" in reply.answer
    agent.ask("reply in English from now on", thread_id="l1", user_id="u-lang")
    assert "cosine" in agent.ask("“猫”和“狗”有多相似？", thread_id="l3", user_id="u-lang").answer


def test_usual_data_set_and_preferred_method_fill_a_fine_tune(agent, in_work):
    agent.ask("my usual data set is med.jsonl", thread_id="d1", user_id="u-data")
    agent.ask("I prefer QLoRA", thread_id="d1", user_id="u-data")
    reply = agent.ask("fine-tune Qwen2.5-0.5B on my usual data set", thread_id="d2", user_id="u-data")
    route = next(s.text for s in reply.steps if s.kind == "route")
    # This machine's worker has no GPU, so the QLoRA the user prefers is refused by the preflight — with these args.
    (call,) = reply.tool_calls
    assert call.args["dataset"] == "med.jsonl" and call.args["method"] == "qlora" and "from memory" in route
    assert call.error["type"] == "qlora_needs_gpu"
    named = agent.ask("fine-tune Qwen2.5-0.5B on cot.jsonl with lora", thread_id="d3", user_id="u-data")
    assert named.pending.args["dataset"] == "cot.jsonl" and named.pending.args["method"] == "lora"  # said wins


def test_the_preflight_suggests_qlora_when_the_job_does_not_fit_the_users_gpu(agent, in_work):
    agent.ask("my GPU is an RTX 3060 with 12 GB", thread_id="p1", user_id="u-gpu")
    reply = agent.ask("fine-tune Qwen2.5-7B on med.jsonl", thread_id="p2", user_id="u-gpu")
    assert reply.pending is not None
    assert "On your RTX 3060 (12 GB, as you told me) this LoRA job does not fit" in reply.pending.preview
    assert "QLoRA would need about" in reply.pending.preview
    agent.ask("no", thread_id="p2", user_id="u-gpu")
    agent.ask("我的显卡是 H100 80G", thread_id="p1", user_id="u-gpu")
    reply = agent.ask("在 med.jsonl 上微调 Qwen2.5-7B", thread_id="p3", user_id="u-gpu")
    assert "放得下你的 H100（80 GB）" in reply.pending.preview
    agent.ask("否", thread_id="p3", user_id="u-gpu")


def test_user_gpu_advice_directly():
    from evals.memory_eval import QWEN_7B
    from tools.finetune.preflight import user_gpu_advice
    from tools.finetune.spec import FinetuneSpec

    report = {"vram": {"seq": 128}}   # short rows: QLoRA of a 7B fits 12 GB, LoRA does not
    lora = FinetuneSpec(base_model="m", dataset="d.jsonl")
    advice = user_gpu_advice(lora, QWEN_7B, report, {"name": "RTX 3060", "memory_gb": 12.0})
    assert advice["code"] == "user_gpu_no_fit" and advice["suggest"] == {"method": "qlora"}
    tiny = user_gpu_advice(lora, QWEN_7B, report, {"name": "RTX 2060", "memory_gb": 4.0})
    assert tiny["code"] == "user_gpu_no_fit" and "even with QLoRA" in tiny["message"] and "suggest" not in tiny
    assert user_gpu_advice(lora, QWEN_7B, report, {"name": "H200", "memory_gb": 141.0})["code"] == "user_gpu_fits"
    qlora = FinetuneSpec(base_model="m", dataset="d.jsonl", method="qlora")
    assert user_gpu_advice(qlora, QWEN_7B, report, {"name": None, "memory_gb": 0.0, "none": True})["code"] == \
        "user_no_gpu"
    assert user_gpu_advice(lora, QWEN_7B, report, None) is None
    assert user_gpu_advice(lora, None, report, {"name": "x", "memory_gb": 8.0}) is None


def test_other_users_are_never_described(agent):
    agent.ask("remember that my project is called Bluebird-7731", thread_id="o1", user_id="u-alice")
    reply = agent.ask("what did the other user ask?", thread_id="o1", user_id="u-bob")
    assert "Bluebird" not in reply.answer and "private" in reply.answer
    assert "Bluebird" not in agent.ask("what do you remember about me?", thread_id="o1", user_id="u-bob").answer


# --- forget for real -------------------------------------------------------------------------------------
def _on_disk(home: Path, marker: str) -> list[str]:
    needle = marker.encode()
    return [str(p.relative_to(home)) for p in home.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_forgotten_facts_and_threads_are_gone_from_disk(tmp_path):
    home = tmp_path / "home"
    bot = Agent(Settings.from_env({"STACKWISE_HOME": str(home)}))
    try:
        bot.remember("ada", "remember that my locker code is zebra-omega-4417")
        bot.ask("remember that my vault word is 紫色长颈鹿", thread_id="v", user_id="ada")
        bot.ask("remember that my cat is called Noodle-9", thread_id="v", user_id="bob")
        assert _on_disk(home, "zebra-omega-4417") and _on_disk(home, "紫色长颈鹿")
        assert bot.memory_forget("ada") == 2
        assert _on_disk(home, "zebra-omega-4417") == []           # only in memory: gone
        still = _on_disk(home, "紫色长颈鹿")                       # still in the conversation (file or its WAL)
        assert still and all(p.startswith("threads.sqlite") for p in still)
        assert bot.forget_threads("ada") == 1
        assert _on_disk(home, "紫色长颈鹿") == [] and bot.history("v", user_id="ada") == []
        assert _on_disk(home, "Noodle-9") and bot.memory_show("bob")      # bob's are untouched
    finally:
        bot.close()


def test_memory_cli_show_forget_stats(tmp_path, cli_env, stackwise_bin):
    home = Path(cli_env["STACKWISE_HOME"])
    bot = Agent(Settings.from_env({"STACKWISE_HOME": str(home)}))
    bot.ask("my GPU is an RTX 4090 with 24 GB", thread_id="cli:ada", user_id="ada")
    bot.remember("ada", "my cluster uses Slurm")
    bot.close()

    def run(*args):
        proc = subprocess.run([stackwise_bin, "memory", *args], env=cli_env, capture_output=True, text=True,
                              timeout=120)
        return proc.returncode, proc.stdout, proc.stderr

    code, out, _ = run("show", "--user", "ada", "--json")
    shown = json.loads(out)
    assert code == 0 and shown["facts"][0]["key"] == "gpu" and shown["threads"][0]["thread_id"] == "cli:ada"
    note = shown["facts"][1]["key"]
    code, out, _ = run("show", "--user", "ada")
    assert code == 0 and "[gpu] your GPU is an RTX 4090 with 24 GB of VRAM" in out and "thread cli:ada" in out
    code, out, _ = run("stats", "--user", "ada", "--json")
    stats = json.loads(out)
    assert stats["threads"]["threads"] == 1 and stats["memory"]["facts"] == 2 and stats["threads"]["bytes"] > 0
    code, _, err = run("forget", "--user", "ada", "--key", "nope")
    assert code == 1 and "no fact 'nope'" in err
    code, out, _ = run("forget", "--user", "ada", "--key", note, "--json")
    assert json.loads(out) == {"user": "ada", "facts_deleted": 1, "threads_deleted": 0}
    code, out, _ = run("forget", "--user", "ada", "--threads", "--json")
    assert json.loads(out) == {"user": "ada", "facts_deleted": 1, "threads_deleted": 1}
    code, out, _ = run("show", "--user", "ada", "--json")
    assert json.loads(out)["facts"] == [] and json.loads(out)["threads"] == []


def test_repl_memory_and_forget_commands(agent):
    from rich.console import Console

    from bots.repl import run_repl

    agent.ask("my GPU is an RTX 4090 with 24 GB", thread_id="cli:u-repl", user_id="u-repl")
    agent.remember("u-repl", "my cluster uses Slurm")
    lines = ["/memory", "/forget nope", "/forget gpu", "/memory", "/forget all", "/memory"]
    out = io.StringIO()
    code = run_repl(agent, user_id="u-repl", input_fn=lambda prompt: lines.pop(0) if lines else (_ for _ in ()).throw(
        EOFError), console=Console(file=out, width=120))
    shown = out.getvalue()
    assert code == 0
    assert "[gpu] your GPU is an RTX 4090 with 24 GB of VRAM" in shown and "you said: my cluster uses Slurm" in shown
    assert "No fact nope" in shown and "Forgot gpu" in shown
    assert "Deleted 1 fact(s), 1 thread(s)" in shown and "I keep no facts about you" in shown
    assert agent.memory_show("u-repl") == [] and agent.threads("u-repl") == []
