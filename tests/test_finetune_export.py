"""Serving a finished fine-tune: merge + export (``RUN/export/vllm``), GGUF through llama.cpp's converter, the
serving commands, the ``stackwise jobs merge|export|serve-info`` commands and the two tools.

One tiny LoRA run is trained once (CPU, a few steps); each test copies it into its own home with a job record.
The merge runs in its real subprocess; the GGUF converter is a script on PATH that records its command line.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
import uuid
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("trl")

from agent.jobs import JobsError, JobsService  # noqa: E402
from agent.settings import Settings  # noqa: E402
from bots.cli import main  # noqa: E402
from memory.jobs import JobStore  # noqa: E402
from tools.base import ToolContext, ToolError  # noqa: E402
from tools.finetune.export_folder import PLAIN_TEMPLATE  # noqa: E402
from tools.finetune.export_plan import merge_load_kwargs, plan_source  # noqa: E402
from tools.finetune.export_serve import max_lora_rank  # noqa: E402
from tools.finetune.tiny import build_tiny_model  # noqa: E402
from tools.registry import ToolRegistry  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*is deprecated and will be removed in v6:FutureWarning")
WORDS = ("red", "blue", "green", "cat")
FAKE_CONVERTER = """#!{python}
import json, sys
args = sys.argv[1:]
with open({record!r}, "w") as fh:
    json.dump(args, fh)
if {fail}:
    print("converting... boom: unsupported architecture", flush=True)
    sys.exit(3)
with open(args[args.index("--outfile") + 1], "wb") as fh:
    fh.write(b"GGUF" + b"\\0" * 60)
"""


# ---- a finished run, once ---------------------------------------------------------------------------------

def _rows(tok, n: int) -> str:
    lines = []
    for i in range(n):
        word = WORDS[i % len(WORDS)]
        prompt = tok.apply_chat_template([{"role": "user", "content": f"Say {word}."}], tokenize=False,
                                         add_generation_prompt=True)
        lines.append(json.dumps({"prompt": prompt, "completion": f"{word} {word}{tok.eos_token}"}))
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def lora_run(tiny, tmp_path_factory) -> Path:
    """A LoRA run trained for a few steps (adapter/, summary.json), as the worker leaves it."""
    from transformers import AutoTokenizer

    from tools.finetune.train import run

    run_dir = tmp_path_factory.mktemp("runs") / "ft-1"
    (run_dir / "data").mkdir(parents=True)
    (run_dir / "data" / "train.jsonl").write_text(_rows(AutoTokenizer.from_pretrained(tiny), 16))
    spec = {"base_model": "tiny-llama", "dataset": "words.jsonl", "method": "lora", "lora_rank": 32,
            "learning_rate": 2e-2, "batch_size": 4, "max_seq_len": 64, "max_steps": 4, "seed": 3,
            "base_model_path": str(tiny), "job_id": "ft-1"}
    (run_dir / "spec.json").write_text(json.dumps(spec))
    outcome = run(run_dir)
    assert outcome.code == 0, outcome.summary
    return run_dir


@pytest.fixture(scope="module")
def merged_run(lora_run, tiny, tmp_path_factory) -> Path:
    """The same run as if trained with ``merge: true`` (RUN/merged): exports link it instead of merging again,
    which keeps the tests that are not about the merge itself fast."""
    from tools.finetune.export_merge import merge_adapter

    run_dir = tmp_path_factory.mktemp("runs") / "ft-merged"
    shutil.copytree(lora_run, run_dir, ignore=shutil.ignore_patterns("checkpoints"))
    spec = json.loads((run_dir / "spec.json").read_text()) | {"merge": True}
    (run_dir / "spec.json").write_text(json.dumps(spec))
    merge_adapter(tiny, run_dir / "adapter", run_dir / "merged", "float32")
    return run_dir


def finished_job(home: Path, run_template: Path, *, owner: str = "alice", status: str = "succeeded",
                 **spec_changes) -> tuple[str, Path]:
    """A job record of ``owner`` whose run dir is a fresh copy of ``run_template`` (``spec_changes`` applied)."""
    run_dir = home / "jobs" / owner / f"run-{uuid.uuid4().hex[:8]}"
    shutil.copytree(run_template, run_dir, ignore=shutil.ignore_patterns("checkpoints", "export"))
    spec = json.loads((run_dir / "spec.json").read_text()) | spec_changes
    (run_dir / "spec.json").write_text(json.dumps(spec))
    with JobStore.for_home(home) as store:
        job = store.create(owner, spec, {}, run_dir)
        if status != "queued":
            store.claim("w1")
        if status in ("succeeded", "failed"):
            store.finish(job.id, status, artifacts={"adapter": str(run_dir / "adapter")})
    return job.id, run_dir


def service(home: Path, **settings) -> JobsService:
    return JobsService(Settings.from_env({"STACKWISE_HOME": str(home)}, **settings))


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def sample_ids(tokenizer):
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Say cat."}], tokenize=False,
                                         add_generation_prompt=True) + "cat cat"
    return tokenizer(text, return_tensors="pt")["input_ids"]


@pytest.fixture
def no_converter(monkeypatch, tmp_path):
    """A PATH without llama.cpp's converter (python stays reachable)."""
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", f"{empty}{os.pathsep}/usr/bin{os.pathsep}/bin")
    monkeypatch.delenv("STACKWISE_LLAMA_CPP", raising=False)
    return empty


