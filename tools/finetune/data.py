"""Read a fine-tune data set (JSONL / JSON / CSV / Parquet), check every row, and render prompt/completion pairs.

Row formats (``spec.data_format``, auto-detected from the first row by default; field names match
ignoring case, spaces and ``-``):

- chain-of-thought: ``{Question, Complex_CoT, Response}`` (FreedomIntelligence/medical-o1-reasoning-SFT),
  or ``question`` + ``complex_cot`` / ``cot`` / ``reasoning`` / ``chain_of_thought`` / ``thinking`` +
  ``response`` / ``answer``;
- chat: ``{messages: [{role, content}, …]}``, or ShareGPT ``{conversations: [{from, value}, …]}``
  (optional top-level ``system``); in CSV the column holds the list as JSON text;
- alpaca: ``{instruction, input, output}`` (``input`` optional).

Every mistake is a ``ToolError`` naming the file, the place (``line`` for JSONL, ``item`` for a JSON
list, ``row`` for CSV — spreadsheet numbering, the header is row 1 — and Parquet) and the field.
Rendering follows /work/ft_contract.md: the prompt is the conversation up to the (last) assistant turn
through the model's chat template (a plain ``### User:`` template without one); the completion is
the assistant text — ``<think>\\n…\\n</think>\\n\\n…`` for chain-of-thought rows — ending with EOS.
"""

from __future__ import annotations

import csv
import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from tools.base import ToolError

MAX_FILE_BYTES = 2 * 1024**3
MAX_JSON_BYTES = 512 * 1024**2     # a JSON document is parsed whole; bigger ones should be JSONL
MAX_ROWS = 5_000_000
MAX_TEXT_CHARS = 1_000_000
JSONL_SUFFIXES, JSON_SUFFIXES = (".jsonl", ".ndjson"), (".json",)
CSV_SUFFIXES, PARQUET_SUFFIXES = (".csv", ".tsv"), (".parquet", ".pq")

COT_KEYS = {"question": ("question",),
            "cot": ("complex_cot", "cot", "reasoning", "chain_of_thought", "thinking"),
            "response": ("response", "answer")}
COT_NEED = "chain-of-thought rows need Question, Complex_CoT, Response"
CHAT_NEED = "chat rows need messages: [{role, content}, …] or conversations: [{from, value}, …]"
ALPACA_NEED = "alpaca rows need instruction, output (and optionally input)"
FORMAT_NAMES = {"cot": "chain-of-thought", "chat": "chat", "alpaca": "alpaca"}
ROLES = {"system": "system", "user": "user", "human": "user", "prompter": "user", "assistant": "assistant",
         "gpt": "assistant", "model": "assistant", "bot": "assistant", "chatgpt": "assistant"}
_THINK = re.compile(r"<think>.*?</think>\s*", re.DOTALL)


@dataclass(slots=True)
class Example:
    """One checked row: the turns before the answer, the answer, and (CoT) the reasoning."""

    messages: list[dict[str, str]]
    answer: str
    reasoning: str | None
    question: str


@dataclass
class PreparedData:
    """A rendered, split data set: rows are ``{prompt, completion, question, reference}`` dicts."""

    train: list[dict[str, str]]
    eval: list[dict[str, str]]
    format: str
    container: str
    chat_template: bool
    notices: list[str] = field(default_factory=list)


@lru_cache(maxsize=4096)
def _norm(key: Any) -> str:
    return re.sub(r"[\s\-]+", "_", str(key).strip()).casefold()


# ---- containers ------------------------------------------------------------------------------------------

def _container(path: Path, head: bytes) -> str:
    suffix = path.suffix.lower()
    if suffix in PARQUET_SUFFIXES or head[:4] == b"PAR1":
        return "parquet"
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in CSV_SUFFIXES:
        return "csv"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if suffix in JSON_SUFFIXES or text[:1] in (b"[", b"{"):
        first = text.split(b"\n", 1)[0].strip()
        if text[:1] == b"{" and first.endswith(b"}") and b"\n" in text.strip():
            try:                                    # one object per line: JSONL saved as .json
                json.loads(first)
                return "jsonl"
            except ValueError:
                pass
        return "json"
    raise ToolError("bad_data", f"{path.name}: I read JSONL, JSON, CSV or Parquet files "
                                "(.jsonl, .json, .csv, .tsv, .parquet).")


