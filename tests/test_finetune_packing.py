"""Sequence packing without cross-contamination, and what padding costs.

``packing: true`` makes trl pack rows (best-fit decreasing) into examples of at most max_seq_len tokens; the
trainer keeps each packed example as a batch row (``tools/finetune/row_packing.py``; trl's own collator would
flatten the batch into one row) with position ids that restart at every row; transformers turns restarting
position ids into a block-diagonal causal mask for PyTorch's SDPA, and the label that would make a row's first
token a prediction from the previous row is dropped. So a packed batch must give every token exactly the loss
it has in a padded batch — checked here on the tiny model, with a
control that the check sees contamination when the position ids do not restart.
"""

from __future__ import annotations

import json

import pytest
from shapes import QWEN_7B

from tools.finetune.preflight import _padded_tokens, preflight
from tools.finetune.spec import FinetuneSpec

torch = pytest.importorskip("torch")
pytest.importorskip("trl")

pytestmark = pytest.mark.filterwarnings("ignore:.*is deprecated and will be removed in v6:FutureWarning")
H200 = {"name": "NVIDIA H200", "memory_gb": 139}


def examples(lengths: list[int]) -> list[dict]:
    g = torch.Generator().manual_seed(4)
    return [{"input_ids": torch.randint(3, 200, (n,), generator=g).tolist()} for n in lengths]


def token_losses(model, batch: dict) -> torch.Tensor:
    """Each predicted token's loss, in order (labels shifted as the model does it). No KV cache, as in training
    (trl's loss passes ``use_cache=False``): with a cache transformers does not look for packed rows."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    logits = model(**inputs, use_cache=False).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    losses = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                               ignore_index=-100, reduction="none")
    return losses[labels.reshape(-1) != -100]


def test_a_packed_batch_gives_every_token_the_loss_it_has_alone(tiny):
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32, attn_implementation="sdpa").eval()
    rows = examples([7, 19, 4, 11])
    padded = DataCollatorForLanguageModeling(pad_token_id=0)(rows)
    packed = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(rows)
    assert packed["input_ids"].shape == (1, 41) and "attention_mask" not in packed
    assert packed["position_ids"][0].tolist()[:8] == [0, 1, 2, 3, 4, 5, 6, 0]
    with torch.no_grad():
        alone = token_losses(model, padded)          # rows padded to 19 tokens, attention mask on the padding
        together = token_losses(model, packed)
        # control: the same packed tokens as one long sequence (no restart) — rows attend to the rows before
        leaky = token_losses(model, {**packed, "position_ids": torch.arange(41)[None]})
    assert alone.shape == together.shape == (41 - 4,)      # each row's first token predicts nothing
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    assert leaky.shape != alone.shape or not torch.allclose(leaky, alone, atol=1e-3)


def test_packed_rows_give_every_token_the_loss_it_has_alone(tiny):
    """The trainer's form (tools/finetune/row_packing.py): trl's packed examples kept as rows of max_seq_len,
    position ids restarting, padding at the end of each row — the same per-token losses as each row alone."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from tools.finetune.row_packing import row_collator

    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32, attn_implementation="sdpa").eval()
    rows = examples([7, 19, 4, 11, 9])
    packed_examples = [{"input_ids": rows[0]["input_ids"] + rows[1]["input_ids"], "seq_lengths": [7, 19]},
                       {"input_ids": rows[2]["input_ids"] + rows[3]["input_ids"] + rows[4]["input_ids"],
                        "seq_lengths": [4, 11, 9]}]
    batch = row_collator(pad_token_id=0, max_seq_len=32)(packed_examples)
    assert batch["input_ids"].shape == (2, 26) and "attention_mask" not in batch     # padded to the longest row
    with torch.no_grad():
        alone = token_losses(model, DataCollatorForLanguageModeling(pad_token_id=0)(rows))
        together = token_losses(model, batch)
    assert together.shape == alone.shape == (50 - 5,)
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


def test_a_packed_run_trains(tiny, tmp_path):
    from tools.finetune.tiny import write_pattern_run
    from tools.finetune.train import run

    run_dir = write_pattern_run(tmp_path / "run", tiny, max_steps=3, batch_size=2, packing=True)
    spec = json.loads((run_dir / "spec.json").read_text())
    (run_dir / "spec.json").write_text(json.dumps({**spec, "evaluate": False}))
    outcome = run(run_dir)
    assert outcome.code == 0, outcome.summary
    assert outcome.summary["steps"] == 3 and outcome.summary["final_loss"] > 0


