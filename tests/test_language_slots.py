"""Language detection, step splitting and slot filling: what the local brain reads out of a message.

Pure functions, no model: each case is a message a user would type and the value they meant.
"""

from __future__ import annotations

import time

import pytest
from stackwise_plugin_demo import WordCountArgs

from agent.language import detect_language, split_steps
from agent.slots import extract_slots, extract_texts, fill_args
from tools.embedding_distance import DistanceArgs
from tools.explain import ExplainArgs
from tools.finetune.spec import CancelArgs, FinetuneSpec, JobRef
from tools.shap_report import ShapArgs


def slots(text: str) -> dict:
    return extract_slots(text, detect_language(text))


# --- language -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "lang"), [
    ("什么是 QLoRA？", "zh"),
    ("你能做什么", "zh"),
    ("LoRA 是什么", "zh"),
    ("“国王”和“女王”有多相似？", "zh"),
    ("hello", "en"),
    ("explain LoRA please", "en"),
    # Chinese only inside quotes is data, not the user's language.
    ("how similar are '国王' and '女王'?", "en"),
    ("compare “苹果” and “香蕉” with cosine", "en"),
    ("how close are 「猫」 and 「狗」", "en"),
])
def test_detect_language_counts_chinese_outside_quotes_only(text, lang):
    assert detect_language(text) == lang


# --- steps ------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "steps"), [
    ("explain LoRA, then cancel ft-3", ["explain LoRA", "cancel ft-3"]),
    ("explain LoRA and then fine-tune qwen on a.jsonl", ["explain LoRA", "fine-tune qwen on a.jsonl"]),
    ("what is LoRA and also what is QLoRA", ["what is LoRA", "what is QLoRA"]),
    ("explain LoRA. After that, fine-tune qwen on a.jsonl", ["explain LoRA", "fine-tune qwen on a.jsonl"]),
    ("先解释一下 SHAP，然后给 churn.csv 做报告", ["解释一下 SHAP", "给 churn.csv 做报告"]),
    ("解释 LoRA，接着取消 ft-3", ["解释 LoRA", "取消 ft-3"]),
])
def test_split_steps_splits_compound_messages(text, steps):
    assert split_steps(text) == steps


@pytest.mark.parametrize("text", [
    "fine-tune Qwen2.5-0.5B on data.jsonl with lora rank 8",
    "what is lora",
    "how similar are 'king' and 'queen'?",
])
def test_split_steps_keeps_a_single_request_whole(text):
    assert split_steps(text) == [text]


@pytest.mark.parametrize("text", [
    'compare "cats, then dogs" and "birds"',
    "how similar are 'eat, then sleep' and 'sleep'",
    "比较“先吃饭，然后睡觉”和“睡觉”",
    "比较「先吃饭，然后睡觉」和「睡觉」的相似度",
])
def test_split_steps_never_splits_inside_quotes(text):
    assert split_steps(text) == [text]


@pytest.mark.parametrize(("text", "steps"), [
    ("compare 'a, then b' and 'c', then cancel ft-3", ["compare 'a, then b' and 'c'", "cancel ft-3"]),
    ("先比较「先吃饭，然后睡觉」和「睡觉」，然后取消 ft-2", ["比较「先吃饭，然后睡觉」和「睡觉」", "取消 ft-2"]),
])
def test_split_steps_splits_outside_quotes_and_keeps_the_quote_intact(text, steps):
    assert split_steps(text) == steps


# --- texts to compare ---------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "texts"), [
    ("how similar are 'king' and 'queen'?", ["king", "queen"]),
    ('cosine between "cat" and "dog"', ["cat", "dog"]),
    ("compare “I love pizza” and “pizza is great”", ["I love pizza", "pizza is great"]),
    ("「国王」和「女王」有多相似？", ["国王", "女王"]),
    ("‘apple’ vs ‘banana’", ["apple", "banana"]),
    ("『甲』和『乙』的距离", ["甲", "乙"]),
    ("“国王”和“女王”", ["国王", "女王"]),
    ('compare "don\'t stop" and "keep going"', ["don't stop", "keep going"]),
    ("it's fun: how close are 'a b' and 'c d'", ["a b", "c d"]),
    ("which is closest: 'apple', 'banana', 'car'", ["apple", "banana", "car"]),
])
def test_extract_texts_reads_every_quote_style(text, texts):
    assert extract_texts(text) == texts


@pytest.mark.parametrize(("text", "texts"), [
    ("how similar are king and queen?", ["king", "queen"]),
    ("cosine between apple and banana", ["apple", "banana"]),
    ("国王和女王的相似度", ["国王", "女王"]),
    ("which is closest: apple, banana, car", ["apple", "banana", "car"]),
])
def test_extract_texts_reads_unquoted_pairs_and_lists(text, texts):
    assert extract_texts(text) == texts