def _read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open("rb") as fh:
        for no, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8-sig" if no == 1 else "utf-8")
            except UnicodeDecodeError:
                raise ToolError("bad_data", f"{path.name} line {no}: not valid UTF-8 text.") from None
            try:
                yield no, json.loads(text)
            except json.JSONDecodeError as e:
                raise ToolError("bad_data", f"{path.name} line {no}: not valid JSON "
                                            f"({e.msg} at column {e.colno}).") from None


def _read_json(path: Path, size: int) -> Iterator[tuple[int, Any]]:
    if size > MAX_JSON_BYTES:
        raise ToolError("too_large", f"{path.name} is {size / 2**20:,.0f} MB; a JSON document is read whole, so the "
                                     f"limit is {MAX_JSON_BYTES // 2**20} MB. Save it as JSONL (one row per line).")
    try:
        doc = json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise ToolError("bad_data", f"{path.name}: not valid UTF-8 text.") from None
    except json.JSONDecodeError as e:
        hint = "; one row per line is JSONL — name the file .jsonl" if e.msg == "Extra data" else ""
        raise ToolError("bad_data", f"{path.name} line {e.lineno}: not valid JSON ({e.msg} at column {e.colno})"
                                    f"{hint}.") from None
    if isinstance(doc, dict) and isinstance(doc.get("data"), list):
        doc = doc["data"]
    if not isinstance(doc, list):
        raise ToolError("bad_data", f"{path.name}: expected a JSON list of rows, or {{\"data\": [rows]}}.")
    yield from enumerate(doc, 1)


def _read_csv(path: Path, head: bytes) -> Iterator[tuple[int, Any]]:
    encoding = "utf-8-sig"
    try:
        head.decode(encoding)
    except UnicodeDecodeError as e:
        if e.start < len(head) - 4:                 # not just a character cut at the end of the sample
            encoding = "gb18030"
    first = head.decode(encoding, errors="ignore").split("\n", 1)[0]
    delimiter = "\t" if path.suffix.lower() == ".tsv" else max(",;\t|", key=first.count)
    csv.field_size_limit(64 * 1024**2)
    with path.open("r", encoding=encoding, newline="") as fh:
        reader = csv.reader(fh, delimiter=delimiter)
        try:
            header = [h.strip() for h in next(reader, [])]
            for row_no, record in enumerate(reader, 2):      # spreadsheet numbering: the header is row 1
                if not any(cell.strip() for cell in record):
                    continue
                if len(record) != len(header):
                    raise ToolError("bad_data", f"{path.name} row {row_no}: {len(record)} fields, but the header "
                                                f"has {len(header)} ({', '.join(header)}).")
                yield row_no, dict(zip(header, record, strict=True))
        except (csv.Error, UnicodeDecodeError) as e:
            raise ToolError("bad_data", f"{path.name}: I can't read it as CSV ({e}).") from None


