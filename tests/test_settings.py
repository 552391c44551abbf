"""Settings: environment variables, ``stackwise.toml`` files, their precedence and clear errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from agent.settings import Settings, SettingsError


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """An empty working directory (where ``./stackwise.toml`` is looked up)."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def test_defaults_with_an_empty_environment(workdir, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    s = Settings.from_env({})
    assert s.home == (tmp_path / "user" / ".stackwise").resolve()
    assert s.brain == "local"
    assert s.data_roots == ()
    assert s.threads_db == s.home / "threads.sqlite"
    assert s.max_message_chars > 1000


def test_environment_variables_are_read_and_typed(workdir, tmp_path):
    extra_a, extra_b = tmp_path / "a", tmp_path / "b"
    s = Settings.from_env({
        "STACKWISE_HOME": str(tmp_path / "h"),
        "STACKWISE_BRAIN": "llm",
        "STACKWISE_MAX_MESSAGE_CHARS": "500",
        "STACKWISE_ROUTER_THRESHOLD": "0.5",
        "STACKWISE_DATA_ROOTS": f"{extra_a}:{extra_b}",
        "OPENAI_BASE_URL": "http://127.0.0.1:9/v1",
        "STACKWISE_LLM_MODEL": "qwen",
    })
    assert s.home == (tmp_path / "h").resolve()
    assert s.brain == "llm"
    assert s.max_message_chars == 500
    assert s.router_threshold == pytest.approx(0.5)
    assert s.data_roots == (extra_a.resolve(), extra_b.resolve())
    assert (s.llm_base_url, s.llm_model) == ("http://127.0.0.1:9/v1", "qwen")


def test_from_env_reads_the_process_environment_by_default(workdir, monkeypatch, stackwise_home):
    monkeypatch.setenv("STACKWISE_BRAIN", "llm")
    s = Settings.from_env()
    assert s.brain == "llm"
    assert s.home == stackwise_home.resolve()


def test_empty_environment_values_are_ignored(workdir):
    assert Settings.from_env({"STACKWISE_BRAIN": "", "STACKWISE_MAX_MESSAGE_CHARS": ""}).brain == "local"


def test_toml_in_the_working_directory(workdir, tmp_path):
    (workdir / "stackwise.toml").write_text(
        f'max_message_chars = 123\nrouter_threshold = 0.25\ndata_roots = ["{tmp_path}"]\n', encoding="utf-8")
    s = Settings.from_env({"STACKWISE_HOME": str(tmp_path / "h")})
    assert s.max_message_chars == 123
    assert s.router_threshold == pytest.approx(0.25)
    assert s.data_roots == (tmp_path.resolve(),)


def test_toml_in_stackwise_home(workdir, tmp_path):
    home = tmp_path / "h"
    home.mkdir()
    (home / "stackwise.toml").write_text('brain = "llm"\nmax_message_chars = 77\n', encoding="utf-8")
    s = Settings.from_env({"STACKWISE_HOME": str(home)})
    assert (s.brain, s.max_message_chars) == ("llm", 77)


def test_toml_file_precedence_config_then_cwd_then_home(workdir, tmp_path):
    home = tmp_path / "h"
    home.mkdir()
    (home / "stackwise.toml").write_text("max_message_chars = 1\n", encoding="utf-8")
    env = {"STACKWISE_HOME": str(home)}
    assert Settings.from_env(env).max_message_chars == 1
    (workdir / "stackwise.toml").write_text("max_message_chars = 2\n", encoding="utf-8")
    assert Settings.from_env(env).max_message_chars == 2
    config = tmp_path / "elsewhere.toml"
    config.write_text("max_message_chars = 3\n", encoding="utf-8")
    assert Settings.from_env({**env, "STACKWISE_CONFIG": str(config)}).max_message_chars == 3


def test_value_precedence_keyword_over_env_over_toml_over_default(workdir, tmp_path):
    (workdir / "stackwise.toml").write_text('max_message_chars = 10\nbrain = "llm"\n', encoding="utf-8")
    env = {"STACKWISE_HOME": str(tmp_path / "h"), "STACKWISE_MAX_MESSAGE_CHARS": "20"}
    s = Settings.from_env(env)
    assert s.max_message_chars == 20            # env beats the file
    assert s.brain == "llm"                     # the file beats the default
    assert s.router_threshold == Settings.from_env({}).router_threshold
    assert Settings.from_env(env, max_message_chars=30).max_message_chars == 30   # keyword beats env
    assert Settings.from_env(env, max_message_chars=None).max_message_chars == 20  # None = not given


