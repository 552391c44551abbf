"""Trial runs ("try it on 500 rows first"): the stratified sample (proportional, every stratum in, deterministic,
bounded, drawn from the full run's own train/held-out split), the short schedule, what the launch records
(spec.json and the job's ``trial``), the preflight's line about it, and the status text that offers the full run."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from pydantic import ValidationError
from trial_rows import SIZES, cot_rows, write_jsonl

from bots.cli import main
from memory.jobs import JobStore
from tools.base import ToolContext
from tools.finetune.data import load_tokenizer
from tools.finetune.rundir import RunPaths
from tools.finetune.sample import TRIAL_MAX_STEPS, allocate, prepare_data, spec_fields, stratified_pick
from tools.finetune.spec import FinetuneSpec
from tools.finetune.status import status_text
from tools.finetune.tiny import build_tiny_model
from tools.finetune.train_setup import load_spec
from tools.registry import ToolRegistry


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trial-work")
    build_tiny_model(root / "tiny-model")
    write_jsonl(root / "big.jsonl", cot_rows(SIZES))
    write_jsonl(root / "plain.jsonl", cot_rows(SIZES, category=False))
    write_jsonl(root / "small.jsonl", cot_rows({"a": 120, "b": 80}))
    return root


@pytest.fixture(scope="module")
def tok(work):
    return load_tokenizer(work / "tiny-model")


def spec(**kw) -> FinetuneSpec:
    return FinetuneSpec(**({"base_model": "tiny", "dataset": "big.jsonl"} | kw))


def questions(data) -> tuple[list[str], list[str]]:
    return [r["question"] for r in data.train], [r["question"] for r in data.eval]


def category_of(question: str) -> str:
    return question.split(" ", 1)[0]


# ---- the allocation ----------------------------------------------------------------------------------------

def test_allocation_is_proportional_bounded_and_keeps_every_stratum():
    assert allocate(SIZES, 500) == {"cardiology": 250, "neurology": 150, "pediatrics": 75, "dermatology": 25}
    skewed = allocate({"big": 9_990, "tiny": 3, "one": 1}, 100)
    assert sum(skewed.values()) == 100 and skewed["tiny"] == 1 and skewed["one"] == 1
    assert allocate({"a": 5, "b": 2}, 50) == {"a": 5, "b": 2}                   # never more than there is
    many = allocate({f"s{i}": 10 for i in range(30)}, 12)                    # fewer rows than strata
    assert sum(many.values()) == 12 and max(many.values()) == 1
    picked = stratified_pick(list(range(40)), ["x"] * 30 + ["y"] * 10, 8, seed=1, part="train")
    assert len(picked) == 8 and picked == sorted(picked)
    assert Counter("x" if i < 30 else "y" for i in picked) == {"x": 6, "y": 2}


# ---- the sample -------------------------------------------------------------------------------------------

def test_500_of_3000_rows_stratified_by_the_category_column(work, tok):
    trained, data, trial = prepare_data(spec(sample_rows=500), work / "big.jsonl", tok)
    assert (len(data.train), len(data.eval)) == (475, 25)
    assert trial["rows"] == 500 and trial["of"] == 3000 and (trial["train"], trial["eval"]) == (475, 25)
    assert trial["strata"]["by"] == "column" and trial["strata"]["column"] == "category"
    assert trial["strata"]["groups"] == 4
    train_q, eval_q = questions(data)
    got = Counter(category_of(q) for q in train_q + eval_q)
    for cat, size in SIZES.items():                        # proportional (±1 per part), every category in
        assert abs(got[cat] - 500 * size / 3000) <= 2, (cat, got)
    assert Counter(category_of(q) for q in eval_q).keys() == SIZES.keys()
    assert trial["strata"]["sample"]["dermatology"] == {"picked": got["dermatology"], "of": 150}
    assert set(data.train[0]) == {"prompt", "completion", "question", "reference"}
    assert data.train[0]["completion"].startswith("<think>\n")
    assert trained.max_steps is None and trial["max_steps"] is None        # 475 rows / batch 4: one short epoch
    # Drawn from the full run's own split: the trial never trains on a row the full run holds out.
    full = prepare_data(spec(), work / "big.jsonl", tok)[1]
    full_train, full_eval = questions(full)
    assert set(train_q) <= set(full_train) and set(eval_q) <= set(full_eval)


def test_the_sample_is_the_same_for_the_same_seed_and_another_for_another(work, tok):
    first = questions(prepare_data(spec(sample_rows=500), work / "big.jsonl", tok)[1])
    again = questions(prepare_data(spec(sample_rows=500), work / "big.jsonl", tok)[1])
    other = questions(prepare_data(spec(sample_rows=500, seed=7), work / "big.jsonl", tok)[1])
    assert first == again
    assert set(first[0]) != set(other[0])


def test_without_a_category_column_the_strata_are_answer_length_quantiles(work, tok):
    _, data, trial = prepare_data(spec(sample_rows=300, dataset="plain.jsonl"), work / "plain.jsonl", tok)
    strata = trial["strata"]
    assert strata["by"] == "length" and strata["groups"] == 5 and strata["column"] is None
    assert set(strata["sample"]) == {"q1", "q2", "q3", "q4", "q5"}
    assert all(s["picked"] >= 50 for s in strata["sample"].values())      # 300 / 5 groups, each ~60
    assert len(data.train) + len(data.eval) == 300


def test_repeating_short_answers_are_the_strata(tmp_path, tok):
    rows = [{"instruction": f"Review {i}: is it good?", "output": "positive" if i % 4 else "negative"}
            for i in range(400)]
    path = write_jsonl(tmp_path / "reviews.jsonl", rows)
    _, data, trial = prepare_data(spec(sample_rows=100, dataset="reviews.jsonl"), path, tok)
    assert trial["strata"]["by"] == "answer" and trial["strata"]["groups"] == 2
    answers = Counter(r["reference"] for r in data.train + data.eval)
    assert sum(answers.values()) == 100 and abs(answers["negative"] - 25) <= 1    # train and eval parts round apart


def test_a_data_set_no_bigger_than_the_sample_is_used_whole(work, tok):
    trained, data, trial = prepare_data(spec(sample_rows=500, dataset="small.jsonl"), work / "small.jsonl", tok)
    assert trial == {"rows": 200, "of": 200, "asked": 500, "whole": True}
    assert len(data.train) + len(data.eval) == 200 and trained.max_steps is None
    assert spec_fields(trial) == {}                                          # not a trial: no follow-up offered


def test_the_trial_schedule_is_short_unless_the_user_chose_one(work, tok):
    long = spec(sample_rows=2000)
    trained, _, trial = prepare_data(long, work / "big.jsonl", tok)
    assert trained.max_steps == TRIAL_MAX_STEPS and trial["max_steps"] == TRIAL_MAX_STEPS
    for chosen in ({"epochs": 1.0}, {"epochs": 2}, {"max_steps": 900}):
        trained, _, trial = prepare_data(spec(sample_rows=2000, **chosen), work / "big.jsonl", tok)
        assert trial["max_steps"] is None and trained.max_steps == chosen.get("max_steps")


@pytest.mark.parametrize("bad", [0, 9, 1_000_001, "lots"])
def test_sample_rows_is_bounded(bad):
    with pytest.raises(ValidationError) as err:
        spec(sample_rows=bad)
    assert "sample_rows" in str(err.value)


# ---- the launch and the status -----------------------------------------------------------------------------

def tool(capsys, name: str, args: dict, user: str = "alice") -> tuple[int, dict]:
    code = main(["tool", name, "--args", json.dumps(args), "--json", "--user", user])
    return code, json.loads(capsys.readouterr().out)


def test_a_trial_launch_records_the_trial_and_its_status_says_so(capsys, work, stackwise_home, monkeypatch):
    monkeypatch.chdir(work)
    args = {"base_model": "./tiny-model", "dataset": "big.jsonl", "lora_rank": 8, "sample_rows": 500}
    shown = ToolRegistry.default(plugins=False).preflight("launch_finetune", args,
                                                         ToolContext(home=stackwise_home, user_id="alice"))
    assert "500 rows (475 train, 25 eval)" in shown["data"]
    [note] = [w for w in shown["warnings"] if w.startswith("Trial run")]
    assert "500 of 3,000 rows" in note and "'category' column" in note and "run the full job" in note
    zh = ToolRegistry.default(plugins=False).preflight("launch_finetune", args,
                                                      ToolContext(home=stackwise_home, user_id="alice", lang="zh"))
    assert any("试跑：从 3,000 行中抽样 500 行" in w for w in zh["warnings"])

    code, record = tool(capsys, "launch_finetune", args)
    assert code == 0 and record["ok"], record
    result = record["result"]
    assert (result["train_rows"], result["eval_rows"]) == (475, 25)
    run = RunPaths(Path(result["run_dir"]))
    saved = json.loads(run.spec.read_text(encoding="utf-8"))
    assert saved["sample_rows"] == 500 and saved["trial"]["rows"] == 500 and saved["trial"]["of"] == 3000
    assert saved["trial"]["strata"] == {"by": "column", "column": "category", "groups": 4}
    trained, extras = load_spec(run)                       # the training entry point still reads it
    assert trained.sample_rows == 500 and extras["trial"]["of"] == 3000
    assert len(run.train_data.read_text(encoding="utf-8").splitlines()) == 475
    with JobStore.for_home(stackwise_home) as store:
        job = store.get(result["job_id"], owner="alice")
        assert job.spec["trial"]["rows"] == 500 and job.preflight["trial"]["of"] == 3000

    code, record = tool(capsys, "finetune_status", {"job_id": result["job_id"]})
    assert record["result"]["trial"]["of"] == 3000
    text = ToolRegistry.default(plugins=False).get("finetune_status").render(record["result"], "en")
    assert "This is a trial on 500 of 3,000 rows" in text and "run the full job" not in text   # not done yet

    with JobStore.for_home(stackwise_home) as store:
        store.claim("w1")
        store.finish(result["job_id"], "succeeded", summary={"status": "succeeded", "steps": 119, "final_loss": 1.1})
    code, record = tool(capsys, "finetune_status", {"job_id": result["job_id"]})
    done = record["result"]
    text = status_text(done, "en")
    assert "This was a trial on 500 of 3,000 rows" in text
    assert 'Say "run the full job" to launch the same spec on all 3,000 rows.' in text and '"yes"' not in text
    assert '(or "yes")' in status_text(done, "en", announcing=True)
    assert "说“跑完整的”（或回复“是”）" in status_text(done, "zh", announcing=True)


def test_a_normal_launch_has_no_trial(capsys, work, stackwise_home, monkeypatch):
    monkeypatch.chdir(work)
    code, record = tool(capsys, "launch_finetune", {"base_model": "./tiny-model", "dataset": "small.jsonl"})
    assert code == 0, record
    saved = json.loads(RunPaths(Path(record["result"]["run_dir"])).spec.read_text(encoding="utf-8"))
    assert "trial" not in saved and saved["sample_rows"] is None
    code, record = tool(capsys, "launch_finetune", {"base_model": "./tiny-model", "dataset": "small.jsonl",
                                                    "sample_rows": 500})
    assert code == 0, record
    assert any(w["code"] == "trial_whole_dataset" for w in record["result"]["preflight"]["warnings"])
    saved = json.loads(RunPaths(Path(record["result"]["run_dir"])).spec.read_text(encoding="utf-8"))
    assert "trial" not in saved and record["result"]["train_rows"] + record["result"]["eval_rows"] == 200

