"""Read a CSV/Parquet table safely and turn it into a clean feature matrix and a target.

Encoding (UTF-8, UTF-8 with BOM, GBK/GB18030, Latin-1), delimiter and decimal commas are detected
unless named; sizes are bounded; ID-like and constant columns are dropped with a notice; text
columns become pandas ``category`` columns (XGBoost reads them natively); mostly-numeric columns
with a few stray strings become numbers with the strays treated as missing.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tools.base import ToolError

MAX_FILE_BYTES = 512 * 1024 * 1024
MAX_COLUMNS = 2000
MAX_ROWS_READ = 2_000_000
MIN_ROWS = 10
MAX_CLASSES = 20
MAX_LEVELS = 100           # more categories than this: the rare ones become "(other)"
CSV_SUFFIXES = (".csv", ".tsv", ".txt")
PARQUET_SUFFIXES = (".parquet", ".pq")
_ID_NAME = re.compile(r"^(id|uuid|guid|index|key|row|rowid|row_id|unnamed: ?\d+)$|(_id|Id|ID|编号)$", re.IGNORECASE)


@dataclass
class Table:
    """A cleaned table: features ``X`` (DataFrame), raw target, what was dropped and why."""

    frame: Any                      # the DataFrame as read (after dropping rows without a target)
    X: Any
    y: Any
    target: str
    name: str
    id_columns: list[str] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)


def _sniff_encoding(raw: bytes, named: str | None) -> str:
    if named:
        try:
            raw[:4096].decode(named, errors="strict")
        except LookupError:
            raise ToolError("invalid_args", f"I don't know the text encoding {named!r}.") from None
        except UnicodeDecodeError:
            pass  # the user said so; the full read will tell
        return named
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "utf-16"
    if b"\x00" in raw[:8192]:
        raise ToolError("bad_data", "The file looks binary, not like a CSV text file (it contains NUL bytes).")
    for enc in ("utf-8-sig", "gb18030"):
        try:
            raw.decode(enc)
            return enc
        except UnicodeDecodeError as e:
            if e.start >= len(raw) - 4:      # a character cut at the end of the sample
                return enc
    return "latin-1"


def _sniff_dialect(text: str, delimiter: str | None, decimal: str | None) -> tuple[str, str]:
    lines = [ln for ln in text.splitlines()[:50] if ln.strip()]
    if delimiter is None:
        try:
            delimiter = csv.Sniffer().sniff("\n".join(lines[:20]), delimiters=",;\t|").delimiter
        except csv.Error:
            delimiter = ","
    if decimal is None:
        body = "\n".join(lines[1:])
        decimal = "," if delimiter != "," and re.search(r"(^|[;\t|])-?\d+,\d+([;\t|]|$)", body, re.M) else "."
    return delimiter, decimal


def read_table(path: Path, *, encoding: str | None = None, delimiter: str | None = None,
               decimal: str | None = None, notices: list[str]) -> tuple[Any, dict]:
    """The file as a DataFrame plus the settings used to read it; ``ToolError`` for what can't be read."""
    import pandas as pd

    if path.is_dir():
        raise ToolError("bad_data", f"{path.name} is a folder, not a CSV or Parquet file.")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise ToolError("too_large", f"{path.name} is {size / 2**20:.0f} MB; the limit is "
                                     f"{MAX_FILE_BYTES // 2**20} MB. Sample it down first.")
    if size == 0:
        raise ToolError("bad_data", f"{path.name} is empty.")
    suffix = path.suffix.lower()
    with path.open("rb") as fh:
        head = fh.read(1 << 20)
    if suffix in PARQUET_SUFFIXES or head[:4] == b"PAR1":
        return _read_parquet(path), {"format": "parquet"}
    if suffix not in CSV_SUFFIXES:
        raise ToolError("bad_data", f"{path.name}: I read CSV (.csv/.tsv/.txt) or Parquet (.parquet) files.")
    enc = _sniff_encoding(head, encoding)
    text = head.decode(enc, errors="ignore")
    if not text.strip():
        raise ToolError("bad_data", f"{path.name} is empty.")
    sep, dec = _sniff_dialect(text, delimiter, decimal)
    header = next(csv.reader([text.lstrip("\ufeff").splitlines()[0]], delimiter=sep), [])
    if len(header) > MAX_COLUMNS + 1:
        raise ToolError("too_large", f"{path.name} has {len(header):,} columns; the limit is {MAX_COLUMNS:,}. "
                                     "Pick the columns to use with `features`, or trim the file.")
    try:
        frame = pd.read_csv(path, sep=sep, decimal=dec, encoding=enc, nrows=MAX_ROWS_READ, low_memory=False,
                            thousands=None, skipinitialspace=True)
    except pd.errors.EmptyDataError:
        raise ToolError("bad_data", f"{path.name} is empty.") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as e:
        raise ToolError("bad_data", f"I can't parse {path.name} as CSV: {str(e).splitlines()[0][:200]}") from None
    if len(frame) >= MAX_ROWS_READ:
        notices.append(f"Only the first {MAX_ROWS_READ:,} rows of {path.name} were read.")
    return frame, {"format": "csv", "encoding": enc, "delimiter": sep, "decimal": dec}