def test_extract_texts_finds_nothing_in_an_ordinary_question():
    assert extract_texts("what is cosine similarity?") == []


# --- fine-tune slots ------------------------------------------------------------------------------

def test_full_english_fine_tune_request():
    s = slots("fine-tune deepseek-ai/DeepSeek-R1-Distill-Qwen-7B on medical_cot.jsonl with qlora rank 16 "
              "alpha 32 for 3 epochs, lr 2e-4, batch size 8, max seq len 4096")
    assert s["base_model"] == "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"
    assert s["dataset"] == "medical_cot.jsonl"
    assert s["method"] == "qlora"
    assert (s["lora_rank"], s["lora_alpha"], s["epochs"]) == (16, 32, 3)
    assert s["learning_rate"] == pytest.approx(2e-4)
    assert (s["batch_size"], s["max_seq_len"]) == (8, 4096)


def test_full_chinese_fine_tune_request():
    s = slots("用 LoRA 在 data.jsonl 上微调 Qwen2.5-0.5B，训练三轮，学习率 1e-5，批大小 4")
    assert (s["base_model"], s["dataset"], s["method"]) == ("Qwen2.5-0.5B", "data.jsonl", "lora")
    assert s["epochs"] == 3
    assert s["learning_rate"] == pytest.approx(1e-5)
    assert s["batch_size"] == 4


@pytest.mark.parametrize(("text", "key", "value"), [
    ("fine-tune Qwen2.5-0.5B", "base_model", "Qwen2.5-0.5B"),
    ("fine-tune Qwen2.5-0.5B-Instruct", "base_model", "Qwen2.5-0.5B-Instruct"),
    ("train mistralai/Mistral-7B-v0.1", "base_model", "mistralai/Mistral-7B-v0.1"),
    ("train ./models/my-llama on a.jsonl", "base_model", "./models/my-llama"),
    ("QLoRA please", "method", "qlora"),
    ("full fine-tune llama on x.csv", "method", "full"),
    ("全参微调 Qwen", "method", "full"),
    ("with lora", "method", "lora"),
    ("lora rank 8", "lora_rank", 8),
    ("lora r=8", "lora_rank", 8),
    ("rank: 32", "lora_rank", 32),
    ("秩为 8", "lora_rank", 8),
    ("alpha 64", "lora_alpha", 64),
    ("epochs 2", "epochs", 2),
    ("2 epochs", "epochs", 2),
    ("epoch=4", "epochs", 4),
    ("3 轮", "epochs", 3),
    ("训练三轮", "epochs", 3),
    ("跑两遍", "epochs", 2),
    ("训练十轮", "epochs", 10),
    ("max steps 300", "max_steps", 300),
    ("for 500 steps", "max_steps", 500),
    ("最多 1000 步", "max_steps", 1000),
    ("learning rate 2e-4", "learning_rate", 2e-4),
    ("lr=5e-5", "learning_rate", 5e-5),
    ("learning rate of 0.0003", "learning_rate", 3e-4),
    ("学习率 1e-5", "learning_rate", 1e-5),
    ("学习率为 3e-4", "learning_rate", 3e-4),
    ("batch size 8", "batch_size", 8),
    ("bs=16", "batch_size", 16),
    ("批大小 4", "batch_size", 4),
    ("sequence length 1024", "max_seq_len", 1024),
    ("context length 32k", "max_seq_len", 32 * 1024),
    ("序列长度 512", "max_seq_len", 512),
])
def test_fine_tune_slot(text, key, value):
    got = slots(text).get(key)
    assert got == (pytest.approx(value) if isinstance(value, float) else value)


def test_steps_and_epochs_in_one_message_do_not_mix_when_epochs_come_first():
    s = slots("3 epochs, max_steps=200")
    assert (s["epochs"], s["max_steps"]) == (3, 200)


def test_key_value_epochs_after_max_steps():
    s = slots("fine-tune Qwen2.5-0.5B on a.jsonl max_steps=200 epochs=2")
    assert (s["epochs"], s["max_steps"]) == (2, 200)


def test_one_digit_k_sequence_length():
    assert slots("fine-tune Qwen2.5-0.5B on a.jsonl, max seq len 4k")["max_seq_len"] == 4096


# --- job ids, SHAP slots --------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "job"), [
    ("status of FT-7", "ft-7"),
    ("cancel ft-3", "ft-3"),
    ("cancel ft 12", "ft-12"),
    ("cancel job ft_3", "ft-3"),
    ("cancel FT-0012", "ft-12"),
    ("取消 ft-9", "ft-9"),
])
def test_job_ids_are_normalised(text, job):
    assert slots(text)["job_id"] == job


