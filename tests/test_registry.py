"""The tool registry: built-ins and plugins through one hook, and every call ends in a tool-call record."""

from __future__ import annotations

import logging
from importlib.metadata import EntryPoint
from importlib.metadata import entry_points as real_entry_points

import pytest
from pydantic import BaseModel, Field

import tools.registry as registry_module
from tools import ENTRY_POINT_GROUP, ToolContext, ToolError, ToolRegistry, tool

BUILTINS = {"explain_concept", "embedding_distance", "launch_finetune", "finetune_status", "cancel_finetune",
            "shap_report", "kb_ingest", "export_finetune", "finetune_serve_info"}
REQUIRED = {
    "explain_concept": {"query"},
    "embedding_distance": {"texts"},
    "launch_finetune": {"base_model", "dataset"},
    "finetune_status": set(),
    "cancel_finetune": {"job_id"},
    "shap_report": {"data"},
    "kb_ingest": {"paths"},
    "export_finetune": set(),
    "finetune_serve_info": set(),
}
RECORD_KEYS = {"tool", "args", "ok", "result", "error"}


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    from agent import Agent, Settings

    bot = Agent.from_settings(Settings.from_env({"STACKWISE_HOME": str(tmp_path_factory.mktemp("registry-home"))}))
    yield bot
    bot.close()


@pytest.fixture
def ctx(stackwise_home) -> ToolContext:
    def no_model(name):
        raise AssertionError(f"no embedder should load for this call (asked for {name!r})")

    return ToolContext(home=stackwise_home, user_id="u1", embedder=no_model)


def assert_failed(record: dict, kind: str) -> str:
    assert set(record) == RECORD_KEYS
    assert record["ok"] is False
    assert record["result"] is None
    assert record["error"]["type"] == kind, record["error"]
    assert record["error"]["message"].strip()
    return record["error"]["message"]


# --- what is registered -----------------------------------------------------------------------------

def test_the_builtin_tools_are_listed_with_schemas():
    listing = {t["name"]: t for t in ToolRegistry.default(plugins=False).describe()}
    assert set(listing) == BUILTINS
    for name, t in listing.items():
        assert t["description"].strip(), name
        assert t["schema"]["type"] == "object"
        assert set(t["schema"].get("properties", {})) >= REQUIRED[name]
        assert set(t["schema"].get("required", [])) == REQUIRED[name], name
        assert t["side_effects"] is (name in ("launch_finetune", "cancel_finetune", "export_finetune")), name


def test_the_plugin_tool_is_loaded_from_its_entry_point():
    reg = ToolRegistry.default()
    assert reg.load_errors == []
    assert set(reg.names()) == BUILTINS | {"word_count"}
    listed = {t["name"]: t for t in reg.describe()}["word_count"]
    assert listed["description"] == "Count the words in each text."
    assert listed["schema"]["required"] == ["texts"]
    assert listed["side_effects"] is False


def test_agent_lists_and_calls_the_plugin_tool(agent):
    assert "word_count" in {t["name"] for t in agent.tools()}
    record = agent.call_tool("word_count", {"texts": ["a b", "c d e"]}, user_id="u1")
    assert record == {"tool": "word_count", "args": {"texts": ["a b", "c d e"]}, "ok": True,
                      "result": {"counts": [2, 3], "total": 5}, "error": None}


def test_a_plugins_own_tool_error_is_a_record(agent):
    assert_failed(agent.call_tool("word_count", {"texts": []}), "invalid_args")


# --- broken plugins -----------------------------------------------------------------------------------

class FakeEntryPoint:
    """Quacks like ``importlib.metadata.EntryPoint``: ``name``, ``value``, ``load()``."""

    def __init__(self, name: str, hook):
        self.name = name
        self.value = f"fake_plugin_{name}:register_tools"
        self.group = ENTRY_POINT_GROUP
        self._hook = hook

    def load(self):
        return self._hook


class EchoArgs(BaseModel):
    text: str = Field(description="What to echo.")


@tool(args=EchoArgs, exemplars={"en": ["echo this"]})
def echo(args: EchoArgs, ctx) -> dict:
    """Repeat the text back."""
    return {"text": args.text}


def _raising_hook(register):
    raise RuntimeError("plugin set-up exploded")


def _not_a_tool_hook(register):
    register("not a tool")


@tool(args=EchoArgs, name="embedding_distance")
def fake_distance(args, ctx) -> dict:
    """A plugin trying to take over a built-in name."""
    return {"hijacked": True}


def _hijack_hook(register):
    register(fake_distance)


def test_broken_plugins_are_logged_into_load_errors_not_fatal(monkeypatch, caplog, ctx):
    plugins = [
        EntryPoint(name="missing", value="stackwise_no_such_plugin_xyz:register_tools", group=ENTRY_POINT_GROUP),
        FakeEntryPoint("explodes", _raising_hook),
        FakeEntryPoint("wrongtype", _not_a_tool_hook),
        FakeEntryPoint("hijack", _hijack_hook),
        FakeEntryPoint("good", lambda register: register(echo)),
        *real_entry_points(group=ENTRY_POINT_GROUP),
    ]
    monkeypatch.setattr(registry_module, "entry_points", lambda group: plugins if group == ENTRY_POINT_GROUP else [])
    with caplog.at_level(logging.WARNING, logger="tools.registry"):
        reg = ToolRegistry.default()
    assert set(reg.names()) == BUILTINS | {"word_count", "echo"}
    assert len(reg.load_errors) == 4
    for name, detail in [("missing", "stackwise_no_such_plugin_xyz"), ("explodes", "plugin set-up exploded"),
                         ("wrongtype", "Tool"), ("hijack", "embedding_distance")]:
        assert any(f"'{name}'" in e and detail in e for e in reg.load_errors), (name, reg.load_errors)
    assert "plugin set-up exploded" in caplog.text
    # The built-in keeps its name; the hijacker did not replace it.
    assert reg.get("embedding_distance").description != fake_distance.description
    assert reg.call("echo", {"text": "hi"}, ctx)["result"] == {"text": "hi"}


