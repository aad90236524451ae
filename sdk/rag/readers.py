"""Read documents into located sections: what `hanlin kb ingest` indexes.

    for found in walk("docs/"):                     # files under a root; escapes refused
        if found.refused: print(found.path, found.refused); continue
        try:
            sections = read_document(found.path)    # [Section(text, location, heading), ...]
        except Unreadable as e:
            print(e)                                # reported and skipped, never fatal

Each format is read with the library people use for it: pypdf (PDF), python-docx (Word),
openpyxl (Excel), python-pptx (PowerPoint), trafilatura (HTML main text, as Markdown so its
headings survive); Markdown and text are read here. A section's location is what a citation
shows: "page 3", "sheet Budget rows 21-40", "slide 2", or the heading path.

Guards, checked before a parser sees the file: a file over `max_bytes` (default 512 MiB) is
refused from its size alone; an Office file (a zip) whose members would expand past 1 GiB, or
more than 200x their compressed size, is refused as a zip bomb; a path under the root that
resolves (through a symlink) outside it is refused. An encrypted or corrupt file raises
Unreadable with the reason.
"""

from __future__ import annotations

import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

__all__ = ["Section", "Unreadable", "Found", "read_document", "walk", "SUFFIXES", "markdown_sections"]

MAX_BYTES = 512 * 2**20
MAX_UNZIPPED = 2**30
MAX_RATIO = 200
ROWS_PER_SECTION = 20
SUFFIXES = (".pdf", ".docx", ".xlsx", ".pptx", ".html", ".htm", ".md", ".markdown", ".txt")


@dataclass(frozen=True)
class Section:
    text: str
    location: str  # where in the file: "page 3", "sheet S rows 1-20", "slide 2", "Install > Linux"
    heading: tuple[str, ...] = ()  # the headings above this text, outermost first


class Unreadable(Exception):
    """A file that cannot be read (encrypted, corrupt, too large, a zip bomb): the message names
    the file and the reason; ingest reports it and goes on."""


@dataclass(frozen=True)
class Found:
    path: Path
    relative: str
    refused: str | None = None  # why this path is not read (it escapes the root, ...)


def walk(root: str | os.PathLike[str]) -> Iterator[Found]:
    """The readable files under root, in a stable order. A symlink (file or folder) that resolves
    outside root is reported as refused and not followed."""
    base = Path(root).resolve()
    if not base.is_dir():
        raise NotADirectoryError(f"{root} is not a directory")
    for dirpath, dirnames, filenames in os.walk(base, followlinks=True):
        here = Path(dirpath)
        keep = []
        for d in sorted(dirnames):
            if d.startswith("."):
                continue
            real = (here / d).resolve()
            if not real.is_relative_to(base):
                yield Found(here / d, str((here / d).relative_to(base)), f"a link to {real}, outside {base}: not followed")
            else:
                keep.append(d)
        dirnames[:] = keep
        for name in sorted(filenames):
            p = here / name
            if name.startswith(".") or p.suffix.lower() not in SUFFIXES:
                continue
            rel = str(p.relative_to(base))
            real = p.resolve()
            if not real.is_relative_to(base):
                yield Found(p, rel, f"a link to {real}, outside {base}: refused")
            elif not real.is_file():
                yield Found(p, rel, "not a regular file")
            else:
                yield Found(p, rel)


def read_document(path: str | os.PathLike[str], *, max_bytes: int = MAX_BYTES) -> list[Section]:
    p = Path(path)
    try:
        size = p.stat().st_size
    except OSError as e:
        raise Unreadable(f"{p}: cannot read it ({e.strerror})") from None
    if size > max_bytes:
        raise Unreadable(f"{p}: {size / 2**20:.0f} MiB is over the {max_bytes / 2**20:.0f} MiB limit for one document")
    suffix = p.suffix.lower()
    reader = _READERS.get(suffix)
    if reader is None:
        raise Unreadable(f"{p}: {suffix or 'no suffix'} is not a format hanlin reads ({', '.join(SUFFIXES)})")
    if suffix in (".docx", ".xlsx", ".pptx"):
        _check_zip(p)
    try:
        sections = reader(p)
    except Unreadable:
        raise
    except ImportError as e:
        raise Unreadable(f"{p}: reading {suffix} needs {e.name} (pip install -c constraints.txt -e '.[rag]')") from None
    except Exception as e:  # noqa: BLE001 - every parser fails in its own way on a corrupt file
        raise Unreadable(f"{p}: not a readable {suffix[1:]} file ({type(e).__name__}: {e})") from None
    return [s for s in sections if s.text.strip()]


def _check_zip(p: Path) -> None:
    try:
        with zipfile.ZipFile(p) as z:
            infos = z.infolist()
    except zipfile.BadZipFile:
        raise Unreadable(f"{p}: not a valid {p.suffix[1:]} file (it is not a zip archive)") from None
    total = sum(i.file_size for i in infos)
    packed = max(1, sum(i.compress_size for i in infos))
    if total > MAX_UNZIPPED or total > MAX_RATIO * packed:
        raise Unreadable(f"{p}: refused as a zip bomb: {packed / 2**20:.1f} MiB that expands to {total / 2**20:.0f} MiB")