def fake_converter(folder: Path, *, fail: bool = False) -> tuple[Path, Path]:
    """``convert_hf_to_gguf.py`` in ``folder``: records its arguments, writes the --outfile (or fails)."""
    folder.mkdir(parents=True, exist_ok=True)
    record = folder / "argv.json"
    script = folder / "convert_hf_to_gguf.py"
    script.write_text(FAKE_CONVERTER.format(python=sys.executable, record=str(record), fail=fail))
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script, record


# ---- merge + the vLLM folder ------------------------------------------------------------------------------

def test_merge_writes_a_folder_transformers_loads_with_the_adapted_logits(lora_run, tiny, stackwise_home):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    job, run_dir = finished_job(stackwise_home, lora_run)
    jobs = service(stackwise_home)
    result = jobs.merge(job, "alice")
    folder = run_dir / "export" / "vllm"
    assert result["vllm"]["folder"] == str(folder) and result["vllm"]["made_from"] == "merge"
    assert result["vllm"]["reused"] is False and result["vllm"]["dtype"] == "float32"   # the base's precision
    assert result["gguf"] is None

    merged = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = sample_ids(tokenizer)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny), run_dir / "adapter")
    torch.testing.assert_close(logits(merged, ids), logits(adapted, ids), atol=1e-4, rtol=1e-4)
    base_logits = logits(AutoModelForCausalLM.from_pretrained(tiny), ids)
    assert (logits(merged, ids) - base_logits).abs().max() > 1e-3          # the adapter changed the model

    files = set(os.listdir(folder))
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "serve.json",
            "README.md", "chat_template.jinja"} <= files
    assert any(f.endswith(".safetensors") for f in files) and not any(f.startswith("adapter") for f in files)
    config = json.loads((folder / "config.json").read_text())
    assert config["torch_dtype"] == "float32" and config["architectures"] == ["LlamaForCausalLM"]
    assert tokenizer.chat_template == (tiny / "chat_template.jinja").read_text()     # the base's own template
    serve = json.loads((folder / "serve.json").read_text())
    assert serve["served_model_name"] == job and serve["made_from"] == "merge" and serve["method"] == "lora"
    assert serve["commands"]["vllm"] == f"vllm serve {folder} --served-model-name {job} --port 8000"
    assert f"vllm serve {folder}" in (folder / "README.md").read_text()
    assert not list((run_dir / "export").glob(".vllm-*")) and not (run_dir / "export" / ".lock").exists()

    before = (folder / "serve.json").stat().st_mtime_ns
    assert jobs.merge(job, "alice")["vllm"]["reused"] is True          # up to date: not merged again
    assert (folder / "serve.json").stat().st_mtime_ns == before
    jobs.close()