def _read_parquet(path: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise ToolError("bad_data", f"I can't read {path.name} as Parquet: {e}") from None
    if pf.metadata.num_rows > MAX_ROWS:
        raise ToolError("too_large", f"{path.name} has {pf.metadata.num_rows:,} rows; the limit is {MAX_ROWS:,}. "
                                     "Sample it down first.")
    no = 0
    for batch in pf.iter_batches(batch_size=8192):
        for record in batch.to_pylist():
            no += 1
            yield no, record


def read_records(path: Path) -> tuple[str, str, Iterator[tuple[int, Any]]]:
    """``(container, unit, records)`` for the file; records are ``(place number, raw record)``, lazily read."""
    if path.is_dir():
        raise ToolError("bad_data", f"{path.name} is a folder, not a data file.")
    if not path.exists():
        raise ToolError("not_found", f"I can't find {path.name}.")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise ToolError("too_large", f"{path.name} is {size / 2**30:.1f} GB; the limit is "
                                     f"{MAX_FILE_BYTES // 2**30} GB. Sample it down first.")
    with path.open("rb") as fh:
        head = fh.read(1 << 16)
    if not head.strip():
        raise ToolError("bad_data", f"{path.name} is empty.")
    kind = _container(path, head)
    if kind == "jsonl":
        return kind, "line", _read_jsonl(path)
    if kind == "json":
        return kind, "item", _read_json(path, size)
    if kind == "csv":
        return kind, "row", _read_csv(path, head)
    return kind, "row", _read_parquet(path)


# ---- rows ------------------------------------------------------------------------------------------------

def detect_format(record: dict) -> str | None:
    """``cot`` / ``chat`` / ``alpaca`` from a row's field names, or None."""
    return _detect({_norm(k) for k in record})


def _detect(keys) -> str | None:
    if keys & {"messages", "conversations"}:
        return "chat"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if keys & {*COT_KEYS["question"], *COT_KEYS["cot"]}:
        return "cot"
    return None


class _RowError(Exception):
    """A problem with one row; the caller adds the file name and place."""


def _text(record: dict, by_norm: dict, names: tuple[str, ...], shown: str, *, optional: bool = False) -> str:
    key = next((by_norm[n] for n in names if n in by_norm), None)
    if key is None or (optional and record[key] in (None, "")):
        if optional:
            return ""
        raise _RowError(f"missing field {shown!r}")
    value = record[key]
    if value is None:
        raise _RowError(f"field {key!r} is empty (null)")
    if not isinstance(value, str):
        raise _RowError(f"field {key!r} must be text, not {_type_name(value)}")
    if len(value) > MAX_TEXT_CHARS:
        raise _RowError(f"field {key!r} has {len(value):,} characters; the limit is {MAX_TEXT_CHARS:,}")
    value = value.strip()
    if not value and not optional:
        raise _RowError(f"field {key!r} is empty")
    return value


def _type_name(value: Any) -> str:
    kinds = {bool: "true/false", int: "a number", float: "a number", list: "a list", dict: "an object"}
    return next((name for t, name in kinds.items() if isinstance(value, t)), type(value).__name__)


def _cot(record: dict, by_norm: dict, upper: bool) -> Example:
    names = ("Question", "Complex_CoT", "Response") if upper else ("question", "complex_cot", "response")
    question = _text(record, by_norm, COT_KEYS["question"], names[0])
    reasoning = _text(record, by_norm, COT_KEYS["cot"], names[1])
    answer = _text(record, by_norm, COT_KEYS["response"], names[2])
    return Example([{"role": "user", "content": question}], answer, reasoning, question)


def _alpaca(record: dict, by_norm: dict) -> Example:
    instruction = _text(record, by_norm, ("instruction",), "instruction")
    extra = _text(record, by_norm, ("input",), "input", optional=True)
    answer = _text(record, by_norm, ("output",), "output")
    question = f"{instruction}\n\n{extra}" if extra else instruction
    return Example([{"role": "user", "content": question}], answer, None, question)


def _chat(record: dict, by_norm: dict) -> Example:
    key = by_norm.get("messages") or by_norm.get("conversations")
    if key is None:
        raise _RowError("missing field 'messages'")
    turns = record[key]
    if isinstance(turns, str):                       # CSV: the list is JSON text in one cell
        try:
            turns = json.loads(turns)
        except json.JSONDecodeError as e:
            raise _RowError(f"field {key!r} is not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(turns, list) or not turns:
        raise _RowError(f"field {key!r} must be a non-empty list of turns ({CHAT_NEED})")
    messages = []
    system = record.get(by_norm.get("system", "\0"))
    if isinstance(system, str) and system.strip():
        messages.append({"role": "system", "content": system.strip()})
    for j, turn in enumerate(turns, 1):
        where = f"{key}[{j}]"
        if not isinstance(turn, dict):
            raise _RowError(f"{where} must be an object with role and content, not {_type_name(turn)}")
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if not isinstance(role, str) or role.strip().lower() not in ROLES:
            raise _RowError(f"{where}: unknown role {role!r} (use system, user or assistant)")
        if isinstance(content, list):                # OpenAI-style content parts: keep the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if not isinstance(content, str):
            raise _RowError(f"{where}: content must be text, not {_type_name(content)}")
        role, content = ROLES[role.strip().lower()], content.strip()
        if not content:
            if role == "system":
                continue
            raise _RowError(f"{where}: the {role} turn is empty")
        messages.append({"role": role, "content": content})
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise _RowError(f"field {key!r} has no assistant turn to learn from")
    users = [m["content"] for m in messages[:last] if m["role"] == "user"]
    if not users:
        raise _RowError(f"field {key!r} has no user turn before the last assistant turn")
    return Example(messages[:last], messages[last]["content"], None, users[-1])


def load_examples(path: Path, data_format: str = "auto") -> tuple[list[Example], str, str]:
    """Every row of ``path`` checked and normalised → ``(examples, format, container)``; ``ToolError`` otherwise."""
    container, unit, records = read_records(path)
    examples: list[Example] = []
    fmt, first_place, upper = (None if data_format == "auto" else data_format), None, False
    for place, record in records:
        where = f"{path.name} {unit} {place}"
        if len(examples) >= MAX_ROWS:
            raise ToolError("too_large", f"{path.name} has more than {MAX_ROWS:,} rows; the limit is {MAX_ROWS:,}. "
                                         "Sample it down first.")
        if not isinstance(record, dict):
            raise ToolError("bad_data", f"{where}: expected an object with named fields, not {_type_name(record)}.")
        by_norm = {_norm(k): k for k in record}
        seen = _detect(by_norm.keys())
        if fmt is None:
            if seen is None:
                fields = ", ".join(map(str, record)) or "none"
                raise ToolError("bad_data", f"{where}: I can't tell the row format from its fields ({fields}); "
                                            f"{COT_NEED}, {CHAT_NEED}, or {ALPACA_NEED}.")
            fmt = seen
        if first_place is None:
            first_place = place
            upper = "Question" in record or "Response" in record or "Complex_CoT" in record
        if seen is not None and seen != fmt:
            said = "data_format asks for" if data_format != "auto" else f"{unit} {first_place} has"
            raise ToolError("bad_data", f"{where}: this row has {FORMAT_NAMES[seen]} fields, but {said} "
                                        f"{FORMAT_NAMES[fmt]} rows; a data set must use one format.")
        try:
            examples.append(_cot(record, by_norm, upper) if fmt == "cot" else _chat(record, by_norm)
                            if fmt == "chat" else _alpaca(record, by_norm))
        except _RowError as e:
            need = {"cot": COT_NEED, "chat": CHAT_NEED, "alpaca": ALPACA_NEED}[fmt]
            hint = f" ({need})" if str(e).startswith("missing field") else ""
            raise ToolError("bad_data", f"{where}: {e}{hint}.") from None
    if not examples:
        raise ToolError("bad_data", f"{path.name} has no rows.")
    return examples, fmt, container


# ---- rendering -------------------------------------------------------------------------------------------

def _plain_prompt(messages: list[dict[str, str]]) -> str:
    names = {"system": "System", "user": "User", "assistant": "Assistant"}
    return "".join(f"### {names[m['role']]}:\n{m['content']}\n\n" for m in messages) + "### Assistant:\n"


def _templated_prompt(tokenizer, messages: list[dict[str, str]]) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # jinja2 TemplateError and friends; a template may refuse a system turn
        if messages[0]["role"] == "system" and len(messages) > 1:
            merged = [{"role": messages[1]["role"], "content": f"{messages[0]['content']}\n\n{messages[1]['content']}"}]
            return _templated_prompt(tokenizer, merged + messages[2:])
        raise ToolError("bad_model", f"The model's chat template failed on a row: {e}") from None


def _has_template(tokenizer) -> bool:
    return tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))


