"""The knowledge-base index on the real MiniLM embedder: hybrid search, incremental ingest,
atomic generations, rejection calibration."""

from __future__ import annotations

import os

import pytest

from hanlin.rag import KBError, KnowledgeBase, tokenize

DOCS = {
    "finetune.md": "# Fine-tuning\nRun `hanlin finetune --data facts.jsonl` to train a LoRA adapter.\n## Resume\n"
                   "A stopped run continues from its last checkpoint with --resume; the optimizer state is restored.",
    "serve.md": "# Serving\n`hanlin serve` starts an OpenAI-compatible server on 127.0.0.1:8000.\n## Limits\n"
                "A full queue answers HTTP 429 with a Retry-After header.",
    "devices.txt": "The device layer finds the CPU, NVIDIA GPUs through nvidia-smi and Ascend NPUs through npu-smi.",
    "假期.md": "# 年假规定\n员工每年享有十五天带薪年假。未休完的年假可以顺延到次年三月。",
}


class Counting:
    """The real embedder, counting the texts it embeds (to see what an ingest re-embeds)."""

    def __init__(self, inner, fail_after: int | None = None):
        self.inner, self.texts, self.fail_after = inner, 0, fail_after

    def embed(self, texts):
        if self.fail_after is not None and self.texts + len(texts) > self.fail_after:
            raise RuntimeError("simulated crash while embedding")
        self.texts += len(texts)
        return self.inner.embed(texts)


def write(root, files):
    root.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (root / name).write_text(text, encoding="utf-8")


def test_tokenize_cuts_chinese_with_jieba_and_drops_stop_words():
    assert tokenize("How do I resume a fine-tune?") == ["resume", "fine-tune"]
    words = tokenize("未休完的年假可以顺延")
    assert "顺延" in words and "可以" in words and "的" not in words


def test_ingest_search_incremental_and_removed(tmp_path, embedder):
    root, kbdir = tmp_path / "docs", tmp_path / "kb"
    write(root, DOCS)
    (root / "broken.docx").write_bytes(b"not a zip")
    counting = Counting(embedder)
    kb = KnowledgeBase(kbdir, embedder=counting)
    with pytest.raises(KBError, match="holds no knowledge base yet"):
        kb.search("anything")
    r = kb.ingest(root)
    assert sorted(r.added) == sorted(DOCS) and r.skipped == [("broken.docx", "not a valid docx file (it is not a zip archive)")]
    first_embedded = counting.texts
    assert first_embedded == r.chunks >= 6

    top = kb.search("how do I continue a fine-tune that stopped?", k=3)[0]
    assert (top.path, top.location) == ("finetune.md", "Fine-tuning > Resume") and top.citation() == "finetune.md (Fine-tuning > Resume)"
    assert kb.search("what status code when the queue is full", k=1)[0].path == "serve.md"
    assert kb.search("年假可以顺延到什么时候", k=1)[0].path == "假期.md"
    assert kb.search("npu-smi", k=1)[0].path == "devices.txt"  # an exact name: BM25's part
    only_bm25 = kb.search("npu-smi", k=3, mode="bm25")  # one ranking alone (the benchmark's baselines)
    assert only_bm25[0].path == "devices.txt" and all(h.bm25 > 0 for h in only_bm25)
    assert len(kb.search("npu-smi", k=3, mode="dense")) == 3
    with pytest.raises(ValueError, match="search mode 'fuzzy'"):
        kb.search("npu-smi", mode="fuzzy")

    before = counting.texts  # (the searches above embedded their questions)
    again = KnowledgeBase(kbdir, embedder=counting).ingest(root)  # nothing changed: nothing read or embedded
    assert sorted(again.unchanged) == sorted(DOCS) and not again.added and not again.changed and counting.texts == before

    (root / "serve.md").write_text("# Serving\n`hanlin serve --port 9000` listens on port 9000 when asked.", encoding="utf-8")
    os.remove(root / "devices.txt")
    r3 = KnowledgeBase(kbdir, embedder=counting).ingest(root)
    assert r3.changed == ["serve.md"] and r3.removed == ["devices.txt"] and counting.texts == before + 1  # one new chunk
    kb3 = KnowledgeBase(kbdir, embedder=counting)
    assert all(h.path != "devices.txt" for h in kb3.search("nvidia-smi npu-smi device layer", k=10))
    assert kb3.search("which port does the server listen on", k=1)[0].text.startswith("`hanlin serve --port 9000`")
    top = kb3.search("how do I continue a fine-tune that stopped?", k=1)[0]
    assert top.location == "Fine-tuning > Resume"  # reused vectors still line up with their chunks
    assert sorted(p.name for p in kbdir.iterdir()) == ["CURRENT", "gen-000003"]