def test_full_and_already_merged_runs_are_linked_not_merged_again(lora_run, merged_run, stackwise_home):
    from transformers import AutoModelForCausalLM

    # A full fine-tune leaves the whole model in adapter/ (here: another tiny model standing in for it).
    job, run_dir = finished_job(stackwise_home, lora_run, method="full")
    shutil.rmtree(run_dir / "adapter")
    build_tiny_model(run_dir / "adapter", seed=5)
    jobs = service(stackwise_home)
    result = jobs.merge(job, "alice")
    folder = run_dir / "export" / "vllm"
    assert result["vllm"]["made_from"] == "full" and result["vllm"]["weights"] == "linked"
    weights = folder / "model.safetensors"
    assert weights.stat().st_ino == (run_dir / "adapter" / "model.safetensors").stat().st_ino   # no second copy
    ids = torch.tensor([[1, 5, 9, 30]])
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(folder), ids),
                               logits(AutoModelForCausalLM.from_pretrained(run_dir / "adapter"), ids))
    assert jobs.serve_info(job, "alice")["vllm_lora"] is None        # nothing to serve as an adapter

    # A LoRA run whose training merged it already (merge: true → RUN/merged) is reused as it is.
    job2, run2 = finished_job(stackwise_home, merged_run)
    result = jobs.merge(job2, "alice")
    assert result["vllm"]["made_from"] == "merged" and result["vllm"]["weights"] == "linked"
    assert json.loads((run2 / "export" / "vllm" / "serve.json").read_text())["made_from"] == "merged"
    assert jobs.merge(job2, "alice")["vllm"]["reused"] is True
    forced = jobs.merge(job2, "alice", force=True)                   # --force: made again, replacing the old
    assert forced["vllm"]["reused"] is False and not list((run2 / "export").glob(".vllm*"))
    ids = torch.tensor([[1, 5, 9, 30]])
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(run2 / "export" / "vllm"), ids),
                               logits(AutoModelForCausalLM.from_pretrained(run2 / "merged"), ids))
    jobs.close()