def _read_parquet(path: Path):
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise ToolError("bad_data", f"I can't read {path.name} as Parquet: {e}") from None
    if len(meta.schema_arrow) > MAX_COLUMNS + 1:
        raise ToolError("too_large", f"{path.name} has {len(meta.schema_arrow):,} columns; the limit is "
                                     f"{MAX_COLUMNS:,}.")
    if meta.metadata.num_rows > MAX_ROWS_READ:
        raise ToolError("too_large", f"{path.name} has {meta.metadata.num_rows:,} rows; the limit is "
                                     f"{MAX_ROWS_READ:,}. Sample it down first.")
    return meta.read().to_pandas()


def columns_text(columns, limit: int = 40) -> str:
    names = [str(c) for c in columns]
    shown = ", ".join(names[:limit])
    return shown + (f" … ({len(names) - limit} more)" if len(names) > limit else "")


def match_column(name: str, columns) -> str | None:
    """``name`` as it is spelled in the file: exact, then ignoring case, spaces, ``-`` and ``_``."""
    cols = [str(c) for c in columns]
    if name in cols:
        return name

    def norm(s: str) -> str:
        return re.sub(r"[\s_\-]+", "", s).casefold()

    hits = [c for c in cols if norm(c) == norm(name)]
    return hits[0] if len(hits) == 1 else None


def resolve_target(target: str | None, frame, file_name: str, lang: str = "en") -> str:
    """The target column, matched leniently; otherwise a question listing the columns (in the user's language)."""
    cols = columns_text(frame.columns)
    if not target or not target.strip():
        if lang == "zh":
            raise ToolError("missing_target", f"{file_name} 里哪一列是模型要预测的目标？现有的列：{cols}。")
        raise ToolError("missing_target", f"Which column of {file_name} should the model predict? "
                                          f"Its columns are: {cols}. Tell me the target column.")
    found = match_column(target.strip(), frame.columns)
    if found is None:
        if lang == "zh":
            raise ToolError("unknown_target", f"{file_name} 里没有 {target!r} 这一列。现有的列：{cols}。哪一列是目标？")
        raise ToolError("unknown_target", f"{file_name} has no column {target!r}. Its columns are: {cols}. "
                                          "Which one is the target?")
    return found


def _is_id_like(col, s) -> bool:
    import pandas as pd

    n = len(s)
    if n < 20 or s.isna().any():
        return False
    unique = s.nunique()
    if pd.api.types.is_float_dtype(s):
        return False
    if pd.api.types.is_integer_dtype(s):
        if unique != n:
            return False
        d = s.sort_values().diff().dropna()
        return bool(_ID_NAME.search(str(col))) or bool((d == 1).all())
    return unique == n or (bool(_ID_NAME.search(str(col))) and unique > 0.9 * n)


