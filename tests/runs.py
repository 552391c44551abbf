"""Run directories per the trainer's contract for the tiny model, shared by the fine-tune tests: "Say <word>
twice." rows, and a Hugging Face cache holding a copy of a local model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

WORDS = ("red", "blue", "green", "cat", "dog", "sun")
LORA_DEFAULTS = {"base_model": "tiny-llama", "dataset": "pattern.jsonl", "method": "lora", "lora_rank": 8,
                 "learning_rate": 5e-3, "batch_size": 4, "max_seq_len": 128, "seed": 7}


def say_twice_row(tok, i: int, words: tuple[str, ...] = WORDS) -> dict[str, str]:
    """A prepared row: the chat-templated question "Say <word> twice." and its answer, EOS included."""
    word = words[i % len(words)]
    question = f"Say {word} twice."
    prompt = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                     add_generation_prompt=True)
    return {"prompt": prompt, "completion": f"{word} {word}{tok.eos_token}", "question": question,
            "reference": f"{word} {word}"}


def write_run(run_dir: Path, model: Path, *, rows: int, eval_rows: int, job_id: str = "ft-1",
              words: tuple[str, ...] = WORDS, **spec) -> dict:
    """``run_dir`` with spec.json and prepared ``data/train.jsonl`` (+ ``data/eval.jsonl`` when ``eval_rows``);
    ``spec`` overrides :data:`LORA_DEFAULTS`. Returns the spec fields (without the run-level keys)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)

    def lines(n: int) -> str:
        return "".join(json.dumps(say_twice_row(tok, i, words)) + "\n" for i in range(n))

    (run_dir / "data").mkdir(parents=True)
    (run_dir / "data" / "train.jsonl").write_text(lines(rows))
    if eval_rows:
        (run_dir / "data" / "eval.jsonl").write_text(lines(eval_rows))
    fields = {**LORA_DEFAULTS, **spec}
    (run_dir / "spec.json").write_text(json.dumps({**fields, "base_model_path": str(model), "job_id": job_id}))
    return fields


def fake_hub_cache(root: Path, repo_id: str, model: Path, commit: str = "0" * 40) -> Path:
    """The hub cache layout (refs/main → snapshots/<commit>/) holding a copy of ``model``."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(model, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit, encoding="utf-8")
    return repo / "snapshots" / commit


def tiny_lora_model(path: Path):
    """The tiny model in fp32 under a rank-4 LoRA on every linear layer, B not zero (so every adapter gets a
    gradient), the same weights on every call."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                            init_lora_weights=False))


def speed_run(root: Path, model: Path, speed: dict, **spec):
    """A 12-step pattern run through the whole trainer with these spec.json ``speed`` options (and ``spec``
    overrides; no held-out evaluation): (outcome, summary, the logged losses). Fails the test unless it
    succeeds and the adapter it saved, loaded onto the untouched base, answers as the trained model does."""
    import json

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tools.finetune.tiny import write_pattern_run
    from tools.finetune.train import run

    run_dir = write_pattern_run(root, model, **{"max_steps": 12, "batch_size": 4, **spec})
    spec = json.loads((run_dir / "spec.json").read_text())
    (run_dir / "spec.json").write_text(json.dumps({**spec, "speed": speed, "evaluate": False}))
    outcome = run(run_dir)
    assert outcome.code == 0, outcome.summary
    summary = json.loads((run_dir / "summary.json").read_text())
    losses = [json.loads(line)["loss"] for line in (run_dir / "progress.jsonl").read_text().splitlines()
              if json.loads(line).get("loss") is not None]
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model), run_dir / "adapter")
    ids = torch.randint(3, 200, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, outcome.model(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)
    return outcome, summary, losses