def test_qlora_merges_into_the_unquantized_base_and_a_quantized_base_is_refused(lora_run, tiny, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(lora_run, run_dir)
    spec = json.loads((run_dir / "spec.json").read_text())
    bf16_base = tmp_path / "base-bf16"
    shutil.copytree(tiny, bf16_base)
    config = json.loads((bf16_base / "config.json").read_text()) | {"torch_dtype": "bfloat16"}
    config.pop("dtype", None)
    (bf16_base / "config.json").write_text(json.dumps(config))
    (run_dir / "spec.json").write_text(json.dumps(spec | {"method": "qlora", "base_model_path": str(bf16_base)}))

    source = plan_source("ft-1", run_dir)
    assert (source.kind, source.method, source.dtype, source.base) == ("merge", "qlora", "bfloat16", bf16_base)
    assert any("unquantized" in n for n in source.notes)
    kwargs = merge_load_kwargs(source.dtype)
    assert kwargs["dtype"] is torch.bfloat16 and "quantization_config" not in kwargs and kwargs["device_map"] == "cpu"

    # A base stored in 4 bits cannot take the merge; the unquantized original can be given instead.
    four_bit = tmp_path / "base-4bit"
    shutil.copytree(bf16_base, four_bit)
    (four_bit / "config.json").write_text(json.dumps(config | {"quantization_config": {"load_in_4bit": True}}))
    (run_dir / "spec.json").write_text(json.dumps(spec | {"method": "qlora", "base_model_path": str(four_bit)}))
    with pytest.raises(ToolError) as caught:
        plan_source("ft-1", run_dir)
    assert caught.value.type == "quantized_base" and "unquantized" in caught.value.message
    assert plan_source("ft-1", run_dir, bf16_base).base == bf16_base


def test_a_base_without_a_chat_template_gets_the_trained_plain_layout(merged_run, tiny, stackwise_home, tmp_path):
    from transformers import AutoTokenizer

    from tools.finetune.data import _plain_prompt

    base = tmp_path / "no-template"
    shutil.copytree(tiny, base)
    (base / "chat_template.jinja").unlink()
    job, run_dir = finished_job(stackwise_home, merged_run, base_model_path=str(base))
    service(stackwise_home).merge(job, "alice")
    folder = run_dir / "export" / "vllm"
    assert json.loads((folder / "tokenizer_config.json").read_text())["chat_template"] == PLAIN_TEMPLATE
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say cat."}]
    rendered = AutoTokenizer.from_pretrained(folder).apply_chat_template(messages, tokenize=False,
                                                                         add_generation_prompt=True)
    assert rendered == _plain_prompt(messages)
    assert json.loads((folder / "serve.json").read_text())["chat_template"] == "added"


# ---- refusals ------------------------------------------------------------------------------------------------

def test_jobs_that_cannot_be_exported_say_why(lora_run, stackwise_home, tmp_path):
    jobs = service(stackwise_home)
    running, _ = finished_job(stackwise_home, lora_run, status="running")
    with pytest.raises(JobsError) as caught:
        jobs.merge(running, "alice")
    assert caught.value.type == "invalid_state" and "still training" in caught.value.message
    mine, run_dir = finished_job(stackwise_home, lora_run)
    with pytest.raises(JobsError) as caught:            # bob: alice's job does not exist for him
        jobs.export(mine, "bob")
    assert caught.value.type == "not_found" and str(run_dir) not in caught.value.message
    with pytest.raises(JobsError) as caught:
        jobs.serve_info(mine, "bob")
    assert caught.value.type == "not_found"
    shutil.rmtree(run_dir / "adapter")
    with pytest.raises(JobsError) as caught:
        jobs.merge(mine, "alice")
    assert caught.value.type == "no_adapter" and "adapter_config.json" in caught.value.message
    jobs.close()


def test_a_full_disk_is_refused_before_anything_is_written(lora_run, stackwise_home, monkeypatch):
    import tools.finetune.export as export

    job, run_dir = finished_job(stackwise_home, lora_run)
    monkeypatch.setattr(export.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12, 1000))
    with pytest.raises(JobsError) as caught:
        service(stackwise_home).merge(job, "alice")
    assert caught.value.type == "disk_full" and "GB" in caught.value.message
    assert not (run_dir / "export" / "vllm").exists()


# ---- GGUF ---------------------------------------------------------------------------------------------------

def test_gguf_without_the_converter_says_how_to_get_it(merged_run, stackwise_home, no_converter, capsys):
    job, run_dir = finished_job(stackwise_home, merged_run)
    code = main(["jobs", "export", job, "--format", "gguf", "--user", "alice", "--json"])
    error = json.loads(capsys.readouterr().out)["error"]
    assert code == 1 and error["type"] == "converter_missing"
    assert "github.com/ggml-org/llama.cpp" in error["message"] and "STACKWISE_LLAMA_CPP" in error["message"]
    assert not (run_dir / "export" / "vllm").exists()              # refused before minutes of merging

    code = main(["jobs", "export", job, "--user", "alice", "--json"])     # --format all: the folder, GGUF noted
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["vllm"]["reused"] is False
    assert "convert_hf_to_gguf.py" in result["gguf"]["skipped"]
    assert f"The vLLM folder is ready: {run_dir / 'export' / 'vllm'}" in result["gguf"]["skipped"]


