"""The held-out evaluation of a fine-tune, before and after training: ``summary.json``'s ``evaluation``.

Measured on the held-out split (``RUN/data/eval.jsonl``), for the base model ("before") and the trained one
("after"):

- ``loss`` / ``perplexity``: the token-weighted mean cross-entropy over the completion tokens of the first
  :data:`MAX_LOSS_ROWS` rows, tokenized and truncated as trl does for training; perplexity = exp(loss);
- ``format_ok``: of greedy answers to the first :data:`MAX_GEN_ROWS` prompts whose reference completion is
  chain-of-thought, the share that write ``<think>…</think>`` and then a non-empty answer;
- ``exact_match`` / ``f1``: against the reference answer, on the sampled rows whose reference is short
  (see :mod:`tools.finetune.eval_metrics`); ``None`` (not applicable) when none is.

"Before" is the same model with the LoRA adapter switched off; full fine-tuning has no adapter, so
:meth:`HeldOutEvaluation.measure_base` must run before training. Each measurement is bounded in rows and
time; the second one covers exactly the rows the first did. Nothing here raises: a failure becomes a note.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

from tools.finetune.eval_metrics import (
    SHORT_TOKENS,
    exact_match,
    is_short,
    mean,
    opens_think,
    perplexity,
    split_think,
    token_f1,
)

log = logging.getLogger("stackwise.finetune")
MAX_LOSS_ROWS = 200        # held-out rows scored for loss
MAX_GEN_ROWS = 32          # held-out prompts answered
MAX_NEW_TOKENS = 1024      # the longest answer generated ...
MIN_NEW_TOKENS = 32        # ... and the shortest limit (the limit follows the sample's reference lengths)
GEN_BATCH = 32          # the whole sample in one batch: decoding is memory-bound, so rows come almost free
LOSS_BATCH_MAX = 8
BUDGET_S = {"loss": 120.0, "answers": 300.0}   # per measurement; the first batch always runs


class _Stopped(Exception):
    """The job was cancelled in the middle of a measurement."""


def encode_row(tokenizer, row: dict[str, str], max_len: int) -> tuple[list[int], int] | None:
    """``(input ids, index of the first completion token)`` as trl builds a training example (prompt and
    prompt+completion tokenized apart, the completion starting where they diverge, cut to ``max_len``);
    ``None`` when no completion token is left."""
    completion = row["completion"]
    eos = tokenizer.eos_token or ""
    if eos and not completion.endswith(eos):
        completion += eos
    prompt_ids = tokenizer(text=row["prompt"])["input_ids"]
    ids = tokenizer(text=row["prompt"] + completion)["input_ids"]
    start = next((i for i, (a, b) in enumerate(zip(prompt_ids, ids, strict=False)) if a != b),
                 min(len(prompt_ids), len(ids)))
    ids = ids[:max_len]
    start = max(start, 1)       # the first token has nothing before it to predict it from
    return (ids, start) if start < len(ids) else None


def completion_loss(model, tokenizer, encoded: list[tuple[list[int], int]]) -> tuple[float, int]:
    """Summed cross-entropy of the completion tokens of one batch of :func:`encode_row` results, and their
    number (right-padded; each row's logits cast to float32 separately to bound memory)."""
    import torch
    import torch.nn.functional as F

    width = max(len(ids) for ids, _ in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    attention = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, (ids, _) in enumerate(encoded):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        attention[i, :len(ids)] = 1
    logits = model(input_ids=input_ids.to(model.device), attention_mask=attention.to(model.device)).logits
    total, count = 0.0, 0
    for i, (ids, start) in enumerate(encoded):
        target = input_ids[i, start:len(ids)].to(logits.device)
        total += float(F.cross_entropy(logits[i, start - 1:len(ids) - 1].float(), target, reduction="sum"))
        count += len(ids) - start
    return total, count


def _stop_ids(model, tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list | tuple) else [configured])
    return sorted(i for i in ids if i is not None)


def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[tuple[str, bool]]:
    """Greedy answers for one batch of prompts (left-padded), each as ``(text, cut off at the limit)``.
    Special tokens are dropped from the text, except the think tags even where a tokenizer marks them special."""
    import torch

    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(prompts, return_tensors="pt", padding=True).to(model.device)
    finally:
        tokenizer.padding_side = side
    stops = _stop_ids(model, tokenizer)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=stops)
    keep = {tokenizer.convert_tokens_to_ids(t) for t in ("<think>", "</think>")}
    drop = set(tokenizer.all_special_ids) - keep
    answers = []
    for row in out[:, enc["input_ids"].shape[1]:].tolist():
        end = next((j for j, t in enumerate(row) if t in stops), None)
        ids = [t for t in row[:end] if t not in drop]
        answers.append((tokenizer.decode(ids, skip_special_tokens=False).strip(), end is None))
    return answers


