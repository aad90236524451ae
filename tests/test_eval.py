"""`hanlin eval` on the real default model, the real datasets in ../shared/datasets, a real
server on 127.0.0.1 and real files: specs, scoring modes, the answer cache, bad input, reports."""

from __future__ import annotations

import json
import os
import struct

import pytest

import hanlin
from hanlin.backends.base import ConfigError, HanlinError
from hanlin.evaluate import builtin_tasks, evaluate, load_spec, open_model
from hanlin.evaluate.cache import AnswerCache
from hanlin.evaluate.data import DataMissing, Prompter, default_data_dir, read_rows, resolve_files
from hanlin.evaluate.models import NoLogLikelihood
from hanlin.evaluate.runner import _rotations
from hanlin.evaluate.spec import Extractor

from conftest import run_cli

DATA = default_data_dir()
pytestmark = pytest.mark.skipif(DATA is None, reason="../shared/datasets is not here")  # CI and dev machines have it


@pytest.fixture(scope="module")
def native(default_model_path):
    pytest.importorskip("torch")
    m = open_model(hanlin.load(default_model_path, engine="torch", device="cpu", dtype="float32", ctx_size=2048))
    yield m
    m.close()


def one_subject(tmp_path, base: str = "cmmlu", subject: str = "agronomy") -> str:
    """A spec file of one's own: a built-in task narrowed to one CMMLU subject."""
    p = tmp_path / f"{base}_{subject}.toml"
    p.write_text(f'base = "{base}"\nname = "{base}_{subject}"\n[data]\npath = "cmmlu/test/{subject}.csv"\n', encoding="utf-8")
    return str(p)


# ---- specs, prompts, extraction ------------------------------------------------------


def test_builtin_specs_load_and_bad_specs_are_named(tmp_path):
    names = builtin_tasks()
    assert {"gsm8k", "cmmlu", "cmmlu_circular", "cmmlu_gen", "humaneval", "wikitext", "needle"} <= set(names)
    for n in names:
        assert load_spec(n).name == n
    assert load_spec("cmmlu_circular").circular and load_spec("cmmlu_circular").choices == ["A", "B", "C", "D"]
    cases = {
        'name = "x"\nmode = "vibes"\n[data]\npath = "a"': "mode 'vibes' is not one of",
        'name = "x"\nmode = "generate"\ncolour = 1\n[data]\npath = "a"': "unknown key(s) ['colour']",
        'name = "x"\nmode = "generate"\n[prompt]\ntext = "q"': "[data] needs `path`",
        'name = "x"\nmode = "generate"\n[data]\npath = "a"\n[prompt]\ntext = "q"\n[score]\nreference = "r"\n[score.extractors.e]\nregex = "(["':
            "extractor 'e' has an invalid regex",
        'base = "nope"\nname = "x"': "base 'nope' is not a built-in task",
        "name = [": "is not valid TOML",
    }  # fmt: skip
    for i, (text, msg) in enumerate(cases.items()):
        p = tmp_path / f"bad{i}.toml"
        p.write_text(text)
        with pytest.raises(ConfigError, match=None) as e:
            load_spec(str(p))
        assert msg in str(e.value) and str(p) in str(e.value)
    with pytest.raises(ConfigError, match="unknown task 'gsm9k': built-in tasks are .*gsm8k"):
        load_spec("gsm9k")


def test_extractors_and_normalisation_follow_lm_eval():
    spec = load_spec("gsm8k")
    strict, flexible = spec.extractors()
    text = "She pays $1,200.50 in total.\n#### 1,200\n\nThe answer is 7."
    assert strict(text) == "1,200"
    assert flexible(text) == "7."  # the last number ("." is in lm-eval's character class; the metric drops it)
    assert strict("no marker, 42") == "[invalid]"
    assert flexible("costs $5, then -3") == "-3"
    assert Extractor("t", "(a)|(b)", -1)("b then a") == "a"  # a tuple match gives its non-empty group
    from hanlin.evaluate.runner import _normalizer

    norm = _normalizer(spec)
    assert norm("$1,200.") == "1200" and norm("Eggs: 3\n#### 18") == "18" and norm(flexible(text)) == "7"