def _text(p: Path) -> str:
    data = p.read_bytes()
    for enc in ("utf-8-sig", "gb18030"):  # UTF-8, else the Chinese legacy encoding
        try:
            return data.decode(enc)
        except UnicodeDecodeError:
            continue
    raise Unreadable(f"{p}: not UTF-8 or GB18030 text")


# -- formats ---------------------------------------------------------------------------


def _read_txt(p: Path) -> list[Section]:
    return [Section(_text(p), "text")]


_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_FENCE = re.compile(r"^\s*(```|~~~)")


def markdown_sections(text: str) -> list[Section]:
    """Split Markdown at its ATX headings (not inside code fences); each section knows its path."""
    out: list[Section] = []
    stack: list[tuple[int, str]] = []  # (level, title) of the headings above
    buf: list[str] = []
    fenced = False

    def flush() -> None:
        if "".join(buf).strip():
            path = tuple(t for _, t in stack)
            out.append(Section("\n".join(buf).strip(), " > ".join(path) or "top", path))
        buf.clear()

    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
        m = None if fenced else _HEADING.match(line)
        if m:
            flush()
            level = len(m.group(1))
            while stack and stack[-1][0] >= level:
                stack.pop()
            stack.append((level, m.group(2)))
        else:
            buf.append(line)
    flush()
    return out


def _read_md(p: Path) -> list[Section]:
    return markdown_sections(_text(p))


def _read_html(p: Path) -> list[Section]:
    import trafilatura

    md = trafilatura.extract(_text(p), output_format="markdown", include_tables=True, include_comments=False, favor_recall=True)
    if not md:
        raise Unreadable(f"{p}: no main text found in the HTML")
    return markdown_sections(md)


def _read_pdf(p: Path) -> list[Section]:
    from pypdf import PdfReader
    from pypdf.errors import FileNotDecryptedError, PdfReadError

    try:
        reader = PdfReader(str(p))
        if reader.is_encrypted and not reader.decrypt(""):
            raise Unreadable(f"{p}: the PDF is encrypted (a password is needed)")
        return [Section(page.extract_text() or "", f"page {i}") for i, page in enumerate(reader.pages, 1)]
    except FileNotDecryptedError:
        raise Unreadable(f"{p}: the PDF is encrypted (a password is needed)") from None
    except PdfReadError as e:
        raise Unreadable(f"{p}: not a readable PDF ({e})") from None


def _read_docx(p: Path) -> list[Section]:
    import docx

    doc = docx.Document(str(p))
    out: list[Section] = []
    stack: list[tuple[int, str]] = []
    buf: list[str] = []

    def flush() -> None:
        if buf:
            path = tuple(t for _, t in stack)
            out.append(Section("\n".join(buf), " > ".join(path) or "top", path))
            buf.clear()

    for para in doc.paragraphs:
        style = (para.style.name if para.style is not None else "") or ""
        m = re.match(r"Heading (\d)", style)
        if m or style == "Title":
            flush()
            level = int(m.group(1)) if m else 0  # a Title sits above Heading 1
            while stack and stack[-1][0] >= level:
                stack.pop()
            stack.append((level, para.text.strip()))
        elif para.text.strip():
            buf.append(para.text.strip())
    flush()
    for n, table in enumerate(doc.tables, 1):
        rows = [" | ".join(c.text.strip() for c in row.cells) for row in table.rows]
        out.append(Section("\n".join(rows), f"table {n}"))
    return out


def _read_xlsx(p: Path) -> list[Section]:
    import openpyxl

    wb = openpyxl.load_workbook(str(p), read_only=True, data_only=True)
    out = []
    try:
        for ws in wb.worksheets:
            rows: list[tuple[int, str]] = []
            for r, row in enumerate(ws.iter_rows(values_only=True), 1):
                cells = [str(v) for v in row if v is not None and str(v).strip()]
                if cells:
                    rows.append((r, " | ".join(cells)))
            for i in range(0, len(rows), ROWS_PER_SECTION):
                part = rows[i : i + ROWS_PER_SECTION]
                out.append(Section("\n".join(t for _, t in part), f"sheet {ws.title} rows {part[0][0]}-{part[-1][0]}", (ws.title,)))
    finally:
        wb.close()
    return out


def _read_pptx(p: Path) -> list[Section]:
    from pptx import Presentation

    out = []
    for n, slide in enumerate(Presentation(str(p)).slides, 1):
        texts = []
        title = slide.shapes.title.text_frame.text.strip() if slide.shapes.title is not None else ""
        for shape in slide.shapes:
            if shape.has_text_frame and shape != slide.shapes.title:
                texts += [para.text for para in shape.text_frame.paragraphs if para.text.strip()]
        body = "\n".join(texts)
        out.append(Section(f"{title}\n{body}".strip(), f"slide {n}", (title,) if title else ()))
    return out


_READERS = {".txt": _read_txt, ".md": _read_md, ".markdown": _read_md, ".html": _read_html, ".htm": _read_html,
            ".pdf": _read_pdf, ".docx": _read_docx, ".xlsx": _read_xlsx, ".pptx": _read_pptx}  # fmt: skip
