"""Per-document filters of `hanlin data prepare`: HTML main text, language, quality, repetition.

Every rule is a small pure function `text -> None` (keep) or `text -> rule name` (drop), with
its thresholds in one dataclass, `FilterConfig`. The defaults are the published ones:

  Gopher quality rules      Rae et al. 2021, "Scaling Language Models: Methods, Analysis &
                            Insights from Training Gopher", appendix A.1.1 (MassiveText)
  Gopher repetition rules   the same appendix, Table A1
  C4 rules                  Raffel et al. 2020, "Exploring the Limits of Transfer Learning with
                            a Unified Text-to-Text Transformer", section 2.2 (C4); the terminal-
                            punctuation rule is C4's line rule applied per document with the
                            threshold FineWeb uses for it (Penedo et al. 2024: 0.12)

Words are whitespace-separated tokens, as in Gopher. Chinese and Japanese text has no spaces,
so for a document whose letters are mostly CJK (han, kana; `cjk_fraction`) the word rules
that only make sense for spaced languages (word count, mean word length, stop words, words
with a letter, '#'/ellipsis per word) are replaced by a character-count bound (`cjk_min_chars`,
`cjk_max_chars`), and the n-gram repetition rules run over characters instead of words. Line,
paragraph, bullet, ellipsis-line and C4 rules are the same for every language.

`check(text, cfg)` runs them in a fixed order and returns (text as filtered, language, rule):
the first rule that fires names the drop. Only C4's javascript rule changes the text (it
removes lines that mention javascript, as C4 does); nothing else rewrites a document.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

# rule names, in the order they are checked (the report lists them in this order)
RULES = (
    "bad_record", "empty", "html_no_main_text", "c4_javascript",
    "language", "language_unreliable",
    "gopher_word_count", "gopher_mean_word_length", "gopher_symbol_ratio", "gopher_bullet_lines",
    "gopher_ellipsis_lines", "gopher_alpha_words", "gopher_stop_words", "cjk_char_count",
    "gopher_dup_line_fraction", "gopher_dup_paragraph_fraction", "gopher_dup_line_chars",
    "gopher_dup_paragraph_chars", "gopher_top_ngram", "gopher_dup_ngram",
    "c4_lorem_ipsum", "c4_curly_bracket", "c4_terminal_punct",
    "duplicate_exact", "duplicate_near",
)  # fmt: skip


@dataclass
class FilterConfig:
    langs: tuple[str, ...] | None = None  # keep-list of cld2 codes ("en", "zh"); None keeps every language
    # Gopher quality (Rae et al. 2021, A.1.1)
    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_length: float = 3.0
    max_mean_word_length: float = 10.0
    max_symbol_word_ratio: float = 0.1  # '#' per word, and '...' per word, each
    max_bullet_lines: float = 0.9  # fraction of lines starting with a bullet
    max_ellipsis_lines: float = 0.3  # fraction of lines ending with an ellipsis
    min_alpha_words: float = 0.8  # fraction of words with at least one alphabetic character
    min_stop_words: int = 2  # of STOP_WORDS, English only
    # CJK documents in place of the word rules (ours: Gopher has no CJK rule; 50 words ~ 100 han)
    cjk_fraction: float = 0.3
    cjk_min_chars: int = 100
    cjk_max_chars: int = 300_000
    # Gopher repetition (Rae et al. 2021, Table A1)
    max_dup_line_fraction: float = 0.30
    max_dup_paragraph_fraction: float = 0.30
    max_dup_line_chars: float = 0.20
    max_dup_paragraph_chars: float = 0.20
    max_top_ngram_chars: dict[int, float] = field(default_factory=lambda: {2: 0.20, 3: 0.18, 4: 0.16})
    max_dup_ngram_chars: dict[int, float] = field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10})
    # C4 (Raffel et al. 2020, 2.2); the punctuation threshold is FineWeb's
    c4_lorem_ipsum: bool = True
    c4_curly_bracket: bool = True
    c4_javascript: bool = True
    min_terminal_punct_lines: float = 0.12


STOP_WORDS = frozenset(("the", "be", "to", "of", "and", "that", "have", "with"))  # Gopher's list
BULLETS = ("•", "●", "○", "▪", "‣", "⁃", "◦", "-", "*", "·")
ELLIPSES = ("...", "…")
TERMINAL_PUNCT = (".", "!", "?", '"', "'", "”", "’", "。", "！", "？", "…", "」", "』")
_PUNCT = frozenset("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~…·“”‘’«»「」『』。，、！？：；（）—–")
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


# --------------------------------------------------------------------------------------
# text statistics
# --------------------------------------------------------------------------------------


def lines_of(text: str) -> list[str]:
    return [line.strip() for line in text.split("\n") if line.strip()]


def paragraphs_of(text: str) -> list[str]:
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


def is_cjk(text: str, cfg: FilterConfig | None = None) -> bool:
    """Mostly han/kana among the non-space characters: the character rules apply."""
    chars = sum(1 for ch in text if not ch.isspace())
    return chars > 0 and len(_CJK.findall(text)) / chars >= (cfg or FilterConfig()).cjk_fraction


def units_of(text: str, cjk: bool) -> list[str]:
    """What n-gram rules count: words for spaced languages, characters for CJK."""
    return [ch for ch in text if not ch.isspace()] if cjk else text.split()


def _duplicates(items: list[str]) -> tuple[int, int]:
    """(number of items seen before, their characters), as Gopher counts repeated lines."""
    seen, n, chars = set(), 0, 0
    for it in items:
        if it in seen:
            n, chars = n + 1, chars + len(it)
        else:
            seen.add(it)
    return n, chars


def top_ngram_char_fraction(units: list[str], n: int) -> float:
    """Characters in the most frequent n-gram (times its count) over all characters."""
    grams = Counter(tuple(units[i: i + n]) for i in range(len(units) - n + 1))
    if not grams:
        return 0.0
    gram, count = grams.most_common(1)[0]
    if count < 2:
        return 0.0
    total = sum(len(u) for u in units) or 1
    return sum(len(u) for u in gram) * count / total


def dup_ngram_char_fraction(units: list[str], n: int) -> float:
    """Characters of the units covered by n-grams that occurred earlier (each unit counted once)."""
    total = sum(len(u) for u in units)
    if total == 0 or len(units) < n:
        return 0.0
    seen: set[tuple[str, ...]] = set()
    covered = [False] * len(units)
    for i in range(len(units) - n + 1):
        gram = tuple(units[i: i + n])
        if gram in seen:
            for j in range(i, i + n):
                covered[j] = True
        else:
            seen.add(gram)
    return sum(len(u) for u, c in zip(units, covered) if c) / total


# --------------------------------------------------------------------------------------
# the rules: text -> None (keep) or the rule's name (drop)
# --------------------------------------------------------------------------------------


def gopher_quality(text: str, cfg: FilterConfig, lang: str = "") -> str | None:
    """Gopher's quality filter for a spaced language (Rae et al. 2021, A.1.1)."""
    tokens = text.split()
    words = [w for w in tokens if any(ch not in _PUNCT for ch in w)]  # a lone ',' or '.' is not a word
    if not cfg.min_words <= len(words) <= cfg.max_words:
        return "gopher_word_count"
    mean = sum(len(w) for w in words) / len(words)
    if not cfg.min_mean_word_length <= mean <= cfg.max_mean_word_length:
        return "gopher_mean_word_length"
    if (text.count("#") / len(words) > cfg.max_symbol_word_ratio
            or (text.count("...") + text.count("…")) / len(words) > cfg.max_symbol_word_ratio):
        return "gopher_symbol_ratio"
    lines = lines_of(text)
    if sum(line.startswith(BULLETS) for line in lines) / len(lines) > cfg.max_bullet_lines:
        return "gopher_bullet_lines"
    if sum(line.endswith(ELLIPSES) for line in lines) / len(lines) > cfg.max_ellipsis_lines:
        return "gopher_ellipsis_lines"
    if sum(any(ch.isalpha() for ch in w) for w in words) / len(words) < cfg.min_alpha_words:
        return "gopher_alpha_words"
    if lang == "en" and len(STOP_WORDS.intersection(w.lower() for w in words)) < cfg.min_stop_words:
        return "gopher_stop_words"
    return None