def clean_features(frame, target: str, include: list[str] | None, exclude: list[str] | None,
                   notices: list[str], warnings: list[str]) -> tuple[Any, list[str]]:
    """Pick, convert and filter the feature columns → (X, ID-like columns dropped)."""
    import pandas as pd

    cols = [c for c in frame.columns if c != target]
    for label, chosen in (("features", include), ("exclude", exclude)):
        missing = [c for c in chosen or [] if match_column(c, frame.columns) is None]
        if missing:
            raise ToolError("unknown_column", f"{label}: no column(s) {', '.join(map(repr, missing))}. "
                                              f"The columns are: {columns_text(frame.columns)}.")
    if include:
        cols = [match_column(c, frame.columns) for c in include if match_column(c, frame.columns) != target]
    if exclude:
        drop = {match_column(c, frame.columns) for c in exclude}
        cols = [c for c in cols if c not in drop]
    X = pd.DataFrame(index=frame.index)
    ids, constant = [], []
    for col in cols:
        s = frame[col]
        if s.nunique(dropna=False) <= 1:
            constant.append(str(col))
            continue
        if _is_id_like(col, s):
            ids.append(str(col))
            continue
        X[col] = _convert(col, s, notices)
    if ids:
        notices.append(f"Dropped ID-like column(s) {', '.join(ids)}: a unique value per row explains nothing.")
        warnings.append(f"ID-like column(s) {', '.join(ids)} were left out of the model.")
    if constant:
        notices.append(f"Dropped constant column(s) {', '.join(constant)}.")
    if X.shape[1] == 0:
        raise ToolError("bad_data", "No usable feature columns are left (all were the target, constant or ID-like).")
    return X, ids


def _convert(col, s, notices: list[str]):
    """Numbers stay numbers; text with few stray values becomes numbers; other text becomes categories."""
    import pandas as pd

    if pd.api.types.is_bool_dtype(s):
        return s.astype("float64")
    if pd.api.types.is_numeric_dtype(s):
        return s.astype("float64")
    if pd.api.types.is_datetime64_any_dtype(s):
        notices.append(f"Column {col}: dates were turned into numbers (days since 1970).")
        return (s.astype("int64") // 86_400_000_000_000).astype("float64").where(s.notna())
    text = s.astype("string").str.strip()
    numbers = pd.to_numeric(text, errors="coerce")
    present = text.notna() & (text != "")
    bad = present & numbers.isna()
    if present.sum() and bad.sum() <= 0.1 * present.sum() and numbers.notna().any():
        if bad.any():
            stray = ", ".join(repr(v) for v in text[bad].unique()[:3])
            notices.append(f"Column {col}: {int(bad.sum())} non-numeric value(s) ({stray}) treated as missing.")
        return numbers.astype("float64")
    text = text.where(present)
    counts = text.value_counts()
    if len(counts) > MAX_LEVELS:
        keep = set(counts.index[:MAX_LEVELS])
        text = text.where(text.isna() | text.isin(keep), "(other)")
        notices.append(f"Column {col}: {len(counts)} categories; the {len(counts) - MAX_LEVELS} rarest "
                       "were merged into '(other)'.")
    return pd.Categorical(text.astype(object).where(text.notna(), None))


def prepare_table(path: Path, args, notices: list[str], warnings: list[str], lang: str = "en") -> Table:
    """Read ``path`` and split it into features and a target per the tool's ``args``."""
    import pandas as pd

    frame, settings = read_table(path, encoding=args.encoding, delimiter=args.delimiter, decimal=args.decimal,
                                 notices=notices)
    frame.columns = [str(c).strip() for c in frame.columns]
    if len(frame.columns) > MAX_COLUMNS + 1:
        raise ToolError("too_large", f"{path.name} has {len(frame.columns):,} columns; the limit is {MAX_COLUMNS:,}.")
    if len(frame) == 0:
        raise ToolError("bad_data", f"{path.name} has a header but no data rows.")
    target = resolve_target(args.target, frame, path.name, lang)
    y = frame[target]
    if not pd.api.types.is_numeric_dtype(y) and not pd.api.types.is_bool_dtype(y):
        y = y.astype("string").str.strip().replace("", pd.NA)
    keep = y.notna()
    if not keep.any():
        raise ToolError("bad_data", f"The target column {target!r} has no values (all {len(frame)} are missing).")
    if not keep.all():
        notices.append(f"Dropped {int((~keep).sum())} row(s) whose target {target!r} is missing.")
        frame, y = frame[keep], y[keep]
    if len(frame) < MIN_ROWS:
        raise ToolError("too_small", f"{path.name} has {len(frame)} usable row(s); I need at least {MIN_ROWS} "
                                     "(and 50+ for results worth reading).")
    if y.nunique() <= 1:
        raise ToolError("bad_data", f"The target {target!r} has the same value ({y.iloc[0]!r}) in every row; "
                                    "there is nothing to predict.")
    table = Table(frame=frame, X=None, y=y, target=target, name=path.name, notices=notices, warnings=warnings,
                  settings=settings)
    table.X, table.id_columns = clean_features(frame, target, args.features, args.exclude, notices, warnings)
    return table