def test_gguf_with_a_converter_on_path_gets_the_right_command_line(merged_run, stackwise_home, no_converter,
                                                                   tmp_path):
    job, run_dir = finished_job(stackwise_home, merged_run)
    _, argv = fake_converter(no_converter)
    result = service(stackwise_home).export(job, "alice", "gguf", gguf_type="q8_0")
    export_dir = run_dir / "export"
    assert json.loads(argv.read_text()) == [str(export_dir / "vllm"), "--outfile",
                                            str(export_dir / "gguf" / f".{job}.partial.gguf"), "--outtype", "q8_0"]
    gguf = export_dir / "gguf" / f"{job}.gguf"
    assert result["gguf"]["file"] == str(gguf) and gguf.read_bytes().startswith(b"GGUF")
    assert result["gguf"]["converter"].startswith("PATH")
    modelfile = (export_dir / "gguf" / "Modelfile").read_text()
    assert f"FROM ./{job}.gguf" in modelfile and 'PARAMETER stop "</s>"' in modelfile
    assert result["serve"]["gguf"]["ready"] is True
    argv.unlink()
    assert service(stackwise_home).export(job, "alice", "gguf", gguf_type="q8_0")["gguf"]["reused"] is True
    assert not argv.exists()                                          # up to date: not converted again

    # STACKWISE_LLAMA_CPP names a checkout: its script runs with this Python; a failure shows the log's end.
    checkout = tmp_path / "llama.cpp"
    script, argv2 = fake_converter(checkout, fail=True)
    script.chmod(0o644)                                # not executable: only `python script` can run it
    with pytest.raises(JobsError) as caught:
        service(stackwise_home, llama_cpp=str(checkout)).export(job, "alice", "gguf", force=True)
    assert caught.value.type == "converter_failed" and "unsupported architecture" in caught.value.message
    assert json.loads(argv2.read_text())[1:] == ["--outfile", str(export_dir / "gguf" / f".{job}.partial.gguf"),
                                                 "--outtype", "f16"]
    assert gguf.read_bytes().startswith(b"GGUF")                    # the earlier file is left as it was
    with pytest.raises(JobsError) as caught:
        service(stackwise_home, llama_cpp=str(tmp_path / "nowhere")).export(job, "alice", "gguf")
    assert caught.value.type == "converter_missing" and "nowhere" in caught.value.message


def test_a_converter_that_hangs_is_stopped_at_the_time_limit(merged_run, stackwise_home, tmp_path):
    from memory.jobs import pid_alive

    job, run_dir = finished_job(stackwise_home, merged_run)
    checkout = tmp_path / "llama.cpp"
    checkout.mkdir()
    pid_file = tmp_path / "converter.pid"
    (checkout / "convert_hf_to_gguf.py").write_text(
        f"import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\ntime.sleep(60)\n")
    ctx = ToolContext(home=stackwise_home, user_id="alice", extras={"llama_cpp": str(checkout),
                                                                   "export_timeout_s": 1.5})
    record = ToolRegistry.default(plugins=False).call("export_finetune", {"job_id": job, "format": "gguf"}, ctx)
    assert not record["ok"] and record["error"]["type"] == "timeout" and "was stopped" in record["error"]["message"]
    assert not pid_alive(int(pid_file.read_text()))
    assert (run_dir / "export" / "vllm" / "serve.json").is_file()          # the folder made before it stays
    assert not (run_dir / "export" / "gguf" / f"{job}.gguf").exists()
    assert not (run_dir / "export" / ".lock").exists()


# ---- serve-info, the CLI and the tools ----------------------------------------------------------------------