def test_cmmlu_prompt_is_lm_eval_s():
    spec = load_spec("cmmlu")
    p = Prompter(spec, DATA)
    rows, bad = read_rows(resolve_files(DATA, "cmmlu/test/agronomy.csv", "cmmlu"), spec.data["fields"], "subject")
    dev, _ = read_rows(resolve_files(DATA, "cmmlu/dev/agronomy.csv", "cmmlu"), spec.data["fields"])
    assert not bad and len(dev) == 5

    def block(r):
        return f"{r['Question'].strip()}\nA. {r['A']}\nB. {r['B']}\nC. {r['C']}\nD. {r['D']}\n答案："

    want = "以下是关于农学的单项选择题，请直接给出正确答案的选项。\n\n" + "".join(block(d) + " " + d["Answer"] + "\n\n" for d in dev) + block(rows[0])
    assert p.context(rows[0]) == want
    assert Prompter(spec, DATA, shots=0).context(rows[0]) == "以下是关于农学的单项选择题，请直接给出正确答案的选项。\n\n" + block(rows[0])


def test_circular_rotations_move_the_answer_with_its_option():
    spec = load_spec("cmmlu_circular")
    row = {"A": "w", "B": "x", "C": "y", "D": "z", "Answer": "C"}
    rots = _rotations(spec, row, 2)
    assert len(rots) == 4
    for rot, gold in rots:
        assert rot["ABCD"[gold]] == "y"  # the right option's text follows it
    assert [r["A"] for r, _ in rots] == ["w", "x", "y", "z"]


def test_cache_refuses_another_model_s_folder(tmp_path):
    path = str(tmp_path / "answers.sqlite")
    c = AnswerCache(path, {"model": "a"})
    c.put_many({"k": [1.5, True]})
    c.close()
    again = AnswerCache(path, {"model": "a"})
    assert again.get_many(["k", "missing"]) == {"k": [1.5, True]}
    again.close()
    with pytest.raises(ConfigError, match="holds the answers of another model"):
        AnswerCache(path, {"model": "b"})


# ---- bad input ------------------------------------------------------------------------


def test_missing_dataset_names_the_file(tmp_path, native):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataMissing, match=r"task gsm8k expects gsm8k/test.jsonl in .*empty \(looked for .*empty/gsm8k/test.jsonl\)"):
        evaluate(native, ["gsm8k"], data_dir=str(empty), limit=1)
    with pytest.raises(ConfigError, match="is not a directory"):
        evaluate(native, ["gsm8k"], data_dir=str(tmp_path / "nowhere"), limit=1)


