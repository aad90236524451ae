"""`hanlin data prepare`: every document lands in its rule, the shards decode back, the output
is the same for any worker count and executor, and bad input is named.

The raw corpus is built here from real text: WikiText-2 test articles, one of them wrapped
in a web page's navigation and footer, a Chinese and a German paragraph, spam, duplicates,
an empty file and a broken JSONL line.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import re

import numpy as np
import pytest

pytest.importorskip("trafilatura")
pytest.importorskip("pycld2")
pytest.importorskip("datasketch")
pytest.importorskip("tokenizers")

from hanlin.data import DataPrepError, FilterConfig, NoDocumentsError, prepare  # noqa: E402
from hanlin.data import filters as F  # noqa: E402
from hanlin.data.dedup import Deduper, exact_key, signature  # noqa: E402
from hanlin.train.shards import ShardError, TokenShards  # noqa: E402

WIKITEXT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "datasets", "wikitext2", "test.txt")

CHINESE = (
    "长江是亚洲第一长河，也是世界第三长河，全长约六千三百公里。它发源于青藏高原的唐古拉山脉，"
    "自西向东流经青海、西藏、四川、云南、重庆、湖北、湖南、江西、安徽、江苏和上海，最后注入东海。\n"
    "长江流域面积广阔，气候温和，雨量充沛，自古以来就是中国重要的农业区和经济带。"
    "流域内的城市众多，人口稠密，交通便利，工业和商业都十分发达。\n"
    "三峡工程是长江上最著名的水利工程，它在防洪、发电和航运等方面发挥着重要的作用。"
    "与此同时，人们也越来越关注长江的生态保护，希望让这条母亲河永远清澈美丽。"
)
GERMAN = (
    "Der Rhein ist einer der wichtigsten Flüsse Europas. Er entspringt in den Schweizer Alpen und fließt "
    "durch Deutschland und die Niederlande bis zur Nordsee. Seit der Römerzeit ist der Fluss eine bedeutende "
    "Handelsstraße, und an seinen Ufern liegen viele alte Städte wie Köln, Mainz und Basel. Die Landschaft "
    "des Mittelrheins mit ihren Burgen und Weinbergen gehört heute zum Welterbe der UNESCO und zieht jedes "
    "Jahr zahlreiche Besucher aus aller Welt an, die mit dem Schiff durch das enge Tal fahren."
)
NAV = '<nav><ul><li><a href="/">Home</a></li><li><a href="/about">About us</a></li><li><a href="/contact">Contact</a></li></ul></nav>'
FOOTER = "<footer><p>Copyright 2024 Example Media Group. All rights reserved. Privacy policy | Terms of use</p></footer>"


def wikitext_articles() -> list[str]:
    """The test set's articles (a heading ` = Title = ` with single '=' starts one)."""
    with open(WIKITEXT, encoding="utf-8") as f:
        lines = f.read().split("\n")
    arts, cur = [], None
    for line in lines:
        if re.fullmatch(r" = [^=].* = ", line):
            if cur:
                arts.append("\n".join(cur))
            cur = [line]
        elif cur is not None:
            cur.append(line)
    arts.append("\n".join(cur))
    return arts


KEEP = (12, 14, 15, 21, 27, 42, 45, 46, 52, 53, 54)  # short articles that pass every rule
HTML_ARTICLE = 9
DUP_NGRAM_ARTICLE = 0  # "Robert <unk>": its lead repeats sentences of its body


def symbol_spam() -> str:
    tags = ["#sale", "#deal", "#win", "#promo", "#free", "#hot", "#new", "#shop"]
    return "\n".join(f"Great offers on shoes and bags for everyone today {' '.join(tags[i % 8:] + tags[:i % 8])} ..."
                     for i in range(12))


