"""Reading and chunking user documents: formats, headings, limits and bad files."""

from __future__ import annotations

import io

import pytest

from memory.kb.chunks import CHUNK_CHARS, chunk_sections
from memory.kb.readers import (
    DocumentError,
    Section,
    decode_text,
    html_sections,
    markdown_sections,
    pdf_sections,
    plain_sections,
    read_sections,
)


def make_pdf(pages: list[str], password: str | None = None) -> bytes:
    """A real PDF with one text line per page (drawn with a standard font)."""
    from pypdf import PdfWriter
    from pypdf.generic import DecodedStreamObject, DictionaryObject, NameObject

    writer = PdfWriter()
    for text in pages:
        page = writer.add_blank_page(width=612, height=792)
        font = DictionaryObject({NameObject("/Type"): NameObject("/Font"), NameObject("/Subtype"): NameObject("/Type1"),
                                 NameObject("/BaseFont"): NameObject("/Helvetica")})
        page[NameObject("/Resources")] = DictionaryObject({NameObject("/Font"): DictionaryObject(
            {NameObject("/F1"): writer._add_object(font)})})
        stream = DecodedStreamObject()
        stream.set_data(f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode())
        page[NameObject("/Contents")] = writer._add_object(stream)
    if password:
        writer.encrypt(password)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def test_markdown_headings_become_a_path_and_code_fences_are_not_headings():
    text = "# Guide\nintro\n## Setup\nstep one\n```\n# not a heading\n```\n### Detail\nfine print\n## Usage\nrun it"
    sections = markdown_sections(text, "g.md")
    assert [s.heading for s in sections] == ["Guide", "Guide > Setup", "Guide > Setup > Detail", "Guide > Usage"]
    assert "# not a heading" in sections[1].text


def test_html_sections_skip_scripts_and_styles():
    page = ("<html><head><title>T</title><style>p{}</style><script>alert(1)</script></head><body>"
            "<h1>规范</h1><p>第一段&amp;说明</p><h2>格式</h2><ul><li>一</li><li>二</li></ul></body></html>")
    sections = html_sections(page, "x.html")
    assert [s.heading for s in sections] == ["规范", "规范 > 格式"]
    assert sections[0].text == "第一段&说明" and "alert" not in "".join(s.text for s in sections)


def test_plain_text_headings_underlined_or_capitals():
    sections = plain_sections("ALERTS\nthe pager fires\n\nScaling\n-------\nadd replicas\n", "run.txt")
    assert [(s.heading, s.text) for s in sections] == [("ALERTS", "the pager fires"), ("Scaling", "add replicas")]


def test_text_encodings_utf8_bom_gb18030_and_western():
    assert decode_text("\ufeff你好".encode(), "a.txt") == "你好"
    assert decode_text("显存不足".encode("gbk"), "a.txt") == "显存不足"
    assert decode_text("the café serves crème brûlée at 9 am, every day.".encode("cp1252"), "a.txt").startswith(
        "the café")


@pytest.mark.parametrize("data", [b"\x00\x01\x02binary\x00" * 50, bytes(range(256)) * 20])
def test_binary_data_named_txt_is_refused(data):
    with pytest.raises(DocumentError, match="binary|not UTF-8"):
        decode_text(data, "secret.txt")


def test_pdf_pages_become_sections():
    sections = pdf_sections(make_pdf(["LoRA adapters are small", "second page text"]), "p.pdf")
    assert [s.heading for s in sections] == ["page 1", "page 2"]
    assert "LoRA adapters" in sections[0].text


def test_encrypted_pdf_is_refused_clearly():
    with pytest.raises(DocumentError, match="encrypted"):
        pdf_sections(make_pdf(["top secret"], password="pw"), "locked.pdf")


@pytest.mark.parametrize(("data", "message"), [(b"hello, not a pdf", "not a PDF"),
                                               (b"%PDF-1.7\n" + b"\x8f" * 500, "damaged|no extractable")])
def test_broken_pdfs_are_refused_clearly(data, message):
    with pytest.raises(DocumentError, match=message):
        pdf_sections(data, "x.pdf")


def test_read_sections_dispatches_on_suffix(tmp_path):
    assert read_sections(tmp_path / "a.md", b"# T\nx")[0].heading == "T"
    assert read_sections(tmp_path / "a.htm", b"<h1>T</h1><p>x</p>")[0].heading == "T"


def test_chunks_stay_within_the_limit_and_within_their_section():
    long = " ".join(f"Sentence number {i} talks about adapters." for i in range(300))
    chunks = chunk_sections([Section("A", long), Section("B", "短的一节。")])
    assert all(len(c.text) <= CHUNK_CHARS for c in chunks)
    assert chunks[-1].heading == "B" and chunks[-1].text == "短的一节。"
    assert {c.heading for c in chunks[:-1]} == {"A"}
    joined = " ".join(c.text for c in chunks[:-1])
    assert "Sentence number 0 " in joined and "Sentence number 299 " in joined


def test_one_enormous_word_is_cut_not_lost():
    chunks = chunk_sections([Section("A", "x" * 2000)])
    assert "".join(c.text for c in chunks) == "x" * 2000