def cjk_quality(text: str, cfg: FilterConfig) -> str | None:
    """The word-count bound, in characters, for text without spaces; the line rules as Gopher's."""
    chars = sum(1 for ch in text if not ch.isspace())
    if not cfg.cjk_min_chars <= chars <= cfg.cjk_max_chars:
        return "cjk_char_count"
    lines = lines_of(text)
    if sum(line.startswith(BULLETS) for line in lines) / len(lines) > cfg.max_bullet_lines:
        return "gopher_bullet_lines"
    if sum(line.endswith(ELLIPSES) for line in lines) / len(lines) > cfg.max_ellipsis_lines:
        return "gopher_ellipsis_lines"
    return None


def gopher_repetition(text: str, cfg: FilterConfig, cjk: bool = False) -> str | None:
    """Gopher's repetition filter (Rae et al. 2021, Table A1)."""
    chars = len(text) or 1
    lines, paras = lines_of(text), paragraphs_of(text)
    n_dup_lines, dup_line_chars = _duplicates(lines)
    n_dup_paras, dup_para_chars = _duplicates(paras)
    if n_dup_lines / max(len(lines), 1) > cfg.max_dup_line_fraction:
        return "gopher_dup_line_fraction"
    if n_dup_paras / max(len(paras), 1) > cfg.max_dup_paragraph_fraction:
        return "gopher_dup_paragraph_fraction"
    if dup_line_chars / chars > cfg.max_dup_line_chars:
        return "gopher_dup_line_chars"
    if dup_para_chars / chars > cfg.max_dup_paragraph_chars:
        return "gopher_dup_paragraph_chars"
    units = units_of(text, cjk)
    for n, limit in sorted(cfg.max_top_ngram_chars.items()):
        if top_ngram_char_fraction(units, n) > limit:
            return "gopher_top_ngram"
    for n, limit in sorted(cfg.max_dup_ngram_chars.items()):
        if dup_ngram_char_fraction(units, n) > limit:
            return "gopher_dup_ngram"
    return None