def repeated_lines() -> str:
    lines = ["Click here to subscribe to our newsletter and win a prize."] * 20
    return "\n".join(lines + ["This page was last updated on a day that nobody remembers, and it will not be updated again."])


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, default_model_path):
    """The default model's tokenizer.json, converted once (what prepare does when not given one)."""
    from hanlin.backends.tokenizer import write_tokenizer_files

    out = str(tmp_path_factory.mktemp("tok"))
    write_tokenizer_files(default_model_path, out)
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """raw/ with one document per expected outcome; returns (folder, expected) where expected maps a
    document's (file name, location) to its rule, or to "kept" with its expected text."""
    arts = wikitext_articles()
    raw = tmp_path_factory.mktemp("raw")
    expect: dict[tuple[str, str], tuple[str, str | None]] = {}

    def put(name: str, text: str, outcome: str, kept_text: str | None = None) -> None:
        (raw / name).write_text(text, encoding="utf-8")
        expect[(name, "")] = (outcome, kept_text if outcome == "kept" else None)

    for i in KEEP:
        put(f"a{i:02d}.txt", arts[i], "kept", arts[i])
    body = "".join(f"<p>{html.escape(p.strip())}</p>\n" for p in arts[HTML_ARTICLE].split("\n") if p.strip())
    put("b_page.html", f"<html><head><title>News</title></head><body>{NAV}<main><article>{body}</article></main>{FOOTER}</body></html>",
        "kept")
    put("b_navonly.html", f"<html><body>{NAV}{FOOTER}</body></html>", "html_no_main_text")
    put("c_chinese.md", CHINESE, "kept", CHINESE)
    put("c_german.txt", GERMAN, "language")
    put("d_symbols.txt", symbol_spam(), "gopher_symbol_ratio")
    put("d_repeated.txt", repeated_lines(), "gopher_dup_line_fraction")
    put("d_robert.txt", arts[DUP_NGRAM_ARTICLE], "gopher_dup_ngram")
    put("d_lorem.txt", arts[KEEP[0]].replace("\n", " Lorem ipsum dolor sit amet.\n", 1), "c4_lorem_ipsum")
    put("d_short.txt", "A sentence that is far too short to be a document.", "gopher_word_count")
    put("e_empty.txt", "  \n\n ", "empty")
    put("z_exact_dup.md", arts[KEEP[1]].upper(), "duplicate_exact")  # same words, other case: the normalized text matches
    near = arts[KEEP[2]].replace(" the ", " a ", 3).replace("football", "soccer", 2)
    assert near != arts[KEEP[2]]
    put("z_near_dup.txt", near, "duplicate_near")
    good = arts[KEEP[3]]
    (raw / "j.jsonl").write_text("\n".join([json.dumps({"text": good[:2000] + " Extra jsonl words end here ."}),
                                            "{not json",
                                            json.dumps({"body": "no text field"})]) + "\n", encoding="utf-8")
    expect[("j.jsonl", "line 1")] = ("kept", good[:2000] + " Extra jsonl words end here .")
    expect[("j.jsonl", "line 2")] = ("bad_record", None)
    expect[("j.jsonl", "line 3")] = ("bad_record", None)
    (raw / "ignored.csv").write_text("a,b\n", encoding="utf-8")
    return str(raw), expect


def run(corpus, tokenizer_dir, out, **kw):
    raw, _ = corpus
    kw.setdefault("langs", "en,zh")
    kw.setdefault("workers", 2)
    return prepare([raw], str(out), tokenizer=tokenizer_dir, **kw)


@pytest.fixture(scope="module")
def prepared(corpus, tokenizer_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("o") / "shards"
    return run(corpus, tokenizer_dir, out, heldout=0.3), str(out)


def documents(folder: str, split: str) -> list[list[int]]:
    """Every document's ids (EOS removed) from the .bin/.idx files, read without TokenShards."""
    manifest = json.load(open(os.path.join(folder, "manifest.json")))
    docs = []
    for rec in manifest["splits"][split]["shards"]:
        ids = np.fromfile(os.path.join(folder, rec["bin"]), dtype=manifest["dtype"])
        offsets = np.load(os.path.join(folder, rec["idx"]))
        for a, b in zip(offsets[:-1], offsets[1:]):
            assert ids[b - 1] == manifest["eos_id"]
            docs.append(ids[a: b - 1].tolist())
    return docs


def shard_bytes(folder: str) -> dict[str, bytes]:
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))
            if n.endswith((".bin", ".idx")) or n == "manifest.json"}


# --------------------------------------------------------------------------------------
# the whole pipeline
# --------------------------------------------------------------------------------------