def render_prompts(conversations: list[list[dict[str, str]]], tokenizer=None) -> list[str]:
    """Prompts for many conversations: the chat template in batches (faster), row by row if a batch fails."""
    if not _has_template(tokenizer):
        return [_plain_prompt(m) for m in conversations]
    prompts: list[str] = []
    for start in range(0, len(conversations), 512):
        chunk = conversations[start:start + 512]
        try:
            prompts.extend(tokenizer.apply_chat_template(chunk, tokenize=False, add_generation_prompt=True))
        except Exception:  # noqa: BLE001 - retried row by row below, where errors become ToolErrors
            prompts.extend(_templated_prompt(tokenizer, m) for m in chunk)
    return prompts


def render(example: Example, tokenizer=None, prompt: str | None = None) -> dict[str, str]:
    """The contract's ``{prompt, completion, question, reference}`` for one example (``prompt``: pre-rendered)."""
    if prompt is None:
        prompt = render_prompts([example.messages], tokenizer)[0]
    completion = example.answer
    if example.reasoning is not None:
        completion = f"<think>\n{example.reasoning}\n</think>\n\n{example.answer}"
        if prompt.rstrip(" ").endswith("<think>\n"):  # templates (R1 distills) that open the think block already
            completion = completion[len("<think>\n"):]
    eos = getattr(tokenizer, "eos_token", None) or ""
    if eos and not completion.endswith(eos):
        completion += eos
    reference = _THINK.sub("", example.answer).strip() or example.answer
    return {"prompt": prompt, "completion": completion, "question": example.question, "reference": reference}