def test_malformed_rows_are_reported_and_the_run_goes_on(tmp_path, native):
    d = tmp_path / "data" / "gsm8k"
    d.mkdir(parents=True)
    good = [json.loads(x) for x in open(os.path.join(DATA, "gsm8k", "test.jsonl"), encoding="utf-8").readlines()[:2]]
    lines = [json.dumps(good[0]), '{"question": "broken', json.dumps(good[1]), json.dumps({"question": "no answer"}), "[1, 2]"]
    (d / "test.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.symlink(os.path.join(DATA, "gsm8k", "train.jsonl"), d / "train.jsonl")
    res = evaluate(native, ["gsm8k"], data_dir=str(tmp_path / "data"), out_dir=str(tmp_path / "run"))
    t = res["tasks"][0]
    assert t["n"] == 2 and t["bad_row_count"] == 3
    where = str(d / "test.jsonl")
    assert t["bad_rows"][0].startswith(f"{where}:2: invalid JSON: ")
    assert t["bad_rows"][1:] == [f"{where}:4: missing field(s) ['answer']", f"{where}:5: a JSON list, not an object"]
    md = open(tmp_path / "run" / "results.md", encoding="utf-8").read()
    assert "3 malformed row(s) skipped" in md and f"{where}:2" in md


# ---- the answer cache: an interrupted run resumes ------------------------------------


class Counting:
    """The real model, counting the generations it is asked for."""

    def __init__(self, inner):
        self.inner, self.asked = inner, 0
        self.name, self.identity, self.context_length = inner.name, inner.identity, inner.context_length

    def generate(self, prompts, **kw):
        self.asked += len(prompts)
        return self.inner.generate(prompts, **kw)


def test_an_interrupted_run_resumes_where_it_stopped(tmp_path, native):
    out = str(tmp_path / "run")
    m = Counting(native)

    def stop_after_first_call(task, done, total):  # answers are stored per call of 4 x batch_size
        if 0 < done < total:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evaluate(m, ["gsm8k"], out_dir=out, limit=6, batch_size=1, progress=stop_after_first_call)
    assert m.asked == 4
    res = evaluate(m, ["gsm8k"], out_dir=out, limit=6, batch_size=1)
    assert m.asked == 6  # only the two it had not answered
    assert res["tasks"][0]["cached"] == 4 and res["tasks"][0]["n"] == 6
    again = evaluate(m, ["gsm8k"], out_dir=out, limit=6, batch_size=1)
    assert m.asked == 6 and again["tasks"][0]["metrics"] == res["tasks"][0]["metrics"]
    fresh = evaluate(native, ["gsm8k"], out_dir=str(tmp_path / "fresh"), limit=6, batch_size=4)  # 4 decoding at once, no cache
    same = [json.loads(x)["response"] for x in open(os.path.join(out, "samples", "gsm8k.jsonl"), encoding="utf-8")]
    other = [json.loads(x)["response"] for x in open(tmp_path / "fresh" / "samples" / "gsm8k.jsonl", encoding="utf-8")]
    assert len(same) == 6 and same == other
    assert fresh["tasks"][0]["metrics"] == res["tasks"][0]["metrics"]


# ---- scoring modes on the real model --------------------------------------------------


def test_circular_and_generation_multiple_choice(tmp_path, native):
    res = evaluate(native, [one_subject(tmp_path, "cmmlu_circular"), one_subject(tmp_path, "cmmlu_gen")], limit=3, out_dir=str(tmp_path / "r"))
    circ, gen = res["tasks"]
    assert circ["n"] == 3 and set(circ["metrics"]) == {"acc", "acc_norm", "circular"}
    assert circ["metrics"]["circular"] <= circ["metrics"]["acc"]
    samples = [json.loads(x) for x in open(tmp_path / "r" / "samples" / "cmmlu_circular_agronomy.jsonl", encoding="utf-8")]
    assert len(samples) == 12 and {s["rotation"] for s in samples} == {0, 1, 2, 3}
    for q in range(3):  # circular counts a question only when all four rotations are right
        rots = samples[4 * q : 4 * q + 4]
        assert len({s["where"] for s in rots}) == 1
    want = 100 * sum(all(s["pred"] == s["gold"] for s in samples[4 * q : 4 * q + 4]) for q in range(3)) / 3
    assert circ["metrics"]["circular"] == round(want, 2)
    assert gen["n"] == 3 and set(gen["metrics"]) == {"acc"}
    gs = [json.loads(x) for x in open(tmp_path / "r" / "samples" / "cmmlu_gen_agronomy.jsonl", encoding="utf-8")]
    assert all("response" in s for s in gs)


def test_engines_agree_on_log_likelihoods_and_perplexity(tmp_path, native, llm):
    """The same tasks on the native engine and llama.cpp (the same Q4_1 file): log-likelihoods
    and perplexity close, as the parity test asks of every engine."""
    spec = one_subject(tmp_path)
    a = evaluate(native, [spec, "wikitext"], limit=3, out_dir=str(tmp_path / "torch"))
    b = evaluate(open_model(llm), [spec, "wikitext"], limit=3, out_dir=str(tmp_path / "gguf"))
    la = [json.loads(x)["loglikelihoods"] for x in open(tmp_path / "torch" / "samples" / "cmmlu_agronomy.jsonl")]
    lb = [json.loads(x)["loglikelihoods"] for x in open(tmp_path / "gguf" / "samples" / "cmmlu_agronomy.jsonl")]
    assert len(la) == 3 and max(abs(x - y) for r, s in zip(la, lb) for x, y in zip(r, s)) < 0.15
    pa, pb = a["tasks"][1]["metrics"]["perplexity"], b["tasks"][1]["metrics"]["perplexity"]
    assert abs(pa - pb) / pb < 0.02 and a["tasks"][1]["n"] == 3


def test_humaneval_on_the_real_model(tmp_path, native):
    res = evaluate(native, ["humaneval"], limit=2, out_dir=str(tmp_path / "r"))
    t = res["tasks"][0]
    assert t["n"] == 2 and "pass@1" in t["metrics"]
    s = [json.loads(x) for x in open(tmp_path / "r" / "samples" / "humaneval.jsonl")]
    assert all(x["status"] in ("passed", "failed", "timeout", "memory", "killed", "error") for x in s)


class Oracle:
    """A 'model' that writes chosen code: the canonical solutions, and code that loops forever,
    forks without end and allocates without bound, to show each is killed at its limit and
    scored as failed while the run goes on."""

    name, context_length = "oracle", 4096
    identity = {"model": "oracle"}
    BAD = ["    while True:\n        pass\n", "    import os\n    while True:\n        os.fork()\n",
           "    x = []\n    while True:\n        x.append(bytearray(10**7))\n"]  # fmt: skip

    def __init__(self):
        rows, _ = read_rows(resolve_files(DATA, "humaneval/HumanEval.jsonl.gz", "humaneval"), [])
        self.rank = {r["prompt"]: i for i, r in enumerate(rows)}  # the answer depends on the row, not the call order
        self.solutions = {r["prompt"]: r["canonical_solution"] for r in rows}

    def generate(self, prompts, **kw):
        return [self.solutions[p] if self.rank[p] < 3 else self.BAD[(self.rank[p] - 3) % 3] for p in prompts]


def test_humaneval_kills_bad_code_at_its_limits_and_goes_on(tmp_path):
    spec = tmp_path / "he.toml"
    spec.write_text('base = "humaneval"\nname = "he"\n[score]\ntimeout = 3\nmemory_mb = 256\n')
    res = evaluate(Oracle(), [str(spec)], limit=6, out_dir=str(tmp_path / "r"), batch_size=1)
    t = res["tasks"][0]
    assert t["n"] == 6 and t["metrics"]["pass@1"] == 50.0
    s = [json.loads(x) for x in open(tmp_path / "r" / "samples" / "he.jsonl")]
    assert [x["status"] for x in s[:3]] == ["passed"] * 3
    assert s[3]["status"] == "timeout" and s[5]["status"] == "memory" and s[4]["status"] != "passed"
    assert all(x["seconds"] < 8 for x in s)


def test_needle_in_a_haystack_draws_its_heatmap(tmp_path, native):
    res = evaluate(native, ["needle"], limit=2, out_dir=str(tmp_path / "r"))
    t = res["tasks"][0]
    assert t["n"] == 10  # the two shortest lengths x five depths
    png = tmp_path / "r" / t["artifacts"]["heatmap"]
    head = png.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = struct.unpack(">II", head[16:24])
    assert w > 100 and h > 100
    cells = [json.loads(x) for x in open(tmp_path / "r" / "samples" / "needle.jsonl")]
    assert {c["depth"] for c in cells} == {0, 25, 50, 75, 100} and len({c["length"] for c in cells}) == 2
    assert t["metrics"]["acc"] == round(100 * sum(c["found"] for c in cells) / 10, 2)


# ---- an OpenAI-compatible URL ---------------------------------------------------------


def test_an_openai_compatible_server_is_evaluated_by_url(tmp_path):
    pytest.importorskip("httpx")
    from test_server import Server

    s = Server("--ctx-size", "2048")
    try:
        res = evaluate(s.url, ["gsm8k", one_subject(tmp_path, "cmmlu_gen")], limit=2, out_dir=str(tmp_path / "r"))
        assert res["model"]["engine"] == "openai" and [t["n"] for t in res["tasks"]] == [2, 2]
        resp = [json.loads(x)["response"] for x in open(tmp_path / "r" / "samples" / "gsm8k.jsonl")]
        assert all(isinstance(r, str) and r for r in resp) and not any("Question:" in r for r in resp)
        with pytest.raises(NoLogLikelihood, match="use a generation-mode task"):
            evaluate(s.url, [one_subject(tmp_path)], limit=1)
        with pytest.raises(NoLogLikelihood, match="perplexity needs an engine"):
            evaluate(s.url, ["wikitext"], limit=1)
    finally:
        s.stop()
    with pytest.raises(HanlinError, match="cannot reach"):
        open_model(s.url)


# ---- the command line -----------------------------------------------------------------


def test_cli_eval_reports_and_compare(tmp_path):
    a, b = str(tmp_path / "torch"), str(tmp_path / "gguf")
    r = run_cli("eval", "--tasks", "gsm8k", "--limit", "1", "--engine", "torch", "--dtype", "float32", "-o", a)
    assert r.returncode == 0, r.stderr
    assert "exact_match,flexible" in r.stdout and "results.json" in r.stdout
    r = run_cli("eval", "--tasks", "gsm8k", "--limit", "1", "--engine", "gguf", "-o", b, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["model"]["engine"] == "gguf"
    assert os.path.isfile(os.path.join(b, "results.md"))
    r = run_cli("eval", "compare", a, b)
    assert r.returncode == 0, r.stderr
    assert "smollm2-135m-instruct (torch)" in r.stdout and "smollm2-135m-instruct (gguf)" in r.stdout and "exact_match,strict" in r.stdout
    r = run_cli("eval", "--tasks", "gsm9k", "--limit", "1")
    assert r.returncode == 2 and "unknown task 'gsm9k'" in r.stderr
    r = run_cli("eval", "compare", a, str(tmp_path))
    assert r.returncode == 2 and "no results.json there" in r.stderr


def test_shared_prefix_batches_equal_one_by_one(native):
    """The native engine runs a few-shot prefix once for a batch (next_logprobs and the batched
    greedy decode): the answers equal those of each prompt run alone."""
    import numpy as np

    from hanlin.backends.base import GenerationConfig
    from hanlin.backends.torch.generate import shared_prefix
    from hanlin.evaluate.models import GREEDY

    spec = load_spec("gsm8k")
    p = Prompter(spec, DATA)
    rows, _ = read_rows(resolve_files(DATA, "gsm8k/test.jsonl", "gsm8k"), spec.data["fields"])
    ids = [native.encode(p.context(r)) for r in rows[:4]]
    assert shared_prefix(ids) > 500  # the five examples
    eng = native.engine
    together = eng.next_logprobs(ids)
    for c, row in zip(ids, together):
        alone = eng._next_logprobs_group([c])[0]
        assert float(np.abs(alone - row).max()) < 1e-3 and alone.argmax() == row.argmax()
    config = GenerationConfig(max_tokens=48, stop=("Question:",), **GREEDY)
    batched = eng.generate_text_batch(ids, config)
    alone = [native.llm.generate_ids(c, config=config).text for c in ids]
    assert batched == alone


def test_chat_template_on_wraps_each_prompt_as_a_user_turn(tmp_path, native):
    chat = open_model(native.llm, chat_template=True)
    text = chat.prompt_text("Question: 2+2?\nAnswer:")
    assert text == native.llm.render([{"role": "user", "content": "Question: 2+2?\nAnswer:"}])
    assert "<|im_start|>user\nQuestion: 2+2?" in text and text.endswith("<|im_start|>assistant\n")
    assert chat.encode(text) == native.llm.chat_ids([{"role": "user", "content": "Question: 2+2?\nAnswer:"}])  # special tokens as such
    out = str(tmp_path / "r")
    res = evaluate(chat, ["gsm8k"], limit=1, out_dir=out)
    assert res["model"]["chat_template"] is True and res["tasks"][0]["n"] == 1
    with pytest.raises(ConfigError, match="holds the answers of another model or setting"):
        evaluate(native, ["gsm8k"], limit=1, out_dir=out)  # the same folder without the template