def test_every_document_lands_in_its_rule(prepared, corpus):
    report, out = prepared
    _, expect = corpus
    # the accounting invariant, and the counts per rule
    assert report.documents == len(expect)
    assert report.kept + sum(report.dropped.values()) == report.documents
    want: dict[str, int] = {}
    for outcome, _ in expect.values():
        want[outcome] = want.get(outcome, 0) + 1
    assert report.kept == want.pop("kept")
    assert report.dropped == want
    # each dropped document is named in its rule's samples (every rule here has at most 5)
    for (name, loc), (outcome, _) in expect.items():
        if outcome != "kept":
            where = {(os.path.basename(s["source"]), s["location"]) for s in report.samples[outcome]}
            assert (name, loc) in where, (name, loc, outcome)
    assert report.samples["duplicate_exact"][0]["duplicate_of"].startswith("document ")
    assert [os.path.basename(p) for p in report.skipped_files] == ["ignored.csv"]
    assert report.languages.get("zh") == 1
    saved = json.load(open(os.path.join(out, "report.json")))
    assert saved["dropped"] == report.dropped and saved["kept"] == report.kept
    md = open(os.path.join(out, "report.md")).read()
    assert "`duplicate_near`" in md and "d_symbols.txt" in md


def test_shards_decode_to_the_kept_texts(prepared, corpus, tokenizer_dir):
    from tokenizers import Tokenizer

    report, out = prepared
    _, expect = corpus
    tok = Tokenizer.from_file(os.path.join(out, "tokenizer", "tokenizer.json"))
    assert json.load(open(os.path.join(out, "manifest.json")))["eos_id"] == tok.token_to_id("<|endoftext|>")
    decoded = [tok.decode(ids, skip_special_tokens=False) for split in ("train", "heldout") for ids in documents(out, split)]
    assert len(decoded) == report.kept
    for (name, _), (outcome, text) in expect.items():
        if outcome == "kept" and text is not None:
            assert text in decoded, name
    paragraphs = [p.strip() for p in wikitext_articles()[HTML_ARTICLE].split("\n") if p.strip()]
    page = [d for d in decoded if paragraphs[1] in d and paragraphs[-1] in d]
    assert len(page) == 1 and "Home" not in page[0], "the HTML page's article is kept without its navigation and footer"
    assert all("Copyright 2024" not in d and "About us" not in d for d in decoded)
    assert TokenShards(out, "train").tokens == report.splits["train"]["tokens"]


def test_heldout_split_is_chosen_by_text_hash(prepared, tokenizer_dir):
    from tokenizers import Tokenizer

    report, out = prepared
    tok = Tokenizer.from_file(os.path.join(out, "tokenizer", "tokenizer.json"))
    held = [tok.decode(ids, skip_special_tokens=False) for ids in documents(out, "heldout")]
    train = [tok.decode(ids, skip_special_tokens=False) for ids in documents(out, "train")]
    assert held and train
    in_heldout = lambda t: int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "big") / 2**64 < 0.3  # noqa: E731
    assert all(in_heldout(t) for t in held) and not any(in_heldout(t) for t in train)
    assert report.splits["heldout"]["docs"] == len(held)


def test_same_output_for_one_and_two_workers(prepared, corpus, tokenizer_dir, tmp_path):
    _, out2 = prepared
    r1 = run(corpus, tokenizer_dir, tmp_path / "w1", heldout=0.3, workers=1)
    assert r1.workers == 1
    assert shard_bytes(str(tmp_path / "w1")) == shard_bytes(out2)


def test_ray_executor_equals_local(prepared, corpus, tokenizer_dir, tmp_path):
    pytest.importorskip("ray")
    report, out = prepared
    rr = run(corpus, tokenizer_dir, tmp_path / "ray", heldout=0.3, executor="ray")
    assert rr.executor == "ray" and rr.dropped == report.dropped
    assert shard_bytes(str(tmp_path / "ray")) == shard_bytes(out)


# --------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------