def test_a_crash_mid_ingest_leaves_the_previous_index_live(tmp_path, embedder, monkeypatch):
    root, kbdir = tmp_path / "docs", tmp_path / "kb"
    write(root, DOCS)
    KnowledgeBase(kbdir, embedder=embedder).ingest(root)
    write(root, {"new.md": "# New\nThe terminal app opens with `hanlin` alone."})
    with pytest.raises(RuntimeError, match="simulated crash"):  # dies while embedding
        KnowledgeBase(kbdir, embedder=Counting(embedder, fail_after=0)).ingest(root)
    real_replace = os.replace

    def crash_on_switch(src, dst):  # dies after writing the new generation, before it goes live
        if str(src).endswith(".partial"):
            raise KeyboardInterrupt("simulated crash while switching")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_switch)
    with pytest.raises(KeyboardInterrupt):
        KnowledgeBase(kbdir, embedder=embedder).ingest(root)
    monkeypatch.setattr(os, "replace", real_replace)
    kb = KnowledgeBase(kbdir, embedder=embedder)
    assert (kbdir / "CURRENT").read_text().strip() == "gen-000001" and (kbdir / "gen-000002.partial").is_dir()
    assert all(h.path != "new.md" for h in kb.search("terminal app", k=10))  # the old index, whole and usable
    assert kb.search("how do I continue a fine-tune that stopped?", k=1)[0].path == "finetune.md"
    r = kb.ingest(root)  # the next ingest cleans up and goes live
    assert r.added == ["new.md"] and sorted(p.name for p in kbdir.iterdir()) == ["CURRENT", "gen-000002"]


def test_calibrated_rejection_declines_unrelated_questions(tmp_path, embedder):
    root, kbdir = tmp_path / "docs", tmp_path / "kb"
    write(root, DOCS)
    kb = KnowledgeBase(kbdir, embedder=embedder)
    kb.ingest(root)
    good = ["How do I resume fine-tuning from a checkpoint?", "What does the server answer when its queue is full?",
            "Which tool finds Ascend NPUs?", "How do I train a LoRA adapter?"]  # fmt: skip
    bad = ["What is a good recipe for banana bread?", "Who won the 1998 football world cup?",
           "How tall is Mount Kilimanjaro?", "Recommend a novel about sailing."]  # fmt: skip
    result = kb.calibrate(good, bad)
    assert result["accuracy"] == 1.0 and min(result["good_scores"]) > result["threshold"] > max(result["bad_scores"])
    kb2 = KnowledgeBase(kbdir, embedder=embedder)  # the threshold is saved with the index
    assert kb2.manifest["threshold"] == result["threshold"]
    assert kb2.answerable("Can a stopped fine-tune run be continued?")[0] is True
    assert kb2.answerable("What is the best way to grow tomatoes?")[0] is False
    with pytest.raises(ValueError, match="at least 2 good and 2 bad"):
        kb2.calibrate(good[:1], bad)
    # a caller that already searched (k >= 5) passes its hits: the same decision, no second search
    for question in ("Can a stopped fine-tune run be continued?", "What is the best way to grow tomatoes?"):
        expected = kb2.answerable(question)
        hits = kb2.search(question, k=8)
        searches = []
        real_search = kb2.search
        kb2.search = lambda *a, **k: searches.append(a) or real_search(*a, **k)
        assert kb2.answerable(question, hits) == expected and searches == []
        assert kb2.answerable(question, hits[:2]) == expected and len(searches) == 1  # too few hits: it searches itself
        del kb2.search


def test_kb_command_line(tmp_path, minilm_folder):
    import json

    from conftest import run_cli

    root, kbdir = tmp_path / "docs", tmp_path / "kb"
    write(root, DOCS)
    (tmp_path / "good.txt").write_text("How do I resume fine-tuning?\nWhat does a full queue answer?\nWhich tool finds Ascend NPUs?\n")
    (tmp_path / "bad.txt").write_text("A recipe for banana bread?\nWho won the 1998 world cup?\nHow tall is Kilimanjaro?\n")
    common = ["--kb", str(kbdir), "--embedding-model", minilm_folder]
    p = run_cli("kb", "ingest", str(root), *common)
    assert p.returncode == 0, p.stderr
    assert "4 added, 0 changed, 0 unchanged, 0 removed, 0 skipped" in p.stdout
    p = run_cli("kb", "calibrate", *common, "--good", str(tmp_path / "good.txt"), "--bad", str(tmp_path / "bad.txt"))
    assert p.returncode == 0 and "6/6 example questions decided right" in p.stdout, p.stdout + p.stderr
    p = run_cli("kb", "search", "how do I continue a stopped fine-tune", *common, "--json")
    out = json.loads(p.stdout)
    assert out["answerable"] is True and out["hits"][0]["path"] == "finetune.md"
    p = run_cli("kb", "ask", "What is the best way to grow tomatoes?", *common, "--json")
    out = json.loads(p.stdout)
    assert out["declined"] is True and out["sources"] == []
    p = run_cli("kb", "ask", "How do I continue a fine-tune run that stopped?", *common, "--json", "--engine", "gguf")
    out = json.loads(p.stdout)
    assert out["declined"] is False and out["answer"] and out["sources"][0] == "finetune.md (Fine-tuning > Resume)"
    p = run_cli("kb", "search", "anything", "--kb", str(tmp_path / "empty"), "--embedding-model", minilm_folder)
    assert p.returncode == 2 and "holds no knowledge base yet" in p.stderr
    p = run_cli("kb", "ingest", str(tmp_path / "missing"), *common)
    assert p.returncode == 2 and "is not a directory" in p.stderr
