"""User documents → sections: Markdown, plain text, HTML and PDF, bounded, with clear errors.

A section is ``(heading path, text)``; chunking happens in :mod:`memory.kb.chunks`.

Example:
    >>> [s.heading for s in markdown_sections("# Guide\\nintro\\n## Setup\\nsteps", "g.md")]
    ['Guide', 'Guide > Setup']
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

MAX_FILE_BYTES = {".pdf": 50 * 2**20}
MAX_TEXT_BYTES = 10 * 2**20
MAX_PDF_PAGES = 2000
SUFFIXES = (".md", ".markdown", ".txt", ".html", ".htm", ".pdf")


class DocumentError(ValueError):
    """A document that cannot be ingested; the message says why and what to do."""


@dataclass(frozen=True)
class Section:
    heading: str
    text: str


def limit_for(path: Path) -> int:
    return MAX_FILE_BYTES.get(path.suffix.lower(), MAX_TEXT_BYTES)


def read_sections(path: Path, data: bytes) -> list[Section]:
    """The sections of one file whose bytes are ``data`` (already size-checked by the caller)."""
    suffix = path.suffix.lower()
    if suffix == ".pdf":
        return pdf_sections(data, path.name)
    text = decode_text(data, path.name)
    if suffix in (".html", ".htm"):
        return html_sections(text, path.name)
    if suffix in (".md", ".markdown"):
        return markdown_sections(text, path.name)
    return plain_sections(text, path.name)


def decode_text(data: bytes, name: str) -> str:
    """UTF-8 (with or without BOM), UTF-16 with a BOM, else GB18030 (Chinese), else Windows-1252 for
    mostly-ASCII text, else refused."""
    if b"\x00" in data[:4096] and not data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DocumentError(f"{name} looks like a binary file, not text.")
    for encoding in ("utf-8-sig", "utf-16") if data.startswith((b"\xff\xfe", b"\xfe\xff")) else ("utf-8-sig",):
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            pass
    try:
        text = data.decode("gb18030")
    except UnicodeDecodeError:
        # Western legacy text (café in Windows-1252) is mostly ASCII; anything else is not text we can trust.
        if sum(b < 128 for b in data[:65536]) < 0.9 * min(len(data), 65536):
            raise DocumentError(f"{name} is not UTF-8 or GB18030 text; save it as UTF-8 and try again.") from None
        text = data.decode("cp1252", errors="replace")
    controls = sum(1 for ch in text[:4096] if ord(ch) < 32 and ch not in "\r\n\t\f")
    if controls > 8:
        raise DocumentError(f"{name} looks like a binary file, not text.")
    return text


_MD_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t#]*$")
_FENCE = re.compile(r"^(```|~~~)")


def markdown_sections(text: str, name: str) -> list[Section]:
    path: list[tuple[int, str]] = []
    sections: list[Section] = []
    lines: list[str] = []
    fenced = False

    def flush() -> None:
        body = "\n".join(lines).strip()
        if body:
            sections.append(Section(" > ".join(h for _, h in path) or name, body))
        lines.clear()

    for line in text.splitlines():
        if _FENCE.match(line.strip()):
            fenced = not fenced
        heading = None if fenced else _MD_HEADING.match(line)
        if heading:
            flush()
            level = len(heading.group(1))
            path[:] = [p for p in path if p[0] < level] + [(level, heading.group(2).strip())]
        else:
            lines.append(line)
    flush()
    return sections


_UNDERLINE = re.compile(r"^(=+|-+)\s*$")


def _caps_heading(line: str) -> bool:
    stripped = line.strip().rstrip(":")
    letters = [c for c in stripped if c.isalpha()]
    return 3 <= len(stripped) <= 80 and len(letters) >= 3 and all(c.isupper() for c in letters)


def plain_sections(text: str, name: str) -> list[Section]:
    """Plain text: underlined (``===``/``---``) or ALL-CAPS lines start sections; Markdown headings too."""
    if any(_MD_HEADING.match(line) for line in text.splitlines()[:400]):
        return markdown_sections(text, name)
    lines = text.splitlines()
    sections: list[Section] = []
    heading, body = name, []
    for index, line in enumerate(lines):
        if _UNDERLINE.match(line):
            continue
        nxt = lines[index + 1] if index + 1 < len(lines) else ""
        if line.strip() and (_UNDERLINE.match(nxt) or _caps_heading(line)):
            if "\n".join(body).strip():
                sections.append(Section(heading, "\n".join(body).strip()))
            heading, body = line.strip().rstrip(":"), []
        else:
            body.append(line)
    if "\n".join(body).strip():
        sections.append(Section(heading, "\n".join(body).strip()))
    return sections


class _HTMLSections(HTMLParser):
    _SKIP = {"script", "style", "noscript", "template", "svg", "head"}
    _BLOCK = {"p", "div", "li", "br", "tr", "section", "article", "pre", "blockquote", "dd", "dt", "table", "ul", "ol"}

    def __init__(self, name: str):
        super().__init__(convert_charrefs=True)
        self.name = name
        self.title = ""
        self.path: list[tuple[int, str]] = []
        self.sections: list[Section] = []
        self.parts: list[str] = []
        self.heading: list[str] | None = None
        self.level = 0
        self.skip = 0
        self.in_title = False

    def handle_starttag(self, tag, attrs):
        if tag in self._SKIP:
            self.skip += 1
        elif tag == "title":
            self.in_title = True
        elif re.fullmatch(r"h[1-6]", tag):
            self._flush()
            self.heading, self.level = [], int(tag[1])
        elif tag in self._BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in self._SKIP:
            self.skip = max(0, self.skip - 1)
        elif tag == "title":
            self.in_title = False
        elif re.fullmatch(r"h[1-6]", tag) and self.heading is not None:
            text = " ".join("".join(self.heading).split())
            if text:
                self.path = [p for p in self.path if p[0] < self.level] + [(self.level, text)]
            self.heading = None
        elif tag in self._BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if self.skip:
            return
        if self.in_title:
            self.title += data
        elif self.heading is not None:
            self.heading.append(data)
        else:
            self.parts.append(data)

    def _flush(self):
        body = "\n".join(" ".join(line.split()) for line in "".join(self.parts).splitlines())
        body = re.sub(r"\n{3,}", "\n\n", body).strip()
        if body:
            label = " > ".join(h for _, h in self.path) or self.title.strip() or self.name
            self.sections.append(Section(label, body))
        self.parts = []

    def close(self):
        super().close()
        self._flush()


def html_sections(text: str, name: str) -> list[Section]:
    parser = _HTMLSections(name)
    parser.feed(text)
    parser.close()
    return parser.sections


def pdf_sections(data: bytes, name: str) -> list[Section]:
    """One section per page ("page N"), text extracted with pypdf; encrypted or broken PDFs refused."""
    import io
    import logging

    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    if not data.lstrip()[:5].startswith(b"%PDF"):
        raise DocumentError(f"{name} is not a PDF file (it does not start with %PDF).")
    logging.getLogger("pypdf").setLevel(logging.ERROR)
    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            raise DocumentError(f"{name} is an encrypted PDF; save an unencrypted copy and ingest that.")
        if len(reader.pages) > MAX_PDF_PAGES:
            raise DocumentError(f"{name} has {len(reader.pages)} pages; at most {MAX_PDF_PAGES} are ingested.")
        sections = []
        for number, page in enumerate(reader.pages, start=1):
            text = (page.extract_text() or "").strip()
            if text:
                sections.append(Section(f"page {number}", text))
    except DocumentError:
        raise
    except (PdfReadError, ValueError, KeyError, TypeError, OSError, RecursionError) as exc:
        raise DocumentError(f"{name} is a damaged PDF that cannot be read ({type(exc).__name__}).") from None
    if not sections:
        raise DocumentError(f"{name} has no extractable text (a scanned PDF needs OCR first).")
    return sections