class HeldOutEvaluation:
    """The evaluation of one run: ``measure_base`` (full fine-tuning, before training), then ``result``."""

    def __init__(self, rows: list[dict[str, str]], *, max_seq_len: int, batch_size: int,
                 stop: Callable[[], bool] | None = None, budget_s: dict[str, float] | None = None):
        self.available = len(rows)
        self.loss_rows = rows[:MAX_LOSS_ROWS]
        self.gen_rows = rows[:MAX_GEN_ROWS]
        self.max_seq_len = max_seq_len
        self.batch_size = max(1, min(batch_size, LOSS_BATCH_MAX))
        self.stop = stop or (lambda: False)
        self.budget_s = dict(BUDGET_S, **(budget_s or {}))
        self.notes: list[str] = []
        self.before: dict[str, Any] | None = None
        self.counts: dict[str, int] | None = None   # what the first measurement covered; the second repeats it
        self.stats: dict[str, int] = {}
        self.base_measured = False                  # measure_base ran (whether or not it got numbers)

    @classmethod
    def for_job(cls, job, stop: Callable[[], bool] | None = None) -> HeldOutEvaluation:
        """The evaluation of a :class:`~tools.finetune.train_setup.Job`'s held-out rows."""
        return cls(job.eval_rows, max_seq_len=job.spec.max_seq_len, batch_size=job.spec.batch_size, stop=stop)

    def measure_base(self, model, tokenizer) -> None:
        """Measure the model as loaded, before any training (the "before" of full fine-tuning)."""
        self.base_measured = True
        if self.loss_rows:
            self.before = self._guarded("before training", lambda: self._measure(model, tokenizer, "before"))

    def result(self, model, tokenizer) -> dict[str, Any]:
        """``{"rows", "answers", "short", "max_new_tokens", "before", "after", "notes"}`` for the trained model;
        the "before" of LoRA/QLoRA is measured here with the adapter switched off."""
        try:
            return self._result(model, tokenizer)
        except Exception as exc:  # noqa: BLE001 - a bug here must not fail a run that trained fine
            logging.getLogger("stackwise.traceback").error("evaluation failed", exc_info=exc)
            message = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
            log.warning("evaluation failed: %s", message)
            return {"rows": 0, "answers": 0, "short": 0, "max_new_tokens": None, "before": None, "after": None,
                    "notes": [f"evaluation failed: {message}"]}

    def _result(self, model, tokenizer) -> dict[str, Any]:
        if not self.loss_rows:
            return self._report(None, ["no held-out rows (the data set has fewer than 10 rows, or eval_fraction "
                                       "is 0): nothing to evaluate"])
        if not self.base_measured:
            if _has_adapter(model):
                self.before = self._guarded("with the adapter off",
                                            lambda: self._measure(model, tokenizer, "before", adapter_off=True))
            else:
                self.notes.append("before: not measured (full fine-tuning measures the base model before "
                                  "training)")
        after = self._guarded("after training", lambda: self._measure(model, tokenizer, "after"))
        return self._report(after, [])

    # --- internals -------------------------------------------------------------------------------------

    def _guarded(self, when: str, measure: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
        started = time.monotonic()
        try:
            phase = measure()
        except _Stopped:
            self.notes.append(f"{when}: stopped, the job was cancelled")
            return None
        except Exception as exc:  # the evaluation must never cost the user the trained model
            _empty_cuda_cache()
            logging.getLogger("stackwise.traceback").error("evaluation %s failed", when, exc_info=exc)
            message = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
            log.warning("evaluation %s failed: %s", when, message)
            self.notes.append(f"evaluation {when} failed: {message}")
            return None
        log.info("evaluation %s: %s (%.0f s)", when, phase, time.monotonic() - started)
        return phase

    def _check_stop(self) -> None:
        if self.stop():
            raise _Stopped

    def _measure(self, model, tokenizer, when: str, *, adapter_off: bool = False) -> dict[str, Any]:
        was_training = model.training
        model.eval()
        ctx = model.disable_adapter() if adapter_off else nullcontext()
        try:
            import torch

            with ctx, torch.no_grad():
                limits = self.counts or {}
                loss = self._loss(model, tokenizer, when, limits.get("loss"))
                answers = self._answers(model, tokenizer, when, limits.get("answers"))
        finally:
            model.train(was_training)
        if self.counts is None:
            self.counts = {"loss": loss["rows"], "answers": answers["rows"]}
        return {"loss": _round(loss["loss"], 4), "perplexity": _round(perplexity(loss["loss"]), 3),
                **{k: _round(answers[k], 4) for k in ("format_ok", "exact_match", "f1")}}

    def _loss(self, model, tokenizer, when: str, limit: int | None) -> dict[str, Any]:
        rows = self.loss_rows[:limit] if limit is not None else self.loss_rows
        started, total, tokens, done = time.monotonic(), 0.0, 0, 0
        for first in range(0, len(rows), self.batch_size):
            if limit is None and first and time.monotonic() - started > self.budget_s["loss"]:
                self.notes.append(f"{when}: loss: time budget of {self.budget_s['loss']:.0f} s reached after "
                                  f"{first} rows")
                break
            self._check_stop()
            batch = rows[first:first + self.batch_size]
            encoded = [e for e in (encode_row(tokenizer, r, self.max_seq_len) for r in batch) if e is not None]
            if encoded:
                part, count = completion_loss(model, tokenizer, encoded)
                total, tokens = total + part, tokens + count
            done = first + len(batch)
        self.stats.setdefault("loss_tokens", tokens)
        if not tokens:
            self.notes.append(f"{when}: no loss, no held-out row has a completion token within "
                              f"max_seq_len={self.max_seq_len}")
        return {"loss": total / tokens if tokens else None, "rows": done}

    def _answers(self, model, tokenizer, when: str, limit: int | None) -> dict[str, Any]:
        rows = [r for r in self.gen_rows if len(tokenizer(text=r["prompt"])["input_ids"]) < self.max_seq_len]
        new_tokens = self._new_tokens(tokenizer, rows)      # from the whole sample: the same for both sides
        rows = rows[:limit] if limit is not None else rows
        started, formats, matches, f1s, cut, done = time.monotonic(), [], [], [], 0, 0
        for first in range(0, len(rows), GEN_BATCH):
            if limit is None and first and time.monotonic() - started > self.budget_s["answers"]:
                self.notes.append(f"{when}: answers: time budget of {self.budget_s['answers']:.0f} s reached after "
                                  f"{first} prompts")
                break
            self._check_stop()
            batch = rows[first:first + GEN_BATCH]
            for row, (text, cut_off) in zip(batch, generate_answers(model, tokenizer, [r["prompt"] for r in batch],
                                                                    new_tokens), strict=True):
                opened = opens_think(row["prompt"])
                follows, answer = split_think(text, opened=opened)
                cut += cut_off
                if split_think(row["completion"].removesuffix(tokenizer.eos_token or ""), opened=opened)[0]:
                    formats.append(float(follows))
                if is_short(row["reference"]):
                    matches.append(exact_match(answer, row["reference"]))
                    f1s.append(token_f1(answer, row["reference"]))
            done = first + len(batch)
        self.stats.update(answers=done, cot=len(formats), short=len(matches), max_new_tokens=new_tokens)
        if cut:
            self.notes.append(f"{when}: {cut} of {done} answers hit the {new_tokens}-token limit before ending")
        return {"format_ok": mean(formats), "exact_match": mean(matches), "f1": mean(f1s), "rows": done}

    @staticmethod
    def _new_tokens(tokenizer, rows: list[dict[str, str]]) -> int:
        """Room for an answer a bit longer than the longest reference completion of the sample, within bounds."""
        longest = max((len(tokenizer(text=r["completion"])["input_ids"]) for r in rows), default=0)
        return max(MIN_NEW_TOKENS, min(MAX_NEW_TOKENS, math.ceil(longest * 1.25) + 8))

    def _report(self, after: dict[str, Any] | None, notes: list[str]) -> dict[str, Any]:
        counts, stats = self.counts or {}, self.stats
        described = []
        if counts.get("loss"):
            capped = f" (capped at {MAX_LOSS_ROWS})" if self.available > MAX_LOSS_ROWS else ""
            described.append(f"loss: mean over the {stats.get('loss_tokens', 0)} completion tokens of "
                             f"{counts['loss']} of {self.available} held-out rows{capped}, as in training; "
                             "perplexity = exp(loss)")
        if counts.get("answers"):
            described.append(f"answers: greedy, {counts['answers']} prompts (at most {MAX_GEN_ROWS}), up to "
                             f"{stats.get('max_new_tokens')} new tokens")
            described.append(f"format: {stats.get('cot', 0)} of them have a <think> reference; format_ok is the share "
                             "answered as <think>…</think> then a non-empty answer" if stats.get("cot") else
                             "format: not applicable, the held-out references have no <think> reasoning")
            described.append(f"exact match / F1: on the {stats['short']} answers whose reference is short (at most "
                             f"{SHORT_TOKENS} words, Chinese counted by characters), ignoring case, punctuation and "
                             "spacing" if stats.get("short") else
                             f"exact match / F1: not applicable, no sampled reference is short (at most "
                             f"{SHORT_TOKENS} words, Chinese counted by characters)")
        return {"rows": counts.get("loss", 0), "answers": counts.get("answers", 0), "short": stats.get("short", 0),
                "max_new_tokens": stats.get("max_new_tokens"), "before": self.before, "after": after,
                "notes": notes + described + self.notes}


def _has_adapter(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def _round(value: float | None, digits: int) -> float | None:
    return round(float(value), digits) if value is not None else None


def _empty_cuda_cache() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 - only a best effort to give memory back after a failure
        pass
