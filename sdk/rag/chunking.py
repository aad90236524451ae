"""Cut sections into chunks for retrieval: whole sentences, never across a heading.

A chunk is at most `max_chars` characters of whole sentences from one section (a sentence
longer than that is cut at `max_chars`); consecutive chunks of a section share up to
`overlap` characters of trailing sentences, so an answer split across the boundary is found
in one of them. Sentences end at . ! ? followed by a space or line end, at the Chinese and
full-width 。！？；, and at blank lines. The heading path is kept beside the text (`title`):
the index embeds "title: text", so a chunk under "Install > Linux" matches a question about
installing on Linux even when its sentences do not repeat the words.

Characters, not tokens: the embedding model's tokenizer is not needed to chunk, and 800
characters stay well inside MiniLM's 256-token window for English and Chinese alike
(Chinese is about one token per character in its WordPiece vocabulary: see MAX_CHARS_ZH).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

from .readers import Section

__all__ = ["Chunk", "chunk_sections", "sentences", "MAX_CHARS", "MAX_CHARS_ZH"]

MAX_CHARS = 800
MAX_CHARS_ZH = 240  # mostly-CJK text: one WordPiece token per character, MiniLM keeps 256
OVERLAP = 120

_SENTENCE_END = re.compile(r"(?<=[。！？；!?])|(?<=[.])(?=\s)|\n\s*\n")
_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")


@dataclass(frozen=True)
class Chunk:
    text: str
    location: str
    title: str  # the heading path, "A > B" ("" at the top of a file)
    index: int  # its position in the document (0, 1, ...)

    @property
    def for_embedding(self) -> str:
        return f"{self.title}: {self.text}" if self.title else self.text


def sentences(text: str) -> list[str]:
    """Whole sentences (with their end marks), whitespace inside runs collapsed."""
    out = []
    for part in _SENTENCE_END.split(text):
        part = " ".join(part.split())
        if part:
            out.append(part)
    return out


def _limit(text: str, max_chars: int) -> int:
    cjk = len(_CJK.findall(text))
    return MAX_CHARS_ZH if max_chars == MAX_CHARS and cjk > len(text) / 3 else max_chars


def chunk_sections(sections: Iterable[Section], *, max_chars: int = MAX_CHARS, overlap: int = OVERLAP) -> list[Chunk]:
    if max_chars < 50:
        raise ValueError(f"max_chars={max_chars} is too small for a sentence: use at least 50")
    if not 0 <= overlap < max_chars // 2:
        raise ValueError(f"overlap={overlap} must be >= 0 and under half of max_chars ({max_chars})")
    out: list[Chunk] = []
    for sec in sections:
        limit = _limit(sec.text, max_chars)
        lap = min(overlap, limit // 4)
        title = " > ".join(sec.heading)
        pieces: list[str] = []
        for s in sentences(sec.text):
            while len(s) > limit:  # one sentence longer than a chunk: cut it
                pieces.append(s[:limit])
                s = s[limit:]
            pieces.append(s)
        current: list[str] = []
        size = 0
        for piece in pieces:
            sep = 0 if not current or _CJK.match(piece[:1]) else 1
            if current and size + sep + len(piece) > limit:
                out.append(Chunk(_join(current), sec.location, title, len(out)))
                carry: list[str] = []
                kept = 0
                for prev in reversed(current):  # whole trailing sentences up to the overlap
                    if kept + len(prev) > lap:
                        break
                    carry.insert(0, prev)
                    kept += len(prev) + 1
                current, size = carry, kept
                sep = 0 if not current else 1
            current.append(piece)
            size += sep + len(piece)
        if current:
            out.append(Chunk(_join(current), sec.location, title, len(out)))
    return out


def _join(parts: list[str]) -> str:
    text = parts[0]
    for p in parts[1:]:
        text += p if _CJK.match(p[:1]) or _CJK.search(text[-1:]) else " " + p
    return text
