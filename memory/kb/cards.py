"""Curated concept cards: the YAML files under ``memory/kb/cards/``, read and checked.

A card is one concept in two languages. The files are meant to be read and extended by people,
so the checks here say exactly which file, card and field is wrong.

Example:
    >>> cards = load_cards()
    >>> len(cards) >= 150 and all(c.en.title and c.zh.title for c in cards)
    True

Check files by hand: ``python -m memory.kb.cards [FILE.yaml ...]``.
"""

from __future__ import annotations

import hashlib
import re
import sys
from functools import lru_cache
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

CARDS_DIR = Path(__file__).with_name("cards")
CATEGORIES = ("application", "interface & tooling", "models", "frameworks & algorithms", "hardware")
ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{1,60}$")
_CJK = re.compile(r"[\u4e00-\u9fff]")
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C loader is ~10× faster where libyaml exists


class CardError(ValueError):
    """A card file that cannot be used, with the file, card and field named."""


_CJK_GAP = re.compile(r"(?<=[\u3000-\u303f\u4e00-\u9fff\uff00-\uffef])\s+(?=[\u3000-\u303f\u4e00-\u9fff\uff00-\uffef])")


def _tidy(text: str) -> str:
    """Folded YAML joins wrapped lines with a space; between Chinese characters that space is wrong."""
    return _CJK_GAP.sub("", " ".join(text.split()))


class Side(BaseModel):
    """One language's text of a card."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("title", "definition", "intuition", "when", mode="before")
    @classmethod
    def _tidy_text(cls, value):
        return _tidy(value) if isinstance(value, str) else value

    @field_validator("how", "pitfalls", mode="before")
    @classmethod
    def _tidy_items(cls, value):
        return [_tidy(v) if isinstance(v, str) else v for v in value] if isinstance(value, list) else value

    title: str = Field(min_length=2, max_length=120)
    definition: str = Field(min_length=20, max_length=1200)
    intuition: str = Field(min_length=10, max_length=800)
    how: list[str] = Field(min_length=2, max_length=8)
    when: str = Field(min_length=10, max_length=1000)
    pitfalls: list[str] = Field(min_length=1, max_length=6)


class Card(BaseModel):
    """A concept: id, category, aliases, related ids, sources, and an English and a Chinese side."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    category: Literal[CATEGORIES]  # type: ignore[valid-type]
    aliases: list[str] = Field(default_factory=list, max_length=40)
    related: list[str] = Field(default_factory=list, max_length=12)
    sources: list[str] = Field(min_length=1, max_length=8)
    en: Side
    zh: Side
    file: str = ""

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        if not ID_RE.match(value):
            raise ValueError("ids are lower-case letters, digits and '-', 2–61 characters")
        return value

    @field_validator("zh")
    @classmethod
    def _chinese(cls, side: Side) -> Side:
        if not _CJK.search(side.definition):
            raise ValueError("the zh side must be written in Chinese")
        return side

    def side(self, lang: str) -> Side:
        return self.zh if lang == "zh" else self.en

    def names(self) -> list[str]:
        """Titles and aliases: every way a user may name this concept."""
        seen: dict[str, None] = {}
        for name in (self.en.title, self.zh.title, *self.aliases):
            seen.setdefault(name.strip(), None)
        return [n for n in seen if n]


def _read(path: Path) -> list[Card]:
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_LOADER)  # noqa: S506 - a safe loader
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise CardError(f"{path.name}: cannot read it as YAML ({exc})") from None
    if not isinstance(raw, list):
        raise CardError(f"{path.name}: expected a list of cards at the top level")
    cards = []
    for index, item in enumerate(raw):
        label = item.get("id", f"#{index + 1}") if isinstance(item, dict) else f"#{index + 1}"
        try:
            cards.append(Card.model_validate({**item, "file": path.name}))
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise CardError(f"{path.name}, card {label}: {problems}") from None
        except TypeError:
            raise CardError(f"{path.name}, card {label}: a card is a mapping of fields") from None
    return cards


def check_cards(cards: list[Card]) -> None:
    """Ids are unique and every ``related`` id names a card."""
    ids: dict[str, str] = {}
    for card in cards:
        if card.id in ids:
            raise CardError(f"card id {card.id!r} is in both {ids[card.id]} and {card.file}")
        ids[card.id] = card.file
    for card in cards:
        missing = [r for r in card.related if r not in ids]
        if missing:
            raise CardError(f"{card.file}, card {card.id}: related ids {missing} are not cards")


def read_cards(paths: list[Path]) -> list[Card]:
    cards = [card for path in sorted(paths) for card in _read(path)]
    check_cards(cards)
    return cards


@lru_cache(maxsize=1)
def _load_shipped(fingerprint: str) -> tuple[Card, ...]:
    return tuple(read_cards(list(CARDS_DIR.glob("*.yaml"))))


def cards_fingerprint(directory: Path = CARDS_DIR) -> str:
    """A hash of the shipped card files: the index is rebuilt when it changes."""
    digest = hashlib.sha256()
    for path in sorted(directory.glob("*.yaml")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def load_cards() -> list[Card]:
    """All shipped cards, checked (cached until the files change)."""
    return list(_load_shipped(cards_fingerprint()))


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    try:
        if args:
            cards = [c for p in args for c in _read(Path(p))]
            shipped = []
            for path in CARDS_DIR.glob("*.yaml"):
                try:
                    shipped += _read(path)
                except CardError:
                    pass  # another file being written; only the named files are checked here
            ids = {c.id for c in shipped} | {c.id for c in cards}
            for card in cards:
                missing = [r for r in card.related if r not in ids]
                if missing:
                    print(f"note: {card.file}, card {card.id}: related ids not (yet) cards: {missing}")
        else:
            cards = load_cards()
    except CardError as exc:
        print(f"error: {exc}")
        return 1
    print(f"ok: {len(cards)} cards")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
