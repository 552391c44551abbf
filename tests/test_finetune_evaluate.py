"""The held-out evaluation after training (tools/finetune/evaluate.py, eval_metrics.py, eval_text.py): the metric
functions against hand-computed values (English and Chinese), the completion-only loss against transformers' own,
the bounds, tiny LoRA and full runs on CPU that write ``evaluation`` into summary.json, and the numbers in
``finetune_status`` and the end-of-job announcement, in English and Chinese."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")
pytest.importorskip("peft")

import tools.finetune.evaluate as evaluate  # noqa: E402
from tools.finetune.eval_metrics import (  # noqa: E402
    answer_tokens,
    exact_match,
    is_short,
    normalize,
    opens_think,
    perplexity,
    split_think,
    token_f1,
)
from tools.finetune.evaluate import HeldOutEvaluation, completion_loss, encode_row  # noqa: E402
from tools.finetune.train import run  # noqa: E402
from tools.finetune.train_progress import CancelFlag  # noqa: E402

# peft 0.21 still calls transformers' renamed ``is_gradient_checkpointing`` when loading an adapter.
pytestmark = pytest.mark.filterwarnings("ignore:.*is deprecated and will be removed in v6:FutureWarning")
WORDS = ("red", "blue", "green", "cat", "dog", "sun")
PHASE_KEYS = {"loss", "perplexity", "format_ok", "exact_match", "f1"}


@pytest.fixture(scope="module")
def tok(tiny):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny)


def cot_row(tok, i: int) -> dict[str, str]:
    """A chain-of-thought row as data.py renders it: ``<think>\\n…\\n</think>\\n\\n`` + answer + EOS."""
    word = WORDS[i % len(WORDS)]
    question = f"Say {word} twice."
    prompt = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                     add_generation_prompt=True)
    return {"prompt": prompt, "completion": f"<think>\n{word}\n</think>\n\n{word} {word}{tok.eos_token}",
            "question": question, "reference": f"{word} {word}"}


def make_run(root: Path, model: Path, tok, *, train: int = 12, held_out: int = 6, **spec) -> Path:
    """A run directory per the contract; the held-out rows repeat training rows, so a run can memorise them."""
    run_dir = root / "run"
    (run_dir / "data").mkdir(parents=True)
    (run_dir / "data" / "train.jsonl").write_text("".join(json.dumps(cot_row(tok, i)) + "\n" for i in range(train)))
    if held_out:
        (run_dir / "data" / "eval.jsonl").write_text(
            "".join(json.dumps(cot_row(tok, i)) + "\n" for i in range(held_out)))
    fields = {"base_model": "tiny-llama", "dataset": "pattern.jsonl", "method": "lora", "lora_rank": 8,
              "learning_rate": 5e-3, "batch_size": 4, "max_seq_len": 128, "seed": 7, **spec}
    (run_dir / "spec.json").write_text(json.dumps({**fields, "base_model_path": str(model), "job_id": "ft-1"}))
    return run_dir


def evaluation_of(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "succeeded", summary
    return summary["evaluation"]


# ---- metrics -------------------------------------------------------------------------------------------

def test_answer_metrics_match_hand_computed_values_in_english_and_chinese():
    assert normalize("  Ｈｅｌｌｏ,   WORLD!! ") == "hello world"
    assert answer_tokens("Vitamin C, 维生素！") == ["vitamin", "c", "维", "生", "素"]
    assert answer_tokens("血压 140/90 mmHg。") == ["血", "压", "140", "90", "mmhg"]

    assert exact_match("Red red.", "  red RED") == 1.0
    assert exact_match("red", "red red") == 0.0
    assert exact_match("多饮、多食。", "多饮多食") == 1.0
    assert exact_match("维生素C缺乏", "缺乏维生素 C") == 0.0            # same characters, another order

    # the cat sat | the cat sat on the mat: 3 shared of 3 predicted and 6 wanted → P 1, R 1/2, F1 2/3
    assert token_f1("the cat sat", "The cat sat on the mat.") == pytest.approx(2 / 3)
    # 多 饮 多 食 | 多 饮 多 食 和 多 尿: 多 twice, 饮, 食 → 4 shared; P 4/4, R 4/7, F1 = 2·(4/7)/(11/7) = 8/11
    assert token_f1("多饮、多食", "多饮多食和多尿") == pytest.approx(8 / 11)
    assert token_f1("维生素C缺乏", "缺乏维生素 C") == 1.0                  # order does not matter for F1
    # blue blue dog | blue cat: blue once shared → P 1/3, R 1/2, F1 = 2·(1/6)/(5/6) = 2/5
    assert token_f1("blue blue dog", "blue cat") == pytest.approx(0.4)
    assert token_f1("cat dog", "fish") == 0.0 and token_f1("", "") == 1.0 and token_f1("cat", "...") == 0.0

    assert is_short(" ".join(["w"] * 32)) and not is_short(" ".join(["w"] * 33))
    assert is_short("病" * 32) and not is_short("病" * 33)
    assert not is_short("") and not is_short("！？")

    assert perplexity(2.0) == pytest.approx(math.exp(2.0)) and perplexity(0.0) == 1.0
    assert perplexity(None) is None and perplexity(float("nan")) is None and perplexity(800.0) is None


def test_the_think_format_is_a_closed_block_then_a_non_empty_answer():
    assert split_think("<think>\nscurvy\n</think>\n\nVitamin C") == (True, "Vitamin C")
    assert split_think("  <think></think>答案：少盐") == (True, "答案：少盐")
    assert split_think("<think>\nhmm\n</think>\n\n") == (False, "")                       # no answer
    assert split_think("<think>\nstill thinking, cut off") == (False, "")                   # never closed
    assert split_think("Vitamin C") == (False, "Vitamin C")                                 # no reasoning
    assert split_think("so </think> Vitamin C") == (False, "Vitamin C")
    assert split_think("<think>a</think>b<think>c</think>d") == (False, "d")                # two blocks
    # DeepSeek-R1 distills' templates open the block in the prompt: the answer starts inside it
    prompt = "<｜User｜>Which vitamin?<｜Assistant｜><think>\n"
    assert opens_think(prompt) and not opens_think("<|assistant|>\n")
    assert split_think("scurvy\n</think>\n\nVitamin C", opened=True) == (True, "Vitamin C")
    assert split_think("Vitamin C", opened=True) == (False, "")


# ---- the loss and the measurements on a tiny model ----------------------------------------------------

def test_loss_counts_only_completion_tokens_like_transformers(tiny, tok):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny).eval()
    rows = [cot_row(tok, 0), {**cot_row(tok, 1), "completion": "<think>\n多饮\n</think>\n\n多饮、多食和多尿。</s>"}]
    encoded = [encode_row(tok, r, 128) for r in rows]
    for (ids, start), row in zip(encoded, rows, strict=True):
        assert ids == tok(text=row["prompt"] + row["completion"])["input_ids"]
        assert start == len(tok(text=row["prompt"])["input_ids"])          # the completion starts after the prompt
    with torch.no_grad():
        total, count = completion_loss(model, tok, encoded)                # one padded batch of two lengths
        nll, tokens = 0.0, 0
        for ids, start in encoded:                                         # transformers' loss, one row at a time
            labels = torch.tensor([ids])
            labels[0, :start] = -100
            n = len(ids) - start
            nll += float(model(input_ids=torch.tensor([ids]), labels=labels).loss) * n
            tokens += n
    assert count == tokens and total / count == pytest.approx(nll / tokens, rel=1e-5)

    prompt_len = len(tok(text=rows[0]["prompt"])["input_ids"])
    assert encode_row(tok, rows[0], prompt_len) is None                   # no completion token left
    ids, start = encode_row(tok, rows[0], prompt_len + 3)
    assert len(ids) - start == 3                                           # cut to max_len like training

    result = HeldOutEvaluation(rows, max_seq_len=128, batch_size=4).result(model, tok)
    assert result["rows"] == 2 and result["answers"] == 2 and result["short"] == 2
    assert result["before"] is None and any("before: not measured" in n for n in result["notes"])
    after = result["after"]
    assert set(after) == PHASE_KEYS
    assert after["loss"] == pytest.approx(nll / tokens, abs=1e-4)
    assert after["perplexity"] == pytest.approx(math.exp(after["loss"]), rel=1e-3)
    assert after["format_ok"] == 0.0 and after["exact_match"] == 0.0           # random weights
    assert any(f"mean over the {tokens} completion tokens of 2 of 2 held-out rows" in n for n in result["notes"])


def test_rows_answers_and_time_are_bounded_and_both_sides_cover_the_same_rows(tiny, tok, monkeypatch):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny)
    rows = [cot_row(tok, i) for i in range(9)]
    monkeypatch.setattr(evaluate, "MAX_LOSS_ROWS", 5)
    monkeypatch.setattr(evaluate, "MAX_GEN_ROWS", 3)
    capped = HeldOutEvaluation(rows, max_seq_len=128, batch_size=2).result(model, tok)
    assert (capped["rows"], capped["answers"]) == (5, 3)
    assert any("of 5 of 9 held-out rows (capped at 5)" in n for n in capped["notes"])
    assert any("greedy, 3 prompts (at most 3)" in n for n in capped["notes"])

    monkeypatch.setattr(evaluate, "GEN_BATCH", 2)
    timed = HeldOutEvaluation(rows, max_seq_len=128, batch_size=2, budget_s={"loss": 0.0, "answers": 0.0})
    timed.measure_base(model, tok)                     # over budget after the first batch of each part
    result = timed.result(model, tok)                  # the second measurement repeats exactly those rows
    assert (result["rows"], result["answers"]) == (2, 2)
    assert result["before"] == result["after"]         # the same weights on the same rows
    assert any("loss: time budget of 0 s reached after 2 rows" in n for n in result["notes"])
    assert any("answers: time budget of 0 s reached after 2 prompts" in n for n in result["notes"])


def test_long_references_and_plain_answers_are_not_applicable(tiny, tok):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny)
    long_answer = " ".join(["word"] * 40)
    rows = [{**cot_row(tok, i), "completion": long_answer + tok.eos_token, "reference": long_answer} for i in range(3)]
    result = HeldOutEvaluation(rows, max_seq_len=128, batch_size=4).result(model, tok)
    assert result["after"]["format_ok"] is None and result["after"]["exact_match"] is None
    assert result["after"]["f1"] is None and result["after"]["loss"] is not None
    assert any("format: not applicable" in n for n in result["notes"])
    assert any("exact match / F1: not applicable" in n for n in result["notes"])

    none = HeldOutEvaluation([], max_seq_len=128, batch_size=4).result(model, tok)
    assert none["rows"] == 0 and none["before"] is None and none["after"] is None
    assert none["notes"][0].startswith("no held-out rows")


# ---- in a training run -------------------------------------------------------------------------------

def test_a_lora_run_reports_before_and_after_in_the_summary(tiny, tok, tmp_path):
    run_dir = make_run(tmp_path, tiny, tok, max_steps=30)
    outcome = run(run_dir)
    assert outcome.code == 0, outcome.summary
    ev = evaluation_of(run_dir)
    assert ev["rows"] == 6 and ev["answers"] == 6 and ev["short"] == 6 and ev["max_new_tokens"] >= 32
    assert set(ev["before"]) == set(ev["after"]) == PHASE_KEYS
    assert ev["after"]["loss"] < ev["before"]["loss"]
    for side in (ev["before"], ev["after"]):
        assert side["perplexity"] == pytest.approx(math.exp(side["loss"]), rel=1e-3)
        assert all(0.0 <= side[k] <= 1.0 for k in ("format_ok", "exact_match", "f1"))
    # "before" is the base model: the adapter switched off gives the untrained weights' loss
    from transformers import AutoModelForCausalLM

    base = HeldOutEvaluation([cot_row(tok, i) for i in range(6)], max_seq_len=128, batch_size=4)
    untrained = base.result(AutoModelForCausalLM.from_pretrained(tiny), tok)["after"]
    assert untrained == {**ev["before"], "loss": pytest.approx(ev["before"]["loss"], abs=2e-4),
                         "perplexity": pytest.approx(ev["before"]["perplexity"], rel=1e-3)}


def test_a_full_run_that_memorises_a_tiny_set_measures_the_base_first_and_improves(tiny, tok, tmp_path):
    run_dir = make_run(tmp_path, tiny, tok, method="full", max_steps=80, learning_rate=3e-3)
    outcome = run(run_dir)
    assert outcome.code == 0, outcome.summary
    ev = evaluation_of(run_dir)
    before, after = ev["before"], ev["after"]
    assert before["loss"] > 5 and after["loss"] < before["loss"] / 3       # memorised: 6.3 → about 0.5
    assert after["perplexity"] < before["perplexity"] / 10
    assert before["format_ok"] == 0.0 and after["format_ok"] >= 0.5         # random weights never close a block
    assert after["exact_match"] > before["exact_match"] and after["f1"] > before["f1"]
    assert not any("not measured" in n or "failed" in n for n in ev["notes"])


def test_a_run_without_held_out_rows_says_so_and_succeeds(tiny, tok, tmp_path):
    run_dir = make_run(tmp_path, tiny, tok, held_out=0, max_steps=2)
    assert run(run_dir).code == 0
    ev = evaluation_of(run_dir)
    assert ev["rows"] == 0 and ev["before"] is None and ev["after"] is None
    assert "no held-out rows" in ev["notes"][0]


@pytest.mark.parametrize("where", ["measurement", "report"])
def test_an_evaluation_that_raises_leaves_a_note_and_the_job_succeeds(tiny, tok, tmp_path, monkeypatch, where):
    def boom(*args, **kwargs):
        raise RuntimeError("evaluation exploded")

    if where == "measurement":     # fails in the model part: both measurements note it
        monkeypatch.setattr(evaluate, "completion_loss", boom)
    else:                          # a bug outside the guarded measurements
        monkeypatch.setattr(HeldOutEvaluation, "_report", boom)
    run_dir = make_run(tmp_path, tiny, tok, max_steps=2)
    outcome = run(run_dir)
    assert outcome.code == 0, outcome.summary
    ev = evaluation_of(run_dir)
    assert ev["after"] is None
    assert any("failed: RuntimeError: evaluation exploded" in n for n in ev["notes"])
    assert (run_dir / "adapter" / "adapter_config.json").exists()
    log = (run_dir / "train.log").read_text()
    assert "Traceback (most recent call last)" in log and "evaluation exploded" in log


def test_a_cancel_during_the_evaluation_stops_it_and_cancels_the_job(tiny, tok, tmp_path, monkeypatch):
    cancel = CancelFlag()
    measured = []

    def cancelling_loss(*args, **kwargs):
        cancel.set()                                   # SIGTERM arrives during the first batch
        measured.append(1)
        return completion_loss(*args, **kwargs)

    monkeypatch.setattr(evaluate, "completion_loss", cancelling_loss)
    run_dir = make_run(tmp_path, tiny, tok, max_steps=2)
    outcome = run(run_dir, cancel=cancel)
    assert outcome.code == 3
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "cancelled" and summary["steps"] == 2
    assert len(measured) == 1                          # it stopped at the next batch
    assert any("stopped, the job was cancelled" in n for n in summary["evaluation"]["notes"])


# ---- shown to the user ---------------------------------------------------------------------------------

EVALUATION = {"rows": 200, "answers": 32, "short": 10, "max_new_tokens": 512,
              "before": {"loss": 2.3104, "perplexity": 10.078, "format_ok": 0.125, "exact_match": 0.0, "f1": 0.1234},
              "after": {"loss": 1.7213, "perplexity": 5.592, "format_ok": 0.9375, "exact_match": 0.4, "f1": 0.5512},
              "notes": ["loss: …"]}


def finished_job(home: Path, evaluation: dict, lang: str = "en"):
    from memory.jobs import JobStore

    store = JobStore.for_home(home)
    run_dir = home / "jobs" / "alice" / "ft-1"
    run_dir.mkdir(parents=True)
    job = store.create("alice", {"base_model": "tiny", "dataset": "d.jsonl", "method": "lora"}, {}, run_dir,
                       origin={"channel": "telegram", "thread_id": "t1", "lang": lang})
    store.claim("w-test")
    store.finish(job.id, "succeeded", summary={"status": "succeeded", "steps": 30, "final_loss": 1.5,
                                               "evaluation": evaluation})
    return store, job.id


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_status_and_the_announcement_show_the_evaluation(stackwise_home, lang):
    from agent.jobs import JobsService
    from agent.settings import Settings
    from tools.base import ToolContext
    from tools.finetune.status import job_status, status_text

    store, job_id = finished_job(stackwise_home, EVALUATION, lang)
    try:
        ctx = ToolContext(home=stackwise_home, user_id="alice", lang=lang, extras={"jobs": store})
        result = job_status(job_id, ctx)
        assert result["summary"]["evaluation"] == EVALUATION
        text = status_text(result, lang)
        service = JobsService(Settings.from_env({"STACKWISE_HOME": str(stackwise_home)}), store=store)
        notice = service.notice(store.get(job_id, owner="alice"))
    finally:
        store.close()
    if lang == "en":
        line = ("Held-out evaluation (200 rows, 32 answers): loss 2.31 → 1.72 (perplexity 10.1 → 5.59), "
                "<think> format 12% → 94%, exact match 0% → 40%, token F1 0.12 → 0.55.")
        assert f"{job_id} succeeded: 30 steps, final loss 1.5." in text and line in text.splitlines()
    else:
        line = ("留出集评估（200 行，生成 32 条回答）：loss 2.31 → 1.72（困惑度 10.1 → 5.59），<think> 格式 12% → 94%，"
                "精确匹配 0% → 40%，词重叠 F1 0.12 → 0.55。")
        assert f"{job_id} 已完成：30 步，最终 loss 1.5。" in text and line in text.splitlines()
    assert line in notice["text"] and notice["text"].startswith("🔔")


@pytest.mark.parametrize(("evaluation", "en", "zh"), [
    ({**EVALUATION, "before": None, "short": 0,
      "after": {**EVALUATION["after"], "exact_match": None, "f1": None}},
     "Held-out evaluation (200 rows, 32 answers): loss 1.72 (perplexity 5.59), <think> format 94%, "
     "exact match / F1 not applicable (long references).",
     "留出集评估（200 行，生成 32 条回答）：loss 1.72（困惑度 5.59），<think> 格式 94%，"
     "参考答案较长，不计算精确匹配 / F1。"),
    ({"rows": 0, "answers": 0, "short": 0, "before": None, "after": None,
      "notes": ["no held-out rows (the data set has fewer than 10 rows, or eval_fraction is 0): nothing to evaluate"]},
     "No held-out evaluation: the data set has no held-out rows.",
     "没有留出集（数据少于 10 行，或 eval_fraction 为 0），未做评估。"),
    ({"rows": 6, "answers": 0, "before": None, "after": None,
      "notes": ["evaluation after training failed: RuntimeError: CUDA error"]},
     "Held-out evaluation: no result (evaluation after training failed: RuntimeError: CUDA error).",
     "留出集评估没有结果：evaluation after training failed: RuntimeError: CUDA error"),
])
def test_evaluation_lines_without_some_numbers(evaluation, en, zh):
    from tools.finetune.status import status_text

    result = {"job_id": "ft-3", "status": "succeeded", "summary": {"steps": 4, "evaluation": evaluation}}
    assert status_text(result, "en").splitlines()[1] == en
    assert status_text(result, "zh").splitlines()[1] == zh
