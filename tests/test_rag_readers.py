"""Documents of every format the knowledge base reads, written here with the same libraries
people write them with, read back into located sections; the guards against bad input."""

from __future__ import annotations

import os
import zipfile

import pytest

from hanlin.rag import Unreadable, chunk_sections, read_document, sentences, walk
from hanlin.rag.readers import markdown_sections


def test_markdown_sections_follow_headings_and_ignore_hashes_in_code():
    md = "Intro.\n# Install\nUse pip.\n```sh\n# not a heading\n```\n## Linux\nRun it.\n### Debian\napt.\n## macOS\nbrew.\n# Use\nChat."
    got = [(s.location, s.text) for s in markdown_sections(md)]
    assert got == [("top", "Intro."), ("Install", "Use pip.\n```sh\n# not a heading\n```"), ("Install > Linux", "Run it."),
                   ("Install > Linux > Debian", "apt."), ("Install > macOS", "brew."), ("Use", "Chat.")]  # fmt: skip


def test_docx_headings_paragraphs_and_tables(tmp_path):
    import docx

    d = docx.Document()
    d.add_heading("Handbook", 0)
    d.add_heading("Leave", 1)
    d.add_paragraph("Employees get 25 days of annual leave.")
    d.add_heading("Carry-over", 2)
    d.add_paragraph("Up to 5 days carry over to March.")
    t = d.add_table(rows=2, cols=2)
    t.cell(0, 0).text, t.cell(0, 1).text, t.cell(1, 0).text, t.cell(1, 1).text = "grade", "days", "A", "25"
    d.save(tmp_path / "h.docx")
    secs = read_document(tmp_path / "h.docx")
    assert [(s.location, s.text) for s in secs] == [
        ("Handbook > Leave", "Employees get 25 days of annual leave."),
        ("Handbook > Leave > Carry-over", "Up to 5 days carry over to March."),
        ("table 1", "grade | days\nA | 25"),
    ]


def test_xlsx_rows_by_sheet(tmp_path):
    import openpyxl

    wb = openpyxl.Workbook()
    ws = wb.active
    ws.title = "Budget"
    ws.append(["item", "cost"])
    for i in range(25):
        ws.append([f"line {i}", i * 10])
    wb.save(tmp_path / "b.xlsx")
    secs = read_document(tmp_path / "b.xlsx")
    assert [s.location for s in secs] == ["sheet Budget rows 1-20", "sheet Budget rows 21-26"]
    assert secs[0].text.splitlines()[:2] == ["item | cost", "line 0 | 0"] and secs[1].text.endswith("line 24 | 240")


def test_pptx_slides(tmp_path):
    import pptx

    prs = pptx.Presentation()
    s = prs.slides.add_slide(prs.slide_layouts[1])
    s.shapes.title.text = "Roadmap"
    s.placeholders[1].text_frame.text = "Ship the terminal app in Q4."
    prs.save(tmp_path / "r.pptx")
    (sec,) = read_document(tmp_path / "r.pptx")
    assert (sec.location, sec.heading, sec.text) == ("slide 1", ("Roadmap",), "Roadmap\nShip the terminal app in Q4.")


def _pdf(path, pages):
    import fpdf

    pdf = fpdf.FPDF()
    pdf.set_font("helvetica", size=12)
    for text in pages:
        pdf.add_page()
        pdf.multi_cell(0, 8, text)
    pdf.output(str(path))


def test_pdf_pages_and_an_encrypted_pdf_is_reported(tmp_path):
    from pypdf import PdfReader, PdfWriter

    _pdf(tmp_path / "a.pdf", ["The warranty lasts two years.", "Returns are accepted within 30 days."])
    secs = read_document(tmp_path / "a.pdf")
    assert [s.location for s in secs] == ["page 1", "page 2"]
    assert "warranty lasts two years" in secs[0].text and "30 days" in secs[1].text
    w = PdfWriter()
    for page in PdfReader(tmp_path / "a.pdf").pages:
        w.add_page(page)
    w.encrypt("secret")
    w.write(tmp_path / "locked.pdf")
    with pytest.raises(Unreadable, match="locked.pdf: the PDF is encrypted"):
        read_document(tmp_path / "locked.pdf")