def c4_remove_javascript_lines(text: str) -> str:
    """C4 drops every line that mentions javascript ("please enable JavaScript" boilerplate)."""
    if "javascript" not in text.lower():
        return text
    return "\n".join(line for line in text.split("\n") if "javascript" not in line.lower()).strip()


def c4_rules(text: str, cfg: FilterConfig) -> str | None:
    """C4's page rules (Raffel et al. 2020, 2.2) and its line-punctuation rule per document."""
    low = text.lower()
    if cfg.c4_lorem_ipsum and "lorem ipsum" in low:
        return "c4_lorem_ipsum"
    if cfg.c4_curly_bracket and "{" in text:
        return "c4_curly_bracket"
    lines = lines_of(text)
    if lines and sum(line.endswith(TERMINAL_PUNCT) for line in lines) / len(lines) < cfg.min_terminal_punct_lines:
        return "c4_terminal_punct"
    return None


# --------------------------------------------------------------------------------------
# HTML and language
# --------------------------------------------------------------------------------------


def html_main_text(html: str) -> str | None:
    """The main text of a web page (trafilatura: navigation, footers and ads removed), or None.

    favor_precision: a page of navigation only gives None rather than its menu as "text".
    """
    import trafilatura

    return trafilatura.extract(html, include_comments=False, include_tables=False, deduplicate=False,
                               favor_precision=True) or None


def detect_language(text: str) -> tuple[str, bool]:
    """(cld2 language code, reliable?). Codes are cld2's ("en", "zh", "zh-Hant", "ja"); "un" unknown."""
    import pycld2

    try:
        reliable, _, details = pycld2.detect(text)
    except pycld2.error:  # cld2 refuses some control characters: drop them and try once more
        cleaned = "".join(ch for ch in text if ch.isprintable() or ch in "\n\t ")
        try:
            reliable, _, details = pycld2.detect(cleaned.encode("utf-8", "ignore").decode("utf-8"))
        except pycld2.error:
            return "un", False
    code = details[0][1] if details else "un"
    return code, bool(reliable) and code != "un"


def language_rule(lang: str, reliable: bool, cfg: FilterConfig) -> str | None:
    if not cfg.langs:
        return None  # no keep-list: every language is kept, detected or not
    if not reliable:
        return "language_unreliable"
    return None if lang.split("-")[0] in cfg.langs or lang in cfg.langs else "language"


# --------------------------------------------------------------------------------------
# all of them
# --------------------------------------------------------------------------------------


def check(text: str, cfg: FilterConfig) -> tuple[str, str, str | None]:
    """(the text as filtered, its language, the rule that drops it or None)."""
    if not text.strip():
        return text, "", "empty"
    if cfg.c4_javascript:
        text = c4_remove_javascript_lines(text)
        if not text:
            return text, "", "c4_javascript"
    lang, reliable = detect_language(text)
    if rule := language_rule(lang, reliable, cfg):
        return text, lang, rule
    cjk = is_cjk(text, cfg)
    rule = (cjk_quality(text, cfg) if cjk else gopher_quality(text, cfg, lang if reliable else "")) \
        or gopher_repetition(text, cfg, cjk) or c4_rules(text, cfg)
    return text, lang, rule