def test_serve_info_names_the_folders_and_the_exact_commands(lora_run, tiny, stackwise_home, capsys):
    job, run_dir = finished_job(stackwise_home, lora_run)
    code = main(["jobs", "serve-info", job, "--user", "alice", "--json"])
    info = json.loads(capsys.readouterr().out)
    assert code == 0 and info["served_model_name"] == job
    folder, adapter = run_dir / "export" / "vllm", run_dir / "adapter"
    assert info["vllm"]["command"] == f"vllm serve {folder} --served-model-name {job} --port 8000"
    assert info["vllm"]["ready"] is False and info["next"][0] == f"stackwise jobs merge {job}"
    assert info["vllm"]["command_for_stackwise"].endswith("--enable-auto-tool-choice --tool-call-parser llama3_json")
    assert info["vllm_lora"]["command"] == (f"vllm serve {tiny} --enable-lora --lora-modules {job}={adapter} "
                                            "--max-lora-rank 32 --port 8000")
    gguf_dir = run_dir / "export" / "gguf"
    assert info["gguf"]["ollama"] == f"ollama create {job} -f {gguf_dir / 'Modelfile'}"
    assert info["gguf"]["llama_server"] == f"llama-server -m {gguf_dir / (job + '.gguf')} --alias {job} --port 8080"
    assert info["chat"]["shell"] == (f"OPENAI_BASE_URL=http://127.0.0.1:8000/v1 STACKWISE_LLM_MODEL={job} "
                                     "stackwise chat --brain llm")
    assert info["chat"]["repl"] == f"/model http://127.0.0.1:8000/v1 {job}"
    assert (max_lora_rank(8), max_lora_rank(24), max_lora_rank(64)) == (8, 32, 64)     # values vLLM accepts

    code = main(["jobs", "serve-info", job, "--user", "alice"])
    text = capsys.readouterr().out
    assert code == 0 and info["vllm"]["command"] in text and info["vllm_lora"]["command"] in text
    assert info["gguf"]["ollama"] in text and info["chat"]["shell"] in text and "stackwise jobs merge" in text


def test_cli_exit_codes(merged_run, stackwise_home, capsys):
    job, _ = finished_job(stackwise_home, merged_run)
    assert main(["jobs", "merge", "ft-99", "--user", "alice", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["error"]["type"] == "not_found"
    assert main(["jobs", "serve-info", job, "--user", "bob"]) == 1
    assert capsys.readouterr().err == "error: There is no job ft-1.\n"          # as if it did not exist
    for argv in (["jobs", "export", job, "--format", "onnx"], ["jobs", "merge"], ["jobs", "serve-info"]):
        with pytest.raises(SystemExit) as caught:
            main(argv)
        assert caught.value.code == 2
    capsys.readouterr()
    assert main(["jobs", "merge", job, "--user", "alice"]) == 0
    out = capsys.readouterr().out
    assert f"{job}  vLLM folder written (merged, float32)" in out and "vllm serve" in out


def test_the_tools_check_first_and_serve_info_renders_in_both_languages(lora_run, merged_run, stackwise_home):
    registry = ToolRegistry.default(plugins=False)
    export, info = registry.get("export_finetune"), registry.get("finetune_serve_info")
    assert export.side_effects is True and info.side_effects is False
    assert set(export.schema()["properties"]) == {"job_id", "format", "gguf_type", "merge_base", "force"}
    job, run_dir = finished_job(stackwise_home, merged_run)
    ctx = ToolContext(home=stackwise_home, user_id="alice", lang="zh")
    lines = registry.preflight("export_finetune", {"job_id": job, "format": "vllm"}, ctx)
    assert lines["vLLM 文件夹"] == str(run_dir / "export" / "vllm") and "GB" in lines["磁盘"]
    running, _ = finished_job(stackwise_home, lora_run, status="running")
    with pytest.raises(ToolError):
        registry.preflight("export_finetune", {"job_id": running}, ctx)

    record = registry.call("finetune_serve_info", {}, ctx)          # no id: the latest succeeded job
    assert record["ok"] and record["result"]["job_id"] == job
    zh = info.render(record["result"], "zh")
    assert "部署方式" in zh and f"stackwise jobs merge {job}" in zh
    record = registry.call("export_finetune", {"job_id": job, "format": "vllm"}, ctx)
    assert record["ok"], record
    text = export.render(record["result"], "en")
    assert f"Exported {job}" in text and f"/model http://127.0.0.1:8000/v1 {job}" in text
    bob = registry.call("finetune_serve_info", {"job_id": job}, ToolContext(home=stackwise_home, user_id="bob"))
    assert not bob["ok"] and bob["error"]["type"] == "not_found"