def split_indices(n: int, eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Train and eval row indices: ``round(n × fraction)`` eval rows, at least 1 when n ≥ 10, none below."""
    n_eval = 0 if n < 10 or eval_fraction <= 0 else min(n - 1, max(1, round(n * eval_fraction)))
    held = set(random.Random(seed).sample(range(n), n_eval))
    return [i for i in range(n) if i not in held], sorted(held)


def render_dataset(spec, path: Path, tokenizer=None) -> PreparedData:
    """Read, check, split (``spec.eval_fraction``, ``spec.seed``) and render the data set, in memory."""
    examples, fmt, container = load_examples(Path(path), spec.data_format)
    train_idx, eval_idx = split_indices(len(examples), spec.eval_fraction, spec.seed)
    return render_rows(examples, train_idx, eval_idx, tokenizer, fmt, container)


def render_rows(examples: list[Example], train_idx: list[int], eval_idx: list[int], tokenizer, fmt: str,
                container: str) -> PreparedData:
    """The chosen rows of a checked data set rendered (``train_idx`` / ``eval_idx`` index ``examples``; a trial
    renders only its sample)."""
    has_template = _has_template(tokenizer)
    notices = [] if has_template else ["The model has no chat template; prompts use a plain '### User:' layout."]
    wanted = [*train_idx, *eval_idx]
    prompts = dict(zip(wanted, render_prompts([examples[i].messages for i in wanted], tokenizer), strict=True))
    return PreparedData(train=[render(examples[i], tokenizer, prompts[i]) for i in train_idx],
                        eval=[render(examples[i], tokenizer, prompts[i]) for i in eval_idx],
                        format=fmt, container=container, chat_template=has_template, notices=notices)


def _write_jsonl(rows: list[dict], target: Path) -> None:
    with target.open("w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def prepare_dataset(spec, path: Path, tokenizer, out_dir: Path) -> dict:
    """Render the data set and write ``out_dir/train.jsonl`` and ``out_dir/eval.jsonl``; returns stats."""
    data = render_dataset(spec, path, tokenizer)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_jsonl(data.train, out_dir / "train.jsonl")
    _write_jsonl(data.eval, out_dir / "eval.jsonl")
    return {"format": data.format, "container": data.container, "rows": len(data.train) + len(data.eval),
            "train_rows": len(data.train), "eval_rows": len(data.eval), "chat_template": data.chat_template,
            "eos_token": getattr(tokenizer, "eos_token", None), "train_path": str(out_dir / "train.jsonl"),
            "eval_path": str(out_dir / "eval.jsonl"), "notices": data.notices}


def read_prepared(run_data_dir: Path) -> PreparedData:
    """A prepared ``train.jsonl`` / ``eval.jsonl`` pair read back (format and container unknown: ``prepared``)."""
    rows = {}
    for name in ("train", "eval"):
        target = Path(run_data_dir) / f"{name}.jsonl"
        rows[name] = [json.loads(ln) for ln in target.read_text(encoding="utf-8").splitlines() if ln.strip()] \
            if target.exists() else []
    return PreparedData(train=rows["train"], eval=rows["eval"], format="prepared", container="jsonl",
                        chat_template=False)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(base_model_path: str | Path | None):
    """The tokenizer of a local model directory (offline), or None when it has no tokenizer files."""
    if base_model_path is None:
        return None
    folder = Path(base_model_path)
    if not folder.is_dir() or not any((folder / f).is_file() for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # transformers raises OSError/ValueError/… for broken tokenizer files
        raise ToolError("bad_model", f"I can't load the tokenizer in {folder.name}: {e}") from None