@pytest.mark.parametrize(("env", "words"), [
    ({"STACKWISE_BRAIN": "foo"}, ["brain", "foo", "local", "llm"]),
    ({"STACKWISE_MAX_MESSAGE_CHARS": "lots"}, ["max_message_chars", "lots"]),
    ({"STACKWISE_ROUTER_THRESHOLD": "high"}, ["router_threshold", "high"]),
])
def test_a_bad_environment_value_is_a_clear_settings_error(workdir, env, words):
    with pytest.raises(SettingsError) as err:
        Settings.from_env(env)
    for word in words:
        assert word in str(err.value)


def test_a_bad_value_in_the_toml_file_is_a_settings_error(workdir):
    (workdir / "stackwise.toml").write_text('brain = "gpt"\n', encoding="utf-8")
    with pytest.raises(SettingsError, match="brain"):
        Settings.from_env({})


def test_broken_toml_names_the_file(workdir):
    (workdir / "stackwise.toml").write_text("brain = [\n", encoding="utf-8")
    with pytest.raises(SettingsError) as err:
        Settings.from_env({})
    assert "stackwise.toml" in str(err.value)
    assert "TOML" in str(err.value)


def test_unknown_toml_key_is_named(workdir):
    (workdir / "stackwise.toml").write_text("brian = 'local'\n", encoding="utf-8")
    with pytest.raises(SettingsError, match="brian"):
        Settings.from_env({})


def test_with_changes_one_field_and_checks_it(workdir, tmp_path):
    s = Settings.from_env({"STACKWISE_HOME": str(tmp_path)})
    assert s.with_(brain="llm").brain == "llm"
    assert s.brain == "local"                    # frozen: the original is unchanged
    with pytest.raises(SettingsError):
        s.with_(brain="nope")


def test_describe_documents_every_field():
    described = {d["name"]: d for d in Settings.describe()}
    assert set(described) == {f.name for f in dataclasses.fields(Settings)}
    for name, d in described.items():
        assert d["doc"].strip(), f"{name} has no description"
        assert d["env"].startswith(("STACKWISE_", "OPENAI_")), name
    envs = [d["env"] for d in described.values()]
    assert len(envs) == len(set(envs)), "two settings share one environment variable"


def test_every_described_env_var_is_honoured(workdir, tmp_path):
    values = {"home": str(tmp_path / "h"), "brain": "llm", "data_roots": str(tmp_path),
              "max_message_chars": "42", "router_threshold": "0.3", "job_backend": "ray",
              "worker_gpu": "A100:80", "ray_num_gpus": "0", "llm_timeout_s": "5", "llm_max_steps": "2",
              "keep_checkpoints": "3", "thread_max_idle_days": "0"}
    for d in Settings.describe():
        raw = values.get(d["name"], "x-" + d["name"])
        s = Settings.from_env({d["env"]: raw})
        assert getattr(s, d["name"]) != getattr(Settings.from_env({}), d["name"]), d["env"]


@pytest.mark.parametrize(("raw", "message"), [("STACKWISE_JOB_BACKEND", "slurm"), ("STACKWISE_WORKER_GPU", "big")])
def test_job_settings_with_unusable_values_say_which(workdir, raw, message):
    with pytest.raises(SettingsError, match=raw.removeprefix("STACKWISE_").lower()):
        Settings.from_env({raw: message})


def test_worker_gpu_forms(workdir):
    from agent.settings import parse_worker_gpu

    assert parse_worker_gpu("none") == ("none", None)
    assert parse_worker_gpu("Auto") == ("auto", None)
    assert parse_worker_gpu(" NVIDIA H200 : 139 ") == ("given", {"name": "NVIDIA H200", "memory_gb": 139.0,
                                                                 "count": 1})
    assert parse_worker_gpu("H200:141x2") == ("given", {"name": "H200", "memory_gb": 141.0, "count": 2})
    for bad in ("H200", ":80", "H200:0", "H200:-3", "H200:lots", "H200:80x0", "H200:80x", "H200:80x100"):
        with pytest.raises(SettingsError, match="NAME:GB"):
            parse_worker_gpu(bad)


def test_the_api_key_is_not_shown_in_repr(workdir):
    s = Settings.from_env({"OPENAI_API_KEY": "sk-very-secret"})
    assert s.llm_api_key == "sk-very-secret"
    assert "sk-very-secret" not in repr(s)
