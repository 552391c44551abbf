"""Concept names in a question: exact and one-typo matches of card titles and aliases.

A name is the strongest evidence of what a question is about ("what is QLoRA", "pytroch 是什么"), so
this is the third ranked list fused with dense and BM25 retrieval. Matches are word-aligned for
Latin script, substrings for Chinese; the longest match wins where two overlap ("DeepSeek-R1-Distill"
is not also "DeepSeek-R1"); one edit (a typo, a swapped pair of letters) is forgiven in names of
five or more letters, two in names of twelve or more (not fewer: "transform" is not a typo
of "transformer").

Example:
    >>> index = NameIndex({"lora": ["LoRA", "low-rank adaptation"], "pytorch": ["PyTorch"], "qlora": ["QLoRA"]})
    >>> [m.card for m in index.find("LoRA vs QLoRA")]
    ['lora', 'qlora']
    >>> [m.card for m in index.find("what is pytroch")]
    ['pytorch']
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass

from memory.kb.text import STOP_EN, normalize

_WORD = re.compile(r"[a-z0-9]+")
_CJK = re.compile(r"[\u3400-\u9fff]")
_ALL_CJK = re.compile(r"[\u3400-\u9fff]+")
MAX_WORDS = 6


@dataclass(frozen=True)
class NameMatch:
    card: str
    name: str
    start: int
    end: int
    exact: bool

    @property
    def weight(self) -> float:
        return (self.end - self.start) * (1.0 if self.exact else 0.7)


def _deletes(word: str, depth: int) -> set[str]:
    found, frontier = set(), {word}
    for _ in range(depth):
        frontier = {w[:i] + w[i + 1:] for w in frontier for i in range(len(w))}
        found |= frontier
    return found


def _depth(length: int) -> int:
    return 0 if length < 5 else 1 if length < 12 else 2


class NameIndex:
    def __init__(self, names: dict[str, list[str]]):
        self.exact: dict[str, set[str]] = defaultdict(set)     # compact latin form → cards
        self.fuzzy: dict[str, set[str]] = defaultdict(set)     # deletion variant → compact forms
        self.chinese: dict[str, set[str]] = defaultdict(set)   # compact CJK-bearing form → cards
        self.chinese_fuzzy: dict[tuple[str, str], set[str]] = defaultdict(set)  # name minus one character
        for card, card_names in names.items():
            for name in card_names:
                norm = normalize(name)
                if _CJK.search(norm):
                    compact = re.sub(r"\s+", "", norm)
                    if len(compact) >= 2:
                        self.chinese[compact].add(card)
                    if len(compact) >= 4 and _ALL_CJK.fullmatch(compact):  # 3 characters: too many near-words
                        for i in range(len(compact)):  # one wrong character: 强化学洗 → 强化学习
                            self.chinese_fuzzy[(compact[:i], compact[i + 1:])].add(compact)
                    continue
                words = _WORD.findall(norm)
                if not words or len(words) > MAX_WORDS:
                    continue
                compact = "".join(words)
                if len(words) == 1 and (words[0] in STOP_EN or len(compact) < 2):
                    continue
                self.exact[compact].add(card)
                for variant in _deletes(compact, _depth(len(compact))):
                    self.fuzzy[variant].add(compact)

    def _fuzzy(self, compact: str) -> str | None:
        depth = _depth(len(compact))
        if not depth:
            return None
        best = None
        for variant in {compact} | _deletes(compact, depth):
            for target in self.fuzzy.get(variant, ()):
                close = abs(len(target) - len(compact)) <= depth and _distance(target, compact) <= depth
                if close and (best is None or len(target) > len(best)):
                    best = target
        return best if best not in (None, compact) else None

    def find(self, text: str) -> list[NameMatch]:
        """Non-overlapping name matches, longest first, then in order of appearance."""
        norm = normalize(text)
        spans = [(m.start(), m.end(), m.group()) for m in _WORD.finditer(norm)]
        candidates: list[NameMatch] = []
        for i in range(len(spans)):
            for j in range(i + 1, min(i + MAX_WORDS, len(spans)) + 1):
                words = [w for _, _, w in spans[i:j]]
                if j - i > 1 and (words[0] in STOP_EN or words[-1] in STOP_EN):
                    continue  # "is lora" is not a name, and must not fuzzily become "rslora"
                compact = "".join(words)
                start, end = spans[i][0], spans[j - 1][1]
                for card in self.exact.get(compact, ()):
                    candidates.append(NameMatch(card, compact, start, end, True))
                if compact not in self.exact and not (j - i == 1 and words[0] in STOP_EN):
                    target = self._fuzzy(compact)
                    for card in self.exact.get(target, ()) if target else ():
                        candidates.append(NameMatch(card, target, start, end, False))
        squeezed = re.sub(r"\s+", "", norm)
        if _CJK.search(norm):
            offsets = [i for i, ch in enumerate(norm) if not ch.isspace()]
            for name, cards in self.chinese.items():
                at = squeezed.find(name)
                while at >= 0:
                    for card in cards:
                        candidates.append(NameMatch(card, name, offsets[at], offsets[at + len(name) - 1] + 1, True))
                    at = squeezed.find(name, at + 1)
            lengths = {len(a) + len(b) + 1 for a, b in self.chinese_fuzzy}
            for length in lengths:
                for start in range(len(squeezed) - length + 1):
                    window = squeezed[start:start + length]
                    if window in self.chinese or not _ALL_CJK.fullmatch(window):
                        continue
                    for i in range(length):
                        for name in self.chinese_fuzzy.get((window[:i], window[i + 1:]), ()):
                            for card in self.chinese[name]:
                                candidates.append(NameMatch(card, name, offsets[start],
                                                            offsets[start + length - 1] + 1, False))
        chosen: list[NameMatch] = []
        taken: list[tuple[int, int]] = []
        for match in sorted(candidates, key=lambda m: (-m.weight, m.start)):
            if any(match.start < e and s < match.end for s, e in taken):
                if not any(c.card == match.card for c in chosen) and any(
                        (c.start, c.end) == (match.start, match.end) for c in chosen):
                    chosen.append(match)  # the same words name two cards equally well: keep both
                continue
            taken.append((match.start, match.end))
            chosen.append(match)
        seen: set[str] = set()
        ordered = []
        for match in sorted(chosen, key=lambda m: m.start):
            if match.card not in seen:
                seen.add(match.card)
                ordered.append(match)
        return ordered


def _distance(a: str, b: str) -> int:
    """Optimal-string-alignment distance (edits plus adjacent swaps)."""
    prev2, prev = None, list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        cur = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cost = a[i - 1] != b[j - 1]
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
            if prev2 is not None and i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                cur[j] = min(cur[j], prev2[j - 2] + 1)
        prev2, prev = prev, cur
    return prev[-1]