def test_existing_out_refused_then_replaced_with_force(corpus, tokenizer_dir, tmp_path):
    out = tmp_path / "shards"
    out.mkdir()
    (out / "old.txt").write_text("previous", encoding="utf-8")
    with pytest.raises(DataPrepError, match=re.escape(str(out))):
        run(corpus, tokenizer_dir, out, workers=1)
    assert (out / "old.txt").exists()
    run(corpus, tokenizer_dir, out, workers=1, force=True)
    assert not (out / "old.txt").exists() and (out / "manifest.json").exists()
    assert sorted(os.listdir(tmp_path)) == ["shards"]  # no temp or old folder left beside it


def test_zero_survivors_stops_with_the_report(tmp_path, tokenizer_dir):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.txt").write_text("", encoding="utf-8")
    (raw / "b.txt").write_text(repeated_lines(), encoding="utf-8")
    out = tmp_path / "shards"
    with pytest.raises(NoDocumentsError, match=r"no documents survived.*empty 1.*gopher_dup_line_fraction 1") as e:
        prepare([str(raw)], str(out), tokenizer=tokenizer_dir, workers=1)
    assert not out.exists()
    assert e.value.report.documents == 2
    assert json.load(open(str(out) + ".report.json"))["dropped"] == {"empty": 1, "gopher_dup_line_fraction": 1}
    assert sorted(os.listdir(tmp_path)) == ["raw", "shards.report.json", "shards.report.md"]


def test_interrupt_leaves_nothing_at_out(corpus, tokenizer_dir, tmp_path, monkeypatch):
    import hanlin.data.pipeline as P

    def boom(text, heldout):
        raise KeyboardInterrupt

    monkeypatch.setattr(P, "split_of", boom)
    with pytest.raises(KeyboardInterrupt):
        run(corpus, tokenizer_dir, tmp_path / "shards", workers=1)
    assert os.listdir(tmp_path) == []


def test_missing_input_is_named(tmp_path, tokenizer_dir):
    with pytest.raises(DataPrepError, match="nowhere/raw does not exist"):
        prepare([str(tmp_path / "nowhere" / "raw")], str(tmp_path / "o"), tokenizer=tokenizer_dir)
    assert not (tmp_path / "o").exists()


def test_corrupted_shard_is_named(prepared, tmp_path):
    import shutil

    _, out = prepared
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    TokenShards(str(copy), "train")  # intact: opens
    path = copy / "train-00000.bin"
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="shard train-00000.bin fails its checksum"):
        TokenShards(str(copy), "train")


def test_cli_prints_the_rule_table(corpus, tokenizer_dir, tmp_path, capsys):
    from hanlin.apps.cli import main

    raw, _ = corpus
    out = tmp_path / "cli"
    assert main(["data", "prepare", raw, str(out), "--tokenizer", tokenizer_dir, "--workers", "1", "--langs", "en,zh"]) == 0
    captured = capsys.readouterr()
    assert re.search(r"duplicate_near\s+1", captured.out) and re.search(r"kept\s+14", captured.out)
    assert "data prepare:" in captured.err
    assert main(["data", "prepare", raw, str(out), "--tokenizer", tokenizer_dir]) == 2
    assert "already exists" in capsys.readouterr().err


# --------------------------------------------------------------------------------------
# the rules, one by one
# --------------------------------------------------------------------------------------


ARTICLE = wikitext_articles()[KEEP[0]] if os.path.isfile(WIKITEXT) else ""
CFG = FilterConfig()


def test_gopher_quality_rules():
    assert F.gopher_quality(ARTICLE, CFG, "en") is None
    assert F.gopher_quality("too few words here", CFG) == "gopher_word_count"
    assert F.gopher_quality(" ".join(["a"] * 60), CFG) == "gopher_mean_word_length"
    assert F.gopher_quality(" ".join(["extraordinarily"] * 60), CFG) == "gopher_mean_word_length"
    assert F.gopher_quality(symbol_spam(), CFG) == "gopher_symbol_ratio"
    bullets = "\n".join(f"- item number {i} with some words in it" for i in range(20))
    assert F.gopher_quality(bullets, CFG) == "gopher_bullet_lines"
    ellipsis = "\n".join(f"line {i} of a story that trails away into nothing at all …" for i in range(3)) + "\n" + ARTICLE
    assert F.gopher_quality(ellipsis[:400], CFG) in ("gopher_ellipsis_lines", "gopher_symbol_ratio")
    numbers = " ".join(str(1000 + i) for i in range(80)) + " the and of with"
    assert F.gopher_quality(numbers, CFG) == "gopher_alpha_words"
    no_stop = " ".join(["purple elephants dance quietly"] * 20)
    assert F.gopher_quality(no_stop, CFG, "en") == "gopher_stop_words"
    assert F.gopher_quality(no_stop, CFG, "de") is None  # stop words are an English rule