def test_padding_is_simulated_per_batch():
    assert _padded_tokens([10, 10, 10, 10], 2, 0) == 40                   # equal rows: no padding
    assert _padded_tokens([1, 100], 2, 0) == 200                          # one batch padded to its longest row
    assert _padded_tokens([1, 100], 1, 0) == 101                          # batch 1: never padded
    assert _padded_tokens([5, 7, 9], 2, 3) in (5 + 2 * 9, 7 + 2 * 9, 9 + 2 * 7)   # the last batch holds one row


def mixed_rows(n: int = 400) -> dict:
    short = {"prompt": "q " * 20, "completion": "a " * 30}
    long = {"prompt": "q " * 40, "completion": "a " * 1500}
    return {"train": [long if i % 5 == 0 else short for i in range(n)], "eval": [short] * 10}


def test_preflight_counts_padding_and_suggests_packing():
    base = dict(base_model="m", dataset="d.jsonl", method="lora", batch_size=8, max_seq_len=2048)
    rows = mixed_rows(4000)          # enough tokens that whole seconds do not round the ratio away
    unpacked = preflight(FinetuneSpec(**base), rows, None, QWEN_7B, H200)
    packed = preflight(FinetuneSpec(**base, packing=True), rows, None, QWEN_7B, H200)
    tokens = unpacked["tokens"]
    assert tokens["padded_tokens_per_epoch"] > 2 * tokens["tokens_per_epoch"]   # 1 long row in 5 pads most batches
    assert unpacked["training"]["padding_fraction"] > 0.5 and packed["training"]["padding_fraction"] == 0
    hint = next(w for w in unpacked["warnings"] if w["code"] == "packing")
    assert hint["level"] == "info" and "packing: true" in hint["message"]
    assert not any(w["code"] == "packing" for w in packed["warnings"])
    # same tokens/s, but the unpacked run processes its padding too
    ratio = unpacked["time"]["seconds"] / packed["time"]["seconds"]
    assert ratio == pytest.approx(1 / (1 - unpacked["training"]["padding_fraction"]), rel=0.05)
    assert "padding" in unpacked["time"]["basis"]
    # rows of one length: nothing to gain, no hint
    even = preflight(FinetuneSpec(**base), {"train": [{"prompt": "q " * 20, "completion": "a " * 30}] * 100,
                                            "eval": []}, None, QWEN_7B, H200)
    assert even["training"]["padding_fraction"] < 0.05 and not any(w["code"] == "packing" for w in even["warnings"])


def test_the_packing_hint_speaks_the_users_language_and_says_how():
    from tools.finetune.declare import preflight_lines

    base = dict(base_model="m", dataset="d.jsonl", method="lora", batch_size=8, max_seq_len=2048)
    report = preflight(FinetuneSpec(**base), mixed_rows(), None, QWEN_7B, H200)
    report["model"] = {"requested": "m", "source": "local"}
    speedup = 1 / (1 - report["training"]["padding_fraction"])
    en = " ".join(preflight_lines(report, "en")["warnings"])
    zh = " ".join(preflight_lines(report, "zh")["warnings"])
    assert f"{speedup:.1f}× faster" in en and "with packing" in en
    assert f"约快 {speedup:.1f} 倍" in zh and "用 packing" in zh and "{" not in zh


@pytest.mark.parametrize("text, packing", [
    ("fine-tune Qwen2.5-0.5B on data.jsonl with packing", True),
    ("fine-tune Qwen2.5-0.5B on data.jsonl, packing: true", True),
    ("pack the rows, then fine-tune", True),
    ("fine-tune it without packing", False),
    ("packing=false please", False),
    ("用 lora 微调 Qwen2.5-0.5B，数据 data.jsonl，开启打包", True),
    ("用 packing 重新提交", True),
    ("不要打包", False),
    ("把 ft-3 打包成 gguf", None),         # bundling an export, not sequence packing
    ("install the package first", None),
])
def test_packing_is_understood_in_both_languages(text, packing):
    from agent.slots import extract_slots

    assert extract_slots(text).get("packing") is packing