def test_html_main_text_keeps_headings(tmp_path):
    body = "".join(f"<p>Paragraph {i} explains how the scheduler admits requests between decode steps.</p>" for i in range(6))
    html = (f"<html><head><title>t</title></head><body><nav>Home | About | Login</nav><article><h1>Scheduler</h1>{body}"
            "<h2>Queue</h2><p>A full queue answers 429 with Retry-After so clients back off and retry later.</p></article>"
            "<footer>Copyright 2026</footer></body></html>")  # fmt: skip
    (tmp_path / "p.html").write_text(html)
    secs = read_document(tmp_path / "p.html")
    text = "\n".join(s.text for s in secs)
    assert "admits requests between decode steps" in text and "429 with Retry-After" in text
    assert "Login" not in text and "Copyright" not in text  # boilerplate is not main text
    assert any(s.heading[-1:] == ("Queue",) for s in secs)


def test_text_in_gb18030_and_utf8(tmp_path):
    (tmp_path / "zh.txt").write_bytes("知识库回答问题。".encode("gb18030"))
    (tmp_path / "en.txt").write_text("plain text")
    assert read_document(tmp_path / "zh.txt")[0].text == "知识库回答问题。"
    assert read_document(tmp_path / "en.txt")[0].text == "plain text"


def test_corrupt_and_oversized_files_are_refused_with_the_reason(tmp_path):
    (tmp_path / "bad.docx").write_bytes(b"this is not a zip")
    with pytest.raises(Unreadable, match="bad.docx: not a valid docx file"):
        read_document(tmp_path / "bad.docx")
    big = tmp_path / "big.pdf"
    with open(big, "wb") as f:  # a sparse 2 GB file: refused from its size, never read
        f.truncate(2 * 2**30)
    with pytest.raises(Unreadable, match=r"big.pdf: 2048 MiB is over the 512 MiB limit"):
        read_document(big)
    with pytest.raises(Unreadable, match="is not a format hanlin reads"):
        (tmp_path / "x.exe").write_bytes(b"MZ")
        read_document(tmp_path / "x.exe")


def test_a_zip_bomb_inside_a_docx_is_refused(tmp_path):
    bomb = tmp_path / "bomb.docx"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        z.writestr("[Content_Types].xml", "<Types/>")
        with z.open("word/document.xml", "w", force_zip64=True) as f:
            block = b"\0" * 2**20
            for _ in range(300):  # 300 MiB of zeros: about 0.3 MiB packed
                f.write(block)
    assert bomb.stat().st_size < 2 * 2**20
    with pytest.raises(Unreadable, match="bomb.docx: refused as a zip bomb"):
        read_document(bomb)


def test_walk_refuses_links_that_escape_the_root(tmp_path):
    root, outside = tmp_path / "kb", tmp_path / "secret"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (outside / "passwords.txt").write_text("hunter2")
    (root / "a.md").write_text("# A\ntext")
    (root / "sub" / "b.txt").write_text("b")
    (root / "skip.bin").write_bytes(b"\0")
    os.symlink(outside / "passwords.txt", root / "leak.txt")
    os.symlink(outside, root / "linked-dir")
    os.symlink(root / "a.md", root / "sub" / "alias.md")  # a link that stays inside is fine
    found = {f.relative: f.refused for f in walk(root)}
    assert found["a.md"] is None and found["sub/b.txt"] is None and found["sub/alias.md"] is None
    assert "outside" in found["leak.txt"] and "outside" in found["linked-dir"]
    assert "skip.bin" not in found and not any("passwords" in k for k in found)


def test_chunks_respect_sentences_headings_and_overlap():
    from hanlin.rag.readers import Section

    text = " ".join(f"Sentence number {i} talks about topic {i}." for i in range(40))
    chunks = chunk_sections([Section(text, "Guide > Setup", ("Guide", "Setup"))], max_chars=200, overlap=60)
    assert len(chunks) > 5 and all(len(c.text) <= 200 for c in chunks)
    assert all(c.text.startswith("Sentence number") and c.text.endswith(".") for c in chunks)  # whole sentences
    assert all(c.title == "Guide > Setup" and c.for_embedding.startswith("Guide > Setup: ") for c in chunks)
    for a, b in zip(chunks, chunks[1:]):  # consecutive chunks share their boundary sentence
        assert a.text.split(". ")[-1].rstrip(".") in b.text
    every = " ".join(c.text for c in chunks)
    assert all(f"topic {i}." in every for i in range(40))  # nothing dropped

    zh = "".join(f"第{i}条规定员工每年享有带薪年假。" for i in range(60))
    zchunks = chunk_sections([Section(zh, "规定", ("规定",))])
    assert all(len(c.text) <= 240 and c.text.endswith("。") for c in zchunks) and len(zchunks) >= 4
    assert sentences("One. Two? 三。四！\n\nFive") == ["One.", "Two?", "三。", "四！", "Five"]
    with pytest.raises(ValueError, match="overlap=150 must be"):
        chunk_sections([], max_chars=200, overlap=150)
