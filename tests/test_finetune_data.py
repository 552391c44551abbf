"""Fine-tune data sets: every format in every container, rendering per the contract, errors that name the
line and field, and the preflight numbers (token stats, steps, parameters, VRAM, time, warnings)."""

from __future__ import annotations

import csv
import json
import math
import random
import time
import warnings
from pathlib import Path

import pytest
from shapes import QWEN_05B, QWEN_7B

from tools.base import ToolError
from tools.finetune import data as ftdata
from tools.finetune.data import load_examples, load_tokenizer, prepare_dataset, render_dataset, split_indices
from tools.finetune.preflight import GIB, count_params, estimate_vram, preflight, tokens_per_second
from tools.finetune.spec import FinetuneSpec
from tools.finetune.tiny import CHAT_TEMPLATE

FIXTURE = Path(__file__).parent / "fixtures" / "finetune" / "medical_cot.jsonl"
COT_ROWS = [json.loads(line) for line in FIXTURE.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def tok(tiny):
    return load_tokenizer(tiny)


def spec(**kw) -> FinetuneSpec:
    return FinetuneSpec(base_model="tiny", dataset="data.jsonl", **kw)


# ---- writing the same rows in every container --------------------------------------------------------------

def write(rows: list[dict], path: Path) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    elif path.suffix == ".json":
        path.write_text(json.dumps({"data": rows} if "wrapped" in path.name else rows, ensure_ascii=False),
                        encoding="utf-8")
    elif path.suffix == ".csv":
        with path.open("w", encoding="utf-8", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows({k: json.dumps(v, ensure_ascii=False) if isinstance(v, list) else v
                              for k, v in r.items()} for r in rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def as_format(fmt: str, rows: list[dict]) -> list[dict]:
    """The fixture's CoT rows re-shaped into another row format."""
    out = []
    for r in rows:
        q, c, a = r["Question"], r["Complex_CoT"], r["Response"]
        out.append({
            "cot": r,
            "cot_lower": {"question": q, "reasoning": c, "answer": a},
            "chat": {"messages": [{"role": "system", "content": "You are a doctor."},
                                  {"role": "user", "content": q}, {"role": "assistant", "content": a}]},
            "sharegpt": {"system": "You are a doctor.",
                         "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]},
            "alpaca": {"instruction": q, "input": "Answer briefly.", "output": a},
        }[fmt])
    return out


@pytest.mark.parametrize("container", ["jsonl", "json", "wrapped.json", "csv", "parquet"])
@pytest.mark.parametrize("fmt", ["cot", "cot_lower", "chat", "sharegpt", "alpaca"])
def test_every_format_in_every_container(fmt, container, tmp_path, tok):
    path = write(as_format(fmt, COT_ROWS), tmp_path / f"data.{container}")
    data = render_dataset(spec(), path, tok)
    assert data.format == fmt.split("_")[0].replace("sharegpt", "chat")
    assert (len(data.train), len(data.eval)) == (28, 2)          # round(30 × 0.05) = 2 held out
    row = next(r for r in data.train if r["question"].startswith(COT_ROWS[0]["Question"]))
    first = COT_ROWS[0]
    assert row["completion"].endswith("</s>") and row["reference"] == first["Response"]
    assert row["prompt"].startswith("<s>") and row["prompt"].endswith("<|assistant|>\n")
    if fmt.startswith("cot"):
        assert row["completion"] == f"<think>\n{first['Complex_CoT']}\n</think>\n\n{first['Response']}</s>"
    else:
        assert "<think>" not in row["completion"] and row["completion"] == first["Response"] + "</s>"
    if fmt in ("chat", "sharegpt"):
        assert row["prompt"].startswith("<s><|system|>\nYou are a doctor.<|end|>\n<|user|>\n")
    if fmt == "alpaca":
        assert row["question"] == f"{first['Question']}\n\nAnswer briefly."


def test_prompt_is_the_models_chat_template(tmp_path, tok):
    data = render_dataset(spec(eval_fraction=0), FIXTURE, tok)
    chinese = next(r for r in data.train if r["question"].startswith("一名45岁"))
    expected = tok.apply_chat_template([{"role": "user", "content": chinese["question"]}], tokenize=False,
                                       add_generation_prompt=True)
    assert chinese["prompt"] == expected == f"<s><|user|>\n{chinese['question']}<|end|>\n<|assistant|>\n"
    assert chinese["completion"].startswith("<think>\n饮酒后") and chinese["completion"].endswith("急性胰腺炎。</s>")


def test_multi_turn_chat_prompt_holds_every_turn_before_the_last_answer(tmp_path, tok):
    turns = [{"role": "user", "content": "I have a headache."}, {"role": "assistant", "content": "Since when?"},
             {"role": "user", "content": "Two days."}, {"role": "assistant", "content": "Take paracetamol."},
             {"role": "user", "content": "Thanks!"}]
    row = render_dataset(spec(), write([{"messages": turns}], tmp_path / "chat.jsonl"), tok).train[0]
    assert row["prompt"] == tok.apply_chat_template(turns[:3], tokenize=False, add_generation_prompt=True)
    assert row["completion"] == "Take paracetamol.</s>"
    assert (row["question"], row["reference"]) == ("Two days.", "Take paracetamol.")


def test_without_a_chat_template_the_plain_layout_is_used(tmp_path, tiny):
    path = write(COT_ROWS[:2], tmp_path / "d.jsonl")
    bare = load_tokenizer(tiny)
    bare.chat_template = None
    data = render_dataset(spec(), path, bare)
    assert data.train[0]["prompt"] == f"### User:\n{COT_ROWS[0]['Question']}\n\n### Assistant:\n"
    assert data.train[0]["completion"].endswith("</s>") and data.notices
    assert not render_dataset(spec(), path, None).train[0]["completion"].endswith("</s>")   # no tokenizer: no EOS


def test_a_template_that_opens_the_think_block_is_not_doubled(tmp_path, tiny):
    r1 = load_tokenizer(tiny)
    r1.chat_template = CHAT_TEMPLATE.replace("<|assistant|>\n{% endif %}", "<|assistant|>\n<think>\n{% endif %}")
    row = render_dataset(spec(), write(COT_ROWS[:1], tmp_path / "d.jsonl"), r1).train[0]
    assert row["prompt"].endswith("<think>\n")
    assert row["completion"] == f"{COT_ROWS[0]['Complex_CoT']}\n</think>\n\n{COT_ROWS[0]['Response']}</s>"


def test_prepare_writes_contract_rows(tmp_path, tok):
    stats = prepare_dataset(spec(seed=7), FIXTURE, tok, tmp_path / "run" / "data")
    train = [json.loads(x) for x in (tmp_path / "run/data/train.jsonl").read_text(encoding="utf-8").splitlines()]
    held = [json.loads(x) for x in (tmp_path / "run/data/eval.jsonl").read_text(encoding="utf-8").splitlines()]
    assert (stats["rows"], stats["train_rows"], stats["eval_rows"], stats["format"]) == (30, 28, 2, "cot")
    assert len(train) == 28 and len(held) == 2
    assert all(set(r) == {"prompt", "completion", "question", "reference"} for r in train + held)
    assert {r["question"] for r in train}.isdisjoint(r["question"] for r in held)


def test_split_is_seeded_and_bounded():
    assert split_indices(9, 0.05, 1) == (list(range(9)), [])                 # < 10 rows: nothing held out
    train, held = split_indices(10, 0.05, 1)
    assert len(held) == 1 and len(train) == 9                                  # ≥ 10 rows: at least one
    assert split_indices(100, 0.2, 3) == split_indices(100, 0.2, 3) != split_indices(100, 0.2, 4)
    assert len(split_indices(100, 0.2, 3)[1]) == 20 and split_indices(100, 0.0, 3)[1] == []


# ---- errors name the file, the place and the field --------------------------------------------------------

def error_of(path: Path, **kw) -> str:
    with pytest.raises(ToolError) as info:
        load_examples(path, kw.get("data_format", "auto"))
    return info.value.message


def test_malformed_jsonl_names_the_line(tmp_path):
    lines = [json.dumps(r, ensure_ascii=False) for r in COT_ROWS[:8]]
    lines[6] = lines[6][:-1] + ', "x" 1}'
    (tmp_path / "data.jsonl").write_text("\n".join(lines), encoding="utf-8")
    assert error_of(tmp_path / "data.jsonl").startswith("data.jsonl line 7: not valid JSON (Expecting ':' delimiter")


@pytest.mark.parametrize(("row", "expected"), [
    ({"Question": "q", "Complex_CoT": "c"},
     "line 3: missing field 'Response' (chain-of-thought rows need Question, Complex_CoT, Response)"),
    ({"Question": "q", "Complex_CoT": "c", "Response": 42}, "line 3: field 'Response' must be text, not a number"),
    ({"Question": "q", "Complex_CoT": "  ", "Response": "r"}, "line 3: field 'Complex_CoT' is empty"),
    ({"Question": None, "Complex_CoT": "c", "Response": "r"}, "line 3: field 'Question' is empty (null)"),
    ({"instruction": "i", "output": "o"}, "line 3: this row has alpaca fields, but line 1 has chain-of-thought rows"),
    ([1, 2], "line 3: expected an object with named fields, not a list"),
])
def test_bad_rows_name_the_line_and_field(tmp_path, row, expected):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [*COT_ROWS[:2], row]), encoding="utf-8")
    assert expected in error_of(path)


def test_lower_case_rows_are_told_the_lower_case_names(tmp_path):
    path = write([{"question": "q", "cot": "c", "answer": "a"}, {"question": "q", "cot": "c"}], tmp_path / "d.jsonl")
    assert "line 2: missing field 'response'" in error_of(path)


@pytest.mark.parametrize(("turns", "expected"), [
    ([{"role": "user", "content": "hi"}], "has no assistant turn"),
    ([{"role": "assistant", "content": "hi"}], "no user turn before the last assistant turn"),
    ([{"role": "doctor", "content": "hi"}], "messages[1]: unknown role 'doctor'"),
    ([{"role": "user", "content": ""}, {"role": "assistant", "content": "a"}], "messages[1]: the user turn is empty"),
    ("not a list", "not valid JSON"),
])
def test_bad_chat_rows(tmp_path, turns, expected):
    assert expected in error_of(write([{"messages": turns}], tmp_path / "chat.jsonl"))


def test_csv_errors_use_spreadsheet_rows(tmp_path):
    rows = [dict(r) for r in COT_ROWS[:4]]
    rows[2]["Response"] = ""
    assert error_of(write(rows, tmp_path / "d.csv")).startswith("d.csv row 4: field 'Response' is empty")


def test_parquet_and_json_places(tmp_path):
    rows = [dict(r) for r in COT_ROWS[:3]]
    rows[1]["Response"] = None
    assert error_of(write(rows, tmp_path / "d.parquet")).startswith("d.parquet row 2: field 'Response' is empty")
    assert error_of(write(rows, tmp_path / "d.json")).startswith("d.json item 2: field 'Response' is empty")


@pytest.mark.parametrize(("content", "expected"), [
    ("", "data.jsonl is empty"), ("\n  \n", "data.jsonl is empty"), ("[]", "has no rows"),
    ('{"foo": 1}\n', "can't tell the row format from its fields (foo)"),
])
def test_empty_and_unknown(tmp_path, content, expected):
    (tmp_path / "data.jsonl").write_text(content, encoding="utf-8")
    if content == "[]":
        (tmp_path / "data.jsonl").rename(tmp_path / "data.json")
        assert expected in error_of(tmp_path / "data.json")
    else:
        assert expected in error_of(tmp_path / "data.jsonl")


def test_jsonl_saved_as_json_and_a_gb18030_csv(tmp_path, tok):
    jsonl_named_json = write(COT_ROWS, tmp_path / "d.jsonl").rename(tmp_path / "d.json")
    assert render_dataset(spec(), jsonl_named_json, tok).container == "jsonl"
    with (tmp_path / "gbk.csv").open("w", encoding="gb18030", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["Question", "Complex_CoT", "Response"])
        writer.writeheader()
        writer.writerows(COT_ROWS)
    data = render_dataset(spec(eval_fraction=0), tmp_path / "gbk.csv", tok)
    assert data.train[-1]["reference"] == COT_ROWS[-1]["Response"] and "抗凝" in data.train[-1]["completion"]


def test_named_format_must_match(tmp_path):
    path = write(COT_ROWS[:2], tmp_path / "d.jsonl")
    assert "this row has chain-of-thought fields, but data_format asks for chat rows" in \
        error_of(path, data_format="chat")
    assert "missing field 'instruction'" in error_of(write([{"foo": "x"}], tmp_path / "e.jsonl"), data_format="alpaca")


def test_size_and_row_limits(tmp_path, monkeypatch):
    (tmp_path / "d.txt").write_text("Question: what is it?\n", encoding="utf-8")
    assert "I read JSONL, JSON, CSV or Parquet" in error_of(tmp_path / "d.txt")
    path = write(COT_ROWS, tmp_path / "d.jsonl")
    monkeypatch.setattr(ftdata, "MAX_ROWS", 10)
    assert "more than 10 rows" in error_of(path)
    monkeypatch.setattr(ftdata, "MAX_FILE_BYTES", 100)
    with pytest.raises(ToolError) as info:
        load_examples(path)
    assert info.value.type == "too_large"


def test_load_tokenizer_only_for_local_dirs(tmp_path, tiny):
    assert load_tokenizer("Qwen/Qwen2.5-0.5B") is None
    assert load_tokenizer(tmp_path) is None
    assert load_tokenizer(tiny).eos_token == "</s>"


# ---- preflight ---------------------------------------------------------------------------------------------

def test_preflight_token_stats_and_steps_on_a_known_set(tok):
    # estimate mode: 1 token per CJK character, 1 per 4 other characters
    lengths = [8, 12, 16, 20, 24, 28, 32, 36, 40, 400, 44]
    train = [{"prompt": "ab" * n, "completion": "abcd" * (n // 2)} for n in lengths]   # 2n + 2n chars → n tokens
    held = [{"prompt": "病" * 5, "completion": "痛" * 5}]
    result = preflight(spec(max_seq_len=32, batch_size=2, grad_accum=2, epochs=2), {"train": train, "eval": held},
                       None, None, None)
    stats = result["tokens"]
    assert stats["method"] == "estimate" and result["rows"] == {"train": 11, "eval": 1, "total": 12}
    assert (stats["min"], stats["max"], stats["median"]) == (8, 400, 24)
    assert result["rows_cut"] == 4                                   # 36, 40, 400, 44 > 32
    assert stats["tokens_per_epoch"] == sum(min(n, 32) for n in lengths)
    assert result["training"]["steps_per_epoch"] == 3                # ceil(ceil(11 / 2) / 2)
    assert result["training"]["total_steps"] == 6
    codes = {w["code"] for w in result["warnings"]}
    assert {"tiny_dataset", "rows_cut"} <= codes and result["ok"]


def test_preflight_with_the_tokenizer_counts_real_tokens(tiny, tok):
    cfg = json.loads((tiny / "config.json").read_text())
    result = preflight(spec(max_seq_len=128), FIXTURE, tok, cfg, None)
    rows = render_dataset(spec(), FIXTURE, tok)
    real = [len(tok(r["prompt"] + r["completion"], add_special_tokens=False)["input_ids"])
            for r in rows.train + rows.eval]
    assert result["tokens"]["method"] == "tokenizer" and result["format"] == "cot"
    assert (result["tokens"]["min"], result["tokens"]["max"]) == (min(real), max(real))
    assert result["rows_cut"] == sum(n > 128 for n in real)


def test_trainable_and_total_params_of_the_tiny_llama(tiny):
    cfg = json.loads((tiny / "config.json").read_text())
    # hidden 64, 4 heads × 16, MLP 128, 2 layers: r · (in + out) over q, k, v, o (64→64) and gate, up (64→128), down
    by_hand = 2 * 8 * (4 * (64 + 64) + 3 * (64 + 128))
    params = count_params(cfg, "lora", 8, None)
    assert params["trainable"] == by_hand == 17_408
    assert count_params(cfg, "lora", 8, ["q_proj", "v_proj"])["trainable"] == 2 * 8 * 2 * 128
    assert count_params(cfg, "full", 8, None)["trainable"] == params["total"]

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny)
    assert params["total"] == model.num_parameters()
    with warnings.catch_warnings():   # peft 0.21 reads transformers 5's deprecated is_gradient_checkpointing
        warnings.simplefilter("ignore", FutureWarning)
        lora = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear"))
    assert lora.get_nb_trainable_parameters() == (by_hand, params["total"] + by_hand)


def test_param_counts_of_real_shapes():
    assert count_params(QWEN_7B, "lora", 16, None)["total"] == 7_615_616_512
    assert count_params(QWEN_05B, "lora", 16, None)["total"] == 494_032_768


def test_vram_terms_follow_the_documented_formula():
    params = count_params(QWEN_7B, "lora", 16, None)
    vram = estimate_vram(params, "lora", 4, 2048, checkpointing=False)
    assert vram["weights_gb"] == pytest.approx(2 * params["total"] / GIB, abs=1e-3)
    assert vram["trainable_states_gb"] == pytest.approx(16 * params["trainable"] / GIB, abs=1e-3)
    acts = 4 * 2048 * 3584 * 28 * 76 + 4 * 2048 * 152064 * 1
    assert vram["activations_gb"] == pytest.approx(acts / GIB, abs=1e-3) and vram["overhead_gb"] == 2.0
    assert vram["total_gb"] == pytest.approx(76.3, abs=2)                        # H200, evals/gpu/README.md
    checkpointed = estimate_vram(params, "lora", 4, 2048, checkpointing=True)
    acts = 4 * 2048 * 3584 * 28 * 4 + 4 * 2048 * 152064 * 10
    assert checkpointed["activations_gb"] == pytest.approx(acts / GIB, abs=1e-3)
    assert checkpointed["total_gb"] == pytest.approx(30, abs=2)                  # DESIGN §9: 30 GiB measured
    qlora = estimate_vram(params, "qlora", 4, 2048, checkpointing=False)
    assert qlora["weights_gb"] == pytest.approx(
        ((0.5 + 0.127 / 8) * params["linear"] + 2 * (params["total"] - params["linear"])) / GIB, abs=1e-3)


def test_throughput_matches_the_measured_baseline():
    h200 = {"name": "NVIDIA H200", "memory_gb": 139}
    assert tokens_per_second(494_032_768, "lora", h200, checkpointing=False) == pytest.approx(52_000, rel=0.01)
    assert tokens_per_second(7_615_616_512, "lora", h200, checkpointing=False) == pytest.approx(9_900, rel=0.01)
    assert tokens_per_second(7_615_616_512, "lora", h200, checkpointing=True) == pytest.approx(7_000, rel=0.01)
    assert tokens_per_second(7_615_616_512, "lora", {"name": "A100-SXM4-80GB"}, checkpointing=False) < 9_900


def test_gpu_fit_and_gradient_checkpointing(tmp_path):
    rows = {"train": [{"prompt": "x" * 4000, "completion": "y" * 8000}] * 500, "eval": [{"prompt": "a",
                                                                                           "completion": "b"}] * 20}
    h100 = preflight(spec(batch_size=8), rows, None, QWEN_7B, {"name": "NVIDIA H100 80GB HBM3", "memory_gb": 80})
    assert h100["vram"]["without_checkpointing_gb"] > 0.95 * 80 and h100["fits"]
    # the MLPs recomputing their down projection's input make it fit, so no layer is checkpointed
    assert h100["recompute_mlp"] and not h100["gradient_checkpointing"] and h100["vram"]["total_gb"] <= 0.95 * 80
    h100_16 = preflight(spec(batch_size=16), rows, None, QWEN_7B, {"name": "NVIDIA H100 80GB HBM3", "memory_gb": 80})
    assert h100_16["fits"] and h100_16["recompute_mlp"] and h100_16["gradient_checkpointing"]
    assert h100["vram"]["liger"]          # a 7B model on a GPU: the worker uses Liger kernels, and so does the estimate
    assert h100["time"]["gpu_kind"] == "H100" and h100["time"]["seconds"] > 0
    # (batch 4 with Liger and gradient checkpointing fits 24 GB: about 20 GiB, as measured on the H200)
    small = preflight(spec(batch_size=16), rows, None, QWEN_7B, {"name": "RTX 4090", "memory_gb": 24})
    assert small["fits"] is False and not small["ok"]
    assert any(w["code"] == "no_fit" and w["level"] == "error" for w in small["warnings"])
    assert preflight(spec(method="qlora"), rows, None, QWEN_7B, {"name": "RTX 4090", "memory_gb": 24})["fits"]


def test_qlora_without_a_gpu_is_an_error(tok):
    result = preflight(spec(method="qlora"), FIXTURE, tok, None, None)
    assert not result["ok"]
    assert [w["level"] for w in result["warnings"] if w["code"] == "qlora_needs_gpu"] == ["error"]
    assert preflight(spec(method="qlora"), FIXTURE, tok, None, {"name": "H200", "memory_gb": 139})["ok"]


def test_preflight_warnings(tiny, tok):
    cfg = json.loads((tiny / "config.json").read_text())
    codes = {w["code"] for w in preflight(spec(method="full", learning_rate=1e-4, max_seq_len=4096, eval_fraction=0),
                                          FIXTURE, tok, cfg, None)["warnings"]}
    assert {"high_lr", "seq_beyond_model", "no_eval", "tiny_dataset"} <= codes
    lora = preflight(spec(learning_rate=2e-3, target_modules=["q_proj", "wq"]), FIXTURE, tok, cfg, None)
    assert {"high_lr", "unknown_targets"} <= {w["code"] for w in lora["warnings"]}
    calm = preflight(spec(), FIXTURE, tok, cfg, None)
    assert {w["code"] for w in calm["warnings"]} == {"tiny_dataset"}


def test_preflight_of_10k_rows_is_quick(tmp_path, tiny, tok):
    rnd = random.Random(0)
    words = ["patient", "fever", "cough", "blood", "pressure", "diabetes", "insulin", "kidney", "dose"]
    zh = "患者发热咳嗽血压糖尿病胰岛素肾脏肝脏心脏感染抗生素剂量治疗诊断"

    def sentence(n: int) -> str:
        return " ".join(rnd.choice(words) for _ in range(n))

    rows = [{"Question": sentence(15) + "?" if i % 2 else "".join(rnd.choices(zh, k=30)) + "？",
             "Complex_CoT": sentence(60), "Response": sentence(25)} for i in range(10_000)]
    path = write(rows, tmp_path / "big.jsonl")
    cfg = json.loads((tiny / "config.json").read_text())
    start = time.perf_counter()
    result = preflight(spec(max_seq_len=512), path, tok, cfg, None)
    elapsed = time.perf_counter() - start
    assert result["rows"]["total"] == 10_000 and result["tokens"]["sampled_rows"] is None
    assert result["training"]["total_steps"] == math.ceil(9_500 / 4)
    assert elapsed <= 10, f"preflight of 10,000 rows took {elapsed:.1f} s"


def test_prompts_that_fill_max_seq_len_leave_nothing_to_learn(tok):
    # estimate mode: 2n + 2n characters → n tokens; prompt "ab" * n → n / 2 tokens
    short = [{"prompt": "ab" * 8, "completion": "abcd" * 4} for _ in range(60)]            # prompt 4 tokens
    long = [{"prompt": "ab" * 80, "completion": "abcd" * 4} for _ in range(60)]            # prompt 40 tokens
    none_left = preflight(spec(max_seq_len=32), {"train": long, "eval": []}, None, None, None)
    assert not none_left["ok"] and none_left["tokens"]["rows_no_room"] == 60
    assert any(w["code"] == "no_room" and w["level"] == "error" and "raise max_seq_len" in w["message"]
               for w in none_left["warnings"])
    some = preflight(spec(max_seq_len=32), {"train": short + long[:10], "eval": []}, None, None, None)
    assert some["ok"] and some["tokens"]["rows_no_room"] == 10
    assert [w["level"] for w in some["warnings"] if w["code"] == "no_room"] == ["warning"]
    fine = preflight(spec(max_seq_len=32), {"train": short, "eval": []}, None, None, None)
    assert "no_room" not in {w["code"] for w in fine["warnings"]}
