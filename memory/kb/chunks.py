"""Sections → chunks of at most ~800 characters, split at paragraphs, then sentences; never mid-word.

Example:
    >>> from memory.kb.readers import Section
    >>> [c.heading for c in chunk_sections([Section("Intro", "short text")])]
    ['Intro']
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from memory.kb.readers import Section

CHUNK_CHARS = 800
_SENTENCE = re.compile(r"(?<=[.!?。！？；;])\s*")


@dataclass(frozen=True)
class Chunk:
    seq: int
    heading: str
    text: str


def split_sentences(text: str) -> list[str]:
    """Sentences of English or Chinese text (punctuation kept with its sentence)."""
    return [s.strip() for s in _SENTENCE.split(text) if s and s.strip()]


def _pieces(text: str, limit: int) -> list[tuple[str, bool]]:
    """``(piece, starts_a_paragraph)`` pairs, each at most ``limit`` characters."""
    pieces: list[tuple[str, bool]] = []
    for paragraph in re.split(r"\n\s*\n", text):
        paragraph = " ".join(paragraph.split()) if not re.search(r"[\u4e00-\u9fff]", paragraph) else \
            re.sub(r"\s*\n\s*", "", paragraph).strip()
        if not paragraph:
            continue
        if len(paragraph) <= limit:
            pieces.append((paragraph, True))
            continue
        first = True
        for sentence in split_sentences(paragraph):
            while len(sentence) > limit:  # one enormous "sentence": cut at a space if there is one
                cut = sentence.rfind(" ", 0, limit)
                cut = cut if cut > limit // 2 else limit
                pieces.append((sentence[:cut].strip(), first))
                sentence, first = sentence[cut:].strip(), False
            if sentence:
                pieces.append((sentence, first))
                first = False
    return pieces


def chunk_sections(sections: list[Section], limit: int = CHUNK_CHARS) -> list[Chunk]:
    """Pack each section's paragraphs/sentences into chunks; a chunk never spans two sections."""
    chunks: list[Chunk] = []
    for section in sections:
        current = ""
        for piece, paragraph in _pieces(section.text, limit):
            joiner = ("\n" if paragraph else " ") if current else ""
            if current and len(current) + len(piece) + 1 > limit:
                chunks.append(Chunk(len(chunks), section.heading, current))
                current, joiner = "", ""
            current += joiner + piece
        if current:
            chunks.append(Chunk(len(chunks), section.heading, current))
    return chunks