def test_gopher_repetition_rules():
    assert F.gopher_repetition(ARTICLE, CFG) is None
    assert F.gopher_repetition(repeated_lines(), CFG) == "gopher_dup_line_fraction"
    # one long line repeated once among short unique ones: few duplicate lines, many duplicate characters
    long = "This long line is the one that repeats and carries most of the characters of the page. " * 3
    text = "\n".join([long, long] + [f"unique line number {i}." for i in range(6)])
    assert F.gopher_repetition(text, CFG) == "gopher_dup_line_chars"
    assert F.top_ngram_char_fraction("a b a b a b".split(), 2) == pytest.approx(6 / 6)
    assert F.dup_ngram_char_fraction("w1 w2 w3 w4 w5 x w1 w2 w3 w4 w5".split(), 5) == pytest.approx(10 / 21)  # the repeat, not the first occurrence
    assert F.dup_ngram_char_fraction("one two three four five six seven".split(), 5) == 0.0


def test_c4_rules_and_javascript_lines():
    assert F.c4_rules(ARTICLE, CFG) is None
    assert F.c4_rules(ARTICLE + "\nlorem ipsum dolor sit amet.", CFG) == "c4_lorem_ipsum"
    assert F.c4_rules(ARTICLE + "\nfunction f() { return 1; }", CFG) == "c4_curly_bracket"
    assert F.c4_rules("\n".join(f"Menu entry {i}" for i in range(20)), CFG) == "c4_terminal_punct"
    cleaned = F.c4_remove_javascript_lines("Please enable JavaScript to view this page.\nThe real text.")
    assert cleaned == "The real text."
    assert F.check("Please enable JavaScript.", CFG)[2] == "c4_javascript"


def test_language_and_cjk():
    assert F.detect_language(ARTICLE) == ("en", True)
    assert F.detect_language(CHINESE)[0].startswith("zh")
    assert F.detect_language(GERMAN) == ("de", True)
    keep = FilterConfig(langs=("en", "zh"))
    assert F.language_rule("de", True, keep) == "language"
    assert F.language_rule("zh-Hant", True, keep) is None
    assert F.language_rule("un", False, keep) == "language_unreliable"
    assert F.language_rule("un", False, CFG) is None  # no keep-list: unreliable is kept
    assert F.is_cjk(CHINESE) and not F.is_cjk(ARTICLE)
    assert F.check(CHINESE, keep)[2] is None
    assert F.check(CHINESE[:40], keep)[2] == "cjk_char_count"


def test_dedup_exact_and_near():
    d = Deduper(0.8)
    near = ARTICLE.replace(" the ", " a ", 2)
    other = wikitext_articles()[KEEP[1]]
    assert d.check(0, exact_key(ARTICLE), signature(ARTICLE)) == (None, None)
    assert d.check(1, exact_key(ARTICLE.upper()), signature(ARTICLE.upper())) == ("duplicate_exact", 0)
    assert d.check(2, exact_key(near), signature(near)) == ("duplicate_near", 0)
    assert d.check(3, exact_key(other), signature(other)) == (None, None)
    with pytest.raises(DataPrepError, match="threshold 1.5"):
        Deduper(1.5)


def test_a_literal_special_token_in_a_document_is_text_not_a_boundary(tmp_path, tokenizer_dir):
    raw = tmp_path / "raw"
    raw.mkdir()
    words = ARTICLE.split()
    quoted = " ".join(words[: len(words) // 2] + ["<|endoftext|>"] + words[len(words) // 2:])
    (raw / "a.txt").write_text(quoted)
    out = tmp_path / "shards"
    report = prepare([str(raw)], str(out), tokenizer=tokenizer_dir, workers=1)
    assert report.kept == 1
    (ids,) = documents(str(out), "train")
    eos = json.load(open(out / "manifest.json"))["eos_id"]
    assert eos not in ids  # the separator appears once, after the document, never inside it
