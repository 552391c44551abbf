"""Trial runs ("try it on 500 rows first"): a stratified sample of the data set and a short schedule.

``spec.sample_rows`` asks for one. The data set is read, checked and split exactly as for the full run (same
seed, same held-out rows); the sample is then drawn from each part — its training rows from the full run's
training rows, its held-out rows (the share ``eval_fraction`` gives, as always) from the full run's held-out
rows — so the trial's before/after comparison is on questions the full run holds out too.

Strata, the first that fits:

1. a category-like column the rows carry (``category``, ``label``, ``topic``, … — ``CATEGORY_COLUMNS``) with
   2 to ``MAX_STRATA`` distinct short values;
2. the answer itself when answers repeat (a classification-like data set), with 2 to ``MAX_STRATA`` values;
3. else the completion's length (reasoning + answer, in characters), in ``LENGTH_BINS`` quantile groups, so
   short and long answers are both in the sample.

Each stratum gets its proportional share (largest remainder), and at least one row when the part has room for
every stratum; rows within a stratum are drawn with a generator seeded by ``spec.seed`` and the stratum's name,
so the same spec always gives the same sample.

The schedule: unless the user set ``epochs`` or ``max_steps``, one epoch capped at ``TRIAL_MAX_STEPS``
optimizer steps. A data set with no more rows than asked is used whole, as a normal (full) job.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter, defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tools.finetune.data import Example, PreparedData, load_examples, read_records, render_rows, split_indices
from tools.finetune.spec import FinetuneSpec

TRIAL_MAX_STEPS = 200
MAX_STRATA = 50
LENGTH_BINS = 5
MAX_LABEL_CHARS = 80
CATEGORY_COLUMNS = ("category", "categories", "label", "class", "topic", "subject", "domain", "specialty",
                    "department", "type", "task", "difficulty", "level", "source", "language", "lang")
MISSING = "(none)"
SHOWN_STRATA = 12


def _norm(key: Any) -> str:
    return re.sub(r"[\s\-]+", "_", str(key).strip()).casefold()


def eval_count(n: int, eval_fraction: float) -> int:
    """Held-out rows of an ``n``-row data set (the rule of :func:`~tools.finetune.data.split_indices`)."""
    return 0 if n < 10 or eval_fraction <= 0 else min(n - 1, max(1, round(n * eval_fraction)))


def allocate(sizes: Mapping[str, int], n: int) -> dict[str, int]:
    """How many rows each stratum gives to a sample of ``n``: proportional to its size (largest remainder), at
    least one from each when ``n`` allows, never more than it has.

    Example:
        >>> allocate({"a": 900, "b": 90, "c": 10}, 100)
        {'a': 90, 'b': 9, 'c': 1}
        >>> allocate({"a": 997, "b": 1, "c": 2}, 10)
        {'a': 8, 'b': 1, 'c': 1}
    """
    keys = sorted(k for k, size in sizes.items() if size > 0)
    total = sum(sizes[k] for k in keys)
    if n >= total:
        return {k: sizes[k] for k in keys}
    quota = {k: n * sizes[k] / total for k in keys}
    least = 1 if len(keys) <= n else 0
    take = {k: min(sizes[k], max(least, math.floor(quota[k]))) for k in keys}
    while sum(take.values()) > n:          # the at-least-one rule overshot: give back where it is most over quota
        k = max((k for k in keys if take[k] > least), key=lambda k: (take[k] - quota[k], k))
        take[k] -= 1
    while sum(take.values()) < n:          # the largest remainders get the rows left
        k = max((k for k in keys if take[k] < sizes[k]), key=lambda k: (quota[k] - take[k], sizes[k], k))
        take[k] += 1
    return take


def stratified_pick(indices: list[int], keys: list[str], n: int, seed: int, part: str) -> list[int]:
    """``n`` of ``indices`` (row numbers), drawn stratum by stratum (``keys[i]`` is row i's stratum); sorted."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i in indices:
        groups[keys[i]].append(i)
    take = allocate({k: len(v) for k, v in groups.items()}, n)
    picked: list[int] = []
    for key in sorted(groups):
        # A string seed is hashed with SHA-512 by random.seed: the same sample in every process.
        picked += random.Random(f"{seed}:{part}:{key}").sample(groups[key], take.get(key, 0))
    return sorted(picked)


# ---- strata ----------------------------------------------------------------------------------------------

def _as_keys(values: list[Any], limit: int) -> list[str] | None:
    """Stratum names for a column's values, or None when it is not category-like (free text, nested values,
    one value, too many values, mostly missing)."""
    keys, missing = [], 0
    for v in values:
        if v is None or (isinstance(v, str) and not v.strip()):
            keys.append(MISSING)
            missing += 1
        elif isinstance(v, bool | int | float):
            keys.append(str(v))
        elif isinstance(v, str) and len(v.strip()) <= MAX_LABEL_CHARS:
            keys.append(v.strip())
        else:
            return None
    distinct = len(set(keys))
    if missing * 2 > len(keys) or not 2 <= distinct <= limit:
        return None
    return keys


def _category_values(path: Path, n: int) -> dict[str, list[Any]]:
    """The values of the category-like columns the file's first row has, for every row (read again, lazily)."""
    _, _, records = read_records(path)
    first = next(records, None)
    if first is None or not isinstance(first[1], dict):
        return {}
    by_norm = {_norm(k): k for k in first[1]}
    columns = [by_norm[c] for c in CATEGORY_COLUMNS if c in by_norm]
    if not columns:
        return {}
    values: dict[str, list[Any]] = {c: [first[1].get(c)] for c in columns}
    for _, record in records:
        for c in columns:
            values[c].append(record.get(c) if isinstance(record, dict) else None)
    return {c: v for c, v in values.items() if len(v) == n}


def choose_strata(examples: list[Example], columns: dict[str, list[Any]], limit: int) -> dict:
    """``{"by", "column", "keys", "groups", "label"}``: how the rows are grouped (see the module docstring)."""
    for column, values in columns.items():
        keys = _as_keys(values, limit)
        if keys is not None:
            return {"by": "column", "column": str(column), "keys": keys, "groups": len(set(keys))}
    keys = _as_keys([e.answer for e in examples], limit)
    if keys is not None:
        return {"by": "answer", "column": None, "keys": keys, "groups": len(set(keys))}
    lengths = [len(e.reasoning or "") + len(e.answer) for e in examples]
    order = sorted(range(len(examples)), key=lambda i: (lengths[i], i))
    bins = max(1, min(LENGTH_BINS, limit, len(examples)))
    keys = [""] * len(examples)
    bounds: dict[str, list[int]] = {}
    for rank, i in enumerate(order):
        key = f"q{rank * bins // len(examples) + 1}"
        keys[i] = key
        low, high = bounds.setdefault(key, [lengths[i], lengths[i]])
        bounds[key] = [min(low, lengths[i]), max(high, lengths[i])]
    return {"by": "length", "column": None, "keys": keys, "groups": bins,
            "bounds": {k: f"{lo:,}–{hi:,} chars" for k, (lo, hi) in sorted(bounds.items())}}


# ---- the trial -------------------------------------------------------------------------------------------

def trial_schedule(spec: FinetuneSpec, n_train: int) -> tuple[FinetuneSpec, int | None]:
    """The spec a trial trains with, and the step cap it added (None when the user chose the schedule or one
    epoch is short already)."""
    if spec.model_fields_set & {"epochs", "max_steps"}:
        return spec, None
    steps = max(1, math.ceil(math.ceil(n_train / spec.batch_size) / spec.grad_accum))
    if steps <= TRIAL_MAX_STEPS:
        return spec, None
    return spec.model_copy(update={"max_steps": TRIAL_MAX_STEPS}), TRIAL_MAX_STEPS


def memo_key(spec: FinetuneSpec, lang: str) -> tuple | None:
    """What, besides the spec's values, changes a trial's check: which schedule fields the user set, and the
    language of its note (None for a normal job)."""
    if spec.sample_rows is None:
        return None
    return tuple(sorted(spec.model_fields_set & {"epochs", "max_steps"})), lang


def prepare_data(spec: FinetuneSpec, path: Path, tokenizer) -> tuple[FinetuneSpec, PreparedData, dict | None]:
    """``(the spec to train with, the rendered rows, the trial)`` for a launch. Without ``sample_rows`` that is
    ``render_dataset``'s result and no trial; with it, the stratified sample, the short schedule and
    ``{"rows", "of", "train", "eval", "asked", "strata", "max_steps"}`` (``whole: True`` when the data set has no
    more rows than asked and is used whole)."""
    examples, fmt, container = load_examples(Path(path), spec.data_format)
    n = len(examples)
    train_idx, eval_idx = split_indices(n, spec.eval_fraction, spec.seed)
    if spec.sample_rows is None or spec.sample_rows >= n:
        data = render_rows(examples, train_idx, eval_idx, tokenizer, fmt, container)
        whole = None if spec.sample_rows is None else {"rows": n, "of": n, "asked": spec.sample_rows, "whole": True}
        return spec, data, whole
    n_eval = min(eval_count(spec.sample_rows, spec.eval_fraction), len(eval_idx))
    n_train = min(spec.sample_rows - n_eval, len(train_idx))
    strata = choose_strata(examples, _category_values(Path(path), n), max(2, min(MAX_STRATA, n_train)))
    keys = strata.pop("keys")
    train = stratified_pick(train_idx, keys, n_train, spec.seed, "train")
    held = stratified_pick(eval_idx, keys, n_eval, spec.seed, "eval")
    full, got = Counter(keys), Counter(keys[i] for i in [*train, *held])
    shown = sorted(full, key=lambda k: (-full[k], k))[:SHOWN_STRATA]
    strata["sample"] = {k: {"picked": got.get(k, 0), "of": full[k]} for k in shown}
    trained, cap = trial_schedule(spec, len(train))
    trial = {"rows": len(train) + len(held), "of": n, "train": len(train), "eval": len(held),
             "asked": spec.sample_rows, "strata": strata, "max_steps": cap, "seed": spec.seed}
    return trained, render_rows(examples, train, held, tokenizer, fmt, container), trial


def is_trial(trial: dict | None) -> bool:
    """A real sample (not a data set used whole)."""
    return bool(trial) and not trial.get("whole")


def spec_fields(trial: dict | None) -> dict:
    """What ``spec.json`` and the job record keep of the trial: ``{"trial": {...}}``, or nothing."""
    if not is_trial(trial):
        return {}
    return {"trial": {k: trial[k] for k in ("rows", "of", "train", "eval", "max_steps", "seed")} |
            {"strata": {k: v for k, v in trial["strata"].items() if k != "sample"}}}


def _strata_text(strata: dict, zh: bool) -> str:
    by, groups = strata["by"], strata["groups"]
    if by == "column":
        return f"按“{strata['column']}”列分层（{groups} 组，各组按比例抽取）" if zh else \
            f"stratified by the '{strata['column']}' column ({groups} groups, each in proportion)"
    if by == "answer":
        return f"按答案分层（{groups} 种答案）" if zh else f"stratified by the answer ({groups} distinct answers)"
    return f"按回答长度的 {groups} 个分位组分层" if zh else \
        f"stratified by answer length ({groups} quantile groups, so short and long answers are both in)"


def trial_warning(trial: dict, spec: FinetuneSpec, lang: str) -> dict:
    """The preflight's line about the trial: what was sampled, how, and the schedule — in ``lang``."""
    zh = lang == "zh"
    if trial.get("whole"):
        return {"level": "info", "code": "trial_whole_dataset", "message": (
            f"数据集只有 {trial['of']:,} 行，不多于要抽样的 {trial['asked']:,} 行：这次用全部数据，就是完整任务。"
            if zh else f"The data set has only {trial['of']:,} rows, not more than the {trial['asked']:,} you asked "
                       "to sample, so this job uses all of them: it is the full run.")}
    strata, cap = _strata_text(trial["strata"], zh), trial.get("max_steps")
    if zh:
        schedule = (f"短训练：1 轮，最多 {cap} 步" if cap else
                    "训练轮数/步数按你的设置" if spec.model_fields_set & {"epochs", "max_steps"} else "短训练：1 轮")
        message = (f"试跑：从 {trial['of']:,} 行中抽样 {trial['rows']:,} 行（训练 {trial['train']:,}，评估 "
                   f"{trial['eval']:,}，{strata}，评估行取自完整任务留出的行）；{schedule}。结束后说“跑完整的”即可"
                   f"用同样的配置在全部 {trial['of']:,} 行上训练。")
    else:
        schedule = (f"a short schedule: 1 epoch, at most {cap} steps" if cap else
                    "the epochs/steps you set" if spec.model_fields_set & {"epochs", "max_steps"} else
                    "a short schedule: 1 epoch")
        message = (f"Trial run: a sample of {trial['rows']:,} of {trial['of']:,} rows ({trial['train']:,} train, "
                   f"{trial['eval']:,} eval; {strata}; the eval rows come from the full run's held-out rows), "
                   f"with {schedule}. When it ends, say \"run the full job\" to train the same spec on all "
                   f"{trial['of']:,} rows.")
    return {"level": "info", "code": "trial_sample", "message": message}