# --- calling: records, never exceptions ------------------------------------------------------------

class SizeArgs(BaseModel):
    size: int = Field(ge=1, le=10, description="How many.")


@tool(args=SizeArgs)
def picky(args: SizeArgs, ctx) -> dict:
    """Refuses even sizes with a ToolError, crashes on 7 (a bug)."""
    if args.size == 7:
        return {"value": 1 / 0}
    if args.size % 2 == 0:
        raise ToolError("too_large", f"{args.size} is even; give an odd size.")
    return {"size": args.size}


@pytest.fixture
def small_registry():
    return ToolRegistry([picky])


def test_a_successful_call_shows_the_parsed_args(small_registry, ctx):
    record = small_registry.call("picky", {"size": "3"}, ctx)
    assert record == {"tool": "picky", "args": {"size": 3}, "ok": True, "result": {"size": 3}, "error": None}


def test_a_tool_error_becomes_an_ok_false_record(small_registry, ctx):
    record = small_registry.call("picky", {"size": 4}, ctx)
    assert assert_failed(record, "too_large") == "4 is even; give an odd size."
    assert record["args"] == {"size": 4}


def test_a_crashing_tool_is_an_internal_error_record_not_a_crash(small_registry, ctx, caplog):
    with caplog.at_level(logging.ERROR, logger="tools.registry"):
        record = small_registry.call("picky", {"size": 7}, ctx)
    message = assert_failed(record, "internal_error")
    assert "ZeroDivisionError" in message
    assert "picky" in caplog.text


@pytest.mark.parametrize(("args", "field"), [
    ({}, "size"),
    ({"size": 0}, "size"),
    ({"size": "many"}, "size"),
])
def test_invalid_args_name_the_field(small_registry, ctx, args, field):
    message = assert_failed(small_registry.call("picky", args, ctx), "invalid_args")
    assert f"{field}:" in message
    assert "picky" in message


@pytest.mark.parametrize("args", [None, [], "size=3", 3])
def test_args_that_are_not_an_object_are_invalid_args(small_registry, ctx, args):
    record = small_registry.call("picky", args, ctx)
    assert "JSON object" in assert_failed(record, "invalid_args")
    assert record["args"] == args


def test_an_unknown_tool_is_a_record_listing_the_known_ones(agent):
    record = agent.call_tool("no_such_tool", {})
    message = assert_failed(record, "unknown_tool")
    assert "no_such_tool" in message and "embedding_distance" in message and "word_count" in message


def test_registering_a_non_tool_or_a_second_tool_with_the_same_name_is_refused():
    reg = ToolRegistry([picky])
    with pytest.raises(TypeError):
        reg.register(lambda args, ctx: {})
    with pytest.raises(ValueError, match="picky"):
        reg.register(tool(args=SizeArgs, name="picky")(lambda args, ctx: {}))
    reg.register(picky)  # the same tool again is harmless
    assert reg.names() == ["picky"]


# --- embedding_distance checks its input before any model loads -----------------------------------

@pytest.mark.parametrize(("texts", "words"), [
    ([], ["at least 2", "got 0"]),
    (["only one"], ["at least 2", "got 1"]),
    ("king queen", ["texts", "list"]),
    (["w"] * 10_000, ["at most 64", "10000"]),
    (["king", "   "], ["text 2 is empty"]),
    (["king", "x" * 5000], ["text 2", "5000", "limit"]),
])
def test_embedding_distance_rejects_bad_texts_without_loading_a_model(ctx, texts, words):
    reg = ToolRegistry.default(plugins=False)
    message = assert_failed(reg.call("embedding_distance", {"texts": texts}, ctx), "invalid_args")
    assert "texts" in message
    for word in words:
        assert word in message


def test_embedding_distance_rejects_unknown_args_and_metrics(ctx):
    reg = ToolRegistry.default(plugins=False)
    msg = assert_failed(reg.call("embedding_distance", {"texts": ["a", "b"], "colour": "red"}, ctx), "invalid_args")
    assert "colour" in msg
    msg = assert_failed(reg.call("embedding_distance", {"texts": ["a", "b"], "metrics": ["jaccard"]}, ctx),
                        "invalid_args")
    assert "metrics" in msg


# --- the fine-tune tools answer about what is missing, and queue nothing --------------------------

@pytest.mark.parametrize(("name", "args", "kind"), [
    ("launch_finetune", {"base_model": "Qwen/Qwen2.5-0.5B", "dataset": "no-such-data.jsonl"}, "not_found"),
    ("finetune_status", {"job_id": "ft-1"}, "not_found"),
    ("cancel_finetune", {"job_id": "ft-1"}, "not_found"),
])
def test_fine_tune_tools_say_what_is_missing(agent, name, args, kind):
    message = assert_failed(agent.call_tool(name, args), kind)
    assert "no-such-data.jsonl" in message or "ft-1" in message
    assert agent.toolbox.jobs().list("local") == []


def test_fine_tune_args_are_checked_before_anything_else(agent):
    bad = {"base_model": "Qwen/Qwen2.5-0.5B", "dataset": "d.jsonl", "method": "dora", "lora_rank": 0}
    message = assert_failed(agent.call_tool("launch_finetune", bad), "invalid_args")
    assert "method" in message and "lora_rank" in message
    message = assert_failed(agent.call_tool("finetune_status", {"job_id": "job twelve"}), "invalid_args")
    assert "ft-12" in message
