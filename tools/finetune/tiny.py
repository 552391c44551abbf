"""A tiny causal LM + tokenizer built locally, offline, in about a second — for tests and the CPU demo.

:func:`build_tiny_model` trains a byte-level BPE tokenizer (``tokenizers``) on a small built-in
English + Chinese corpus that includes chat roles and ``<think>`` reasoning, wraps it as a
``transformers.PreTrainedTokenizerFast`` with ``<s>`` / ``</s>`` / ``<pad>`` special tokens and a
Jinja chat template (system / user / assistant turns, ``add_generation_prompt``), builds a
``LlamaConfig`` (or ``Qwen2Config``) model with random weights, and saves both with
``save_pretrained`` (safetensors) so the directory loads like any hub snapshot::

    path = build_tiny_model(tmp_path / "tiny")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)

Nothing is downloaded; the result is deterministic for a given ``seed``.
"""

from __future__ import annotations

from pathlib import Path

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
# Added as whole tokens (not special: they must survive ``skip_special_tokens`` decoding).
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<think>", "</think>")

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}<|end|>{% endif %}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_CORPUS = [
    "<|system|>\nYou are a careful medical assistant.<|end|>",
    "<|user|>\nWhat is the first-line treatment for mild hypertension?<|end|>",
    "<|assistant|>\n<think>\nThe patient has mild hypertension. Lifestyle changes come first, then a "
    "thiazide diuretic, an ACE inhibitor or a calcium channel blocker.\n</think>\n\n"
    "Start with lifestyle changes; if blood pressure stays high, add a first-line drug.</s>",
    "<|user|>\nA 45-year-old man has chest pain radiating to the left arm. What should be done?<|end|>",
    "<|assistant|>\n<think>\nChest pain radiating to the arm suggests acute coronary syndrome. "
    "An ECG and troponin are needed at once.\n</think>\n\nGet an ECG within ten minutes and check troponin.</s>",
    "Question: Which vitamin deficiency causes scurvy? Answer: vitamin C.",
    "Instruction: Summarise the following text. Input: The quick brown fox jumps over the lazy dog. "
    "Output: A fox jumps over a dog.",
    "The model reads the question, thinks step by step, and then gives a short answer.",
    "Diabetes, insulin, glucose, blood pressure, kidney, liver, heart, lung, fever, cough, infection.",
    "antibiotic dose patient symptom diagnosis treatment history examination result reasoning response",
    "<|system|>\n你是一名细心的医学助手。<|end|>",
    "<|user|>\n高血压患者应该如何控制饮食？<|end|>",
    "<|assistant|>\n<think>\n高血压患者需要减少盐的摄入，多吃蔬菜水果，控制体重。\n</think>\n\n"
    "少盐、多吃蔬菜水果，并保持适当运动。</s>",
    "<|user|>\n发烧三天，咳嗽，有痰，可能是什么病？<|end|>",
    "<|assistant|>\n<think>\n发热伴咳嗽咳痰，应考虑呼吸道感染，例如支气管炎或肺炎。\n</think>\n\n"
    "可能是呼吸道感染，建议就医做血常规和胸片检查。</s>",
    "问题：糖尿病的主要症状是什么？回答：多饮、多食、多尿和体重下降。",
    "医生、病人、诊断、治疗、药物、症状、检查、结果、心脏、肝脏、肾脏、血糖、血压、感染、发热。",
    "numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000 mg ml kg % ( ) [ ] { } : ; , . ? ! \" ' - _ / \\ = + * # @",
]


def _train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=[PAD, BOS, EOS, UNK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tok


def build_tiny_model(path: str | Path, *, arch: str = "llama", vocab_size: int = 512, hidden: int = 64,
                     layers: int = 2, heads: int = 4, seed: int = 0) -> Path:
    """Build and save a tiny random-weight causal LM with a locally trained tokenizer at ``path``.

    ``arch`` is ``"llama"`` or ``"qwen2"``; ``vocab_size`` is the BPE target (at least 300: the 256
    byte symbols plus specials); ``hidden`` must be divisible by ``heads``. Returns the directory.
    """
    import torch
    from transformers import PreTrainedTokenizerFast

    if arch not in ("llama", "qwen2"):
        raise ValueError(f"arch must be 'llama' or 'qwen2', not {arch!r}")
    if vocab_size < 300:
        raise ValueError("vocab_size must be at least 300 (256 byte symbols plus special tokens)")
    if hidden % heads:
        raise ValueError("hidden must be divisible by heads")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(vocab_size),
        bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        model_max_length=2048,
    )
    tokenizer.add_tokens([t for t in ROLE_TOKENS if t not in tokenizer.get_vocab()])
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.padding_side = "right"

    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    if arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        config, cls = LlamaConfig(**common), LlamaForCausalLM
    else:
        from transformers import Qwen2Config, Qwen2ForCausalLM

        config, cls = Qwen2Config(**common), Qwen2ForCausalLM
    torch.manual_seed(seed)
    model = cls(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


PATTERN_WORDS = ("red", "blue", "green", "cat", "dog", "sun", "moon")


def write_pattern_run(run_dir: str | Path, model: str | Path, *, rows: int = 32, **spec) -> Path:
    """A run directory per the contract (spec.json + prepared ``data/train.jsonl``, ``data/eval.jsonl``) for the
    tiny model: "Say <word> <n> times." rows whose answers are 1–5 words long (so batches hold different token
    counts), in file order (``"sampling": "sequential"``: the same global batches on any number of processes).
    ``spec`` overrides the LoRA defaults; run-level keys (``fsdp``, ``gpus`` …) may go there too."""
    import json

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)

    def row(i: int) -> str:
        word, n = PATTERN_WORDS[i % len(PATTERN_WORDS)], 1 + i % 5
        question = f"Say {word} {n} times."
        prompt = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)
        answer = " ".join([word] * n)
        return json.dumps({"prompt": prompt, "completion": answer + tok.eos_token, "question": question,
                           "reference": answer}) + "\n"

    run_dir = Path(run_dir)
    (run_dir / "data").mkdir(parents=True, exist_ok=True)
    (run_dir / "data" / "train.jsonl").write_text("".join(row(i) for i in range(rows)))
    (run_dir / "data" / "eval.jsonl").write_text("".join(row(i) for i in range(100, 104)))
    fields = {"base_model": "tiny-llama", "dataset": "pattern.jsonl", "method": "lora", "lora_rank": 8,
              "lora_dropout": 0.0, "learning_rate": 5e-3, "batch_size": 4, "max_seq_len": 128, "seed": 7, **spec}
    (run_dir / "spec.json").write_text(json.dumps({**fields, "base_model_path": str(model), "job_id": "ft-1",
                                                   "sampling": "sequential"}))
    return run_dir