@pytest.mark.parametrize(("text", "key", "value"), [
    ("why did the model predict row 12 of loans.csv", "row", 12),
    ("row #7", "row", 7),
    ("解释第 5 行的预测，数据 loans.csv", "row", 5),
    ("shap report for sales.csv with target revenue", "target", "revenue"),
    ("target column is price", "target", "price"),
    ("churn.csv 目标列是 churn", "target", "churn"),
    ("目标是 price", "target", "price"),
    ("regression on house.csv predicting price", "task", "regression"),
    ("classification task on a.csv", "task", "classification"),
    ("用分类模型分析 a.csv", "task", "classification"),
    ("shap for sales.csv", "data", "sales.csv"),
])
def test_shap_slot(text, key, value):
    assert slots(text)[key] == value


def test_similarity_slots_model_and_metrics_in_order_of_mention():
    s = slots("use manhattan and cosine with all-MiniLM-L6-v2 on 'a' and 'b'")
    assert s["metrics"] == ["manhattan", "cosine"]
    assert s["embedding_model"] == "all-MiniLM-L6-v2"
    assert s["texts"] == ["a", "b"]


def test_concept_query_is_stripped_of_the_question_words():
    assert slots("what is QLoRA?")["query"] == "QLoRA"
    assert slots("什么是 QLoRA？")["query"] == "QLoRA"


# --- fill_args --------------------------------------------------------------------------------------

ALL_MODELS = [DistanceArgs, ExplainArgs, FinetuneSpec, JobRef, CancelArgs, ShapArgs, WordCountArgs]
BUSY = ("fine-tune Qwen2.5-0.5B on sales.csv with qlora rank 8 for 2 epochs, target price, row 3, ft-4, "
        "compare 'a' and 'b' with cosine")


@pytest.mark.parametrize("model", ALL_MODELS, ids=lambda m: m.__name__)
def test_fill_args_only_fills_fields_the_model_has(model):
    args = fill_args(model, slots(BUSY), "en")
    assert args, "a busy message should fill something"
    assert set(args) <= set(model.model_fields)


def test_fill_args_gives_valid_fine_tune_args():
    text = "fine-tune deepseek-ai/DeepSeek-R1-Distill-Qwen-7B on cot.jsonl with lora rank 8, lr 1e-4, 2 epochs"
    spec = FinetuneSpec.model_validate(fill_args(FinetuneSpec, slots(text), "en"))
    assert spec.base_model == "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"
    assert (spec.dataset, spec.method, spec.lora_rank, spec.epochs) == ("cot.jsonl", "lora", 8, 2)
    assert spec.learning_rate == pytest.approx(1e-4)


def test_fill_args_maps_embedding_model_to_model_and_language_to_lang():
    s = slots("compare 'a' and 'b' with all-MiniLM-L6-v2")
    assert fill_args(DistanceArgs, s, "en") == {"texts": ["a", "b"], "model": "all-MiniLM-L6-v2"}
    assert fill_args(ExplainArgs, slots("什么是 QLoRA？"), "zh") == {"query": "QLoRA", "lang": "zh"}


def test_fill_args_never_puts_a_data_file_into_the_shap_model_field():
    args = fill_args(ShapArgs, slots("shap for sales.csv with target price"), "en")
    assert args == {"data": "sales.csv", "target": "price"}


def test_fill_args_fills_a_plugin_tool_by_field_name():
    assert fill_args(WordCountArgs, slots("count the words in 'a b' and 'c'"), "en") == {"texts": ["a b", "c"]}


# --- long messages ----------------------------------------------------------------------------------------

def test_a_long_pasted_paragraph_is_read_quickly():
    text = ("这段文字讲的是模型训练中的各种细节问题" * 400)[:6000]
    started = time.perf_counter()
    split_steps(text)
    extract_slots(text, "zh")
    assert time.perf_counter() - started < 1.0


@pytest.mark.parametrize("text", [
    ("长文本" * 7000)[:20000], "x" * 20000, "1" * 20000, " " * 19999 + "?", "a.b/" * 5000, "'" * 20000,
    "、a" * 10000, "and " * 5000, "，" * 20000, "\n" * 20000,
], ids=["zh", "one-token", "digits", "spaces", "path-like", "quotes", "list", "and", "commas", "newlines"])
def test_pathological_messages_at_the_size_limit_stay_fast(text):
    """Regex backtracking on a 20,000-character paste must not stall the bot (it holds the agent's lock)."""
    started = time.perf_counter()
    for step in split_steps(text):
        extract_slots(step, detect_language(step))
    assert time.perf_counter() - started < 2.0
