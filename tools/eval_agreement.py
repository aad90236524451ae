"""hanlin eval against lm-evaluation-harness, on the same model, the same files, in one run.

    python tools/eval_agreement.py [--cmmlu-subjects 4] [--cmmlu-limit 25] [--gsm8k-limit 20] [--out DIR]

The default model (SmolLM2-135M-Instruct's GGUF) is loaded by transformers (dequantized to
float32) and saved as a Hugging Face folder; lm-eval (`hf` model, local json/csv files through
`dataset_path` + `data_files`, its cmmlu and gsm8k task settings with the first_n few-shot
sampler) and hanlin (the `hf` engine on that folder, and the native `torch` engine) evaluate:
- CMMLU: the first N questions of the first S subjects, 5-shot from each subject's dev file,
  multiple choice by log-likelihood (acc);
- GSM8K: the first N test problems, 5-shot from train, greedy generation, flexible and strict
  extraction (exact_match).
Prints one JSON object: each side's scores and wall time, the differences in points, and how
many prompts differ between the two harnesses (lm-eval's logged request arguments against
hanlin's), which should be 0.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.normpath(os.path.join(ROOT, "..", "shared", "datasets"))


def default_gguf() -> str:
    from hanlin.catalog import DEFAULT_MODEL, resolve

    return resolve(DEFAULT_MODEL).path


def hf_folder(gguf: str, out: str) -> str:
    """The GGUF dequantized by transformers and saved as a float32 Hugging Face folder (cached)."""
    folder = os.path.join(out, "smollm2-hf")
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    import torch
    import transformers

    d, name = os.path.split(gguf)
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=name)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    # transformers marks a GGUF-loaded model as quantized and will not save it: copy its float
    # weights into a plain model of the same config
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    tmp = folder + ".tmp"
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, folder)
    return folder


def lm_eval_tasks(tmp: str, data: str, subjects: list[str]) -> list[str]:
    """lm-eval task files for the local copies: its own cmmlu / gsm8k settings, local data."""
    import yaml

    from hanlin.evaluate import load_spec

    names = load_spec("cmmlu").names["subject"]
    tasks = []
    for s in subjects:
        cfg = {
            "task": f"local_cmmlu_{s}",
            "dataset_path": "csv",
            "dataset_kwargs": {"data_files": {"test": os.path.join(data, "cmmlu", "test", f"{s}.csv"),
                                              "dev": os.path.join(data, "cmmlu", "dev", f"{s}.csv")}},  # fmt: skip
            "test_split": "test",
            "fewshot_split": "dev",
            "fewshot_config": {"sampler": "first_n"},
            "num_fewshot": 5,
            "output_type": "multiple_choice",
            "description": f"以下是关于{names[s]}的单项选择题，请直接给出正确答案的选项。\n\n",
            "doc_to_text": "{{Question.strip()}}\nA. {{A}}\nB. {{B}}\nC. {{C}}\nD. {{D}}\n答案：",
            "doc_to_choice": ["A", "B", "C", "D"],
            "doc_to_target": "{{['A', 'B', 'C', 'D'].index(Answer)}}",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        }
        with open(os.path.join(tmp, f"local_cmmlu_{s}.yaml"), "w", encoding="utf-8") as f:
            yaml.safe_dump(cfg, f, allow_unicode=True)
        tasks.append(cfg["task"])
    gsm = {
        "task": "local_gsm8k",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"train": os.path.join(data, "gsm8k", "train.jsonl"), "test": os.path.join(data, "gsm8k", "test.jsonl")}},
        "output_type": "generate_until",
        "training_split": "train",
        "fewshot_split": "train",
        "test_split": "test",
        "fewshot_config": {"sampler": "first_n"},
        "num_fewshot": 5,
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_target": "{{answer}}",
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True, "ignore_case": True,
                         "ignore_punctuation": False, "regexes_to_ignore": [",", "\\$", "(?s).*#### ", "\\.$"]}],  # fmt: skip
        "generation_kwargs": {"until": ["Question:", "</s>", "<|im_end|>"], "do_sample": False, "temperature": 0.0},
        "filter_list": [
            {"name": "strict-match", "filter": [{"function": "regex", "regex_pattern": "#### (\\-?[0-9\\.\\,]+)"}, {"function": "take_first"}]},
            {"name": "flexible-extract", "filter": [{"function": "regex", "group_select": -1, "regex_pattern": "(-?[$0-9.,]{2,})|(-?[0-9]+)"},
                                                    {"function": "take_first"}]},  # fmt: skip
        ],
    }
    with open(os.path.join(tmp, "local_gsm8k.yaml"), "w", encoding="utf-8") as f:
        yaml.safe_dump(gsm, f, allow_unicode=True)
    return tasks + ["local_gsm8k"]


def _context(sample: dict) -> str:
    """The prompt lm-eval sent for a logged sample (a tuple of arguments, or the newer dict)."""
    args = sample["arguments"]
    return args[0][0] if isinstance(args, (list, tuple)) else args["gen_args_0"]["arg_0"]


def run_lm_eval(folder: str, tmp: str, tasks: list[str], limit: int, batch_size: int) -> tuple[dict, dict, float]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    t0 = time.perf_counter()
    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={folder},dtype=float32,device=cpu", tasks=tasks,
                                  batch_size=batch_size, limit=limit, task_manager=TaskManager(include_path=tmp),
                                  log_samples=True, random_seed=0, numpy_random_seed=0, torch_random_seed=0)  # fmt: skip
    return out["results"], out["samples"], time.perf_counter() - t0


def run_hanlin(model, tasks: list[str], data: str, limit: int, subjects: list[str], batch_size: int, out_dir: str) -> tuple[dict, float]:
    from hanlin.evaluate import Harness, load_spec

    h = Harness(model, data_dir=data, out_dir=out_dir, limit=limit, batch_size=batch_size)
    res, t0 = {}, time.perf_counter()
    for t in tasks:
        spec = load_spec(t)
        if t == "cmmlu":
            spec.data["path"] = [f"cmmlu/test/{s}.csv" for s in subjects]
        res[t] = h.run(spec)
    h.cache.close()
    return res, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cmmlu-subjects", type=int, default=4, help="the first S subjects (alphabetical)")
    ap.add_argument("--cmmlu-limit", type=int, default=25, help="questions per subject")
    ap.add_argument("--gsm8k-limit", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--data-dir", default=DATA)
    ap.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--skip-torch", action="store_true", help="do not also time hanlin's native torch engine")
    args = ap.parse_args()
    if importlib.util.find_spec("lm_eval") is None:
        sys.exit("lm-eval is not installed: pip install -c constraints.txt lm-eval")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = args.out or tempfile.mkdtemp(prefix="hanlin-agree-")
    os.makedirs(out, exist_ok=True)
    import hanlin
    from hanlin.evaluate import load_spec, open_model
    from hanlin.evaluate.data import Prompter, read_rows, resolve_files

    subjects = sorted(f[:-4] for f in os.listdir(os.path.join(args.data_dir, "cmmlu", "test")) if f.endswith(".csv"))[: args.cmmlu_subjects]
    folder = hf_folder(default_gguf(), out)
    report: dict = {"model": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to float32 by transformers)", "subjects": subjects,
                    "cmmlu_questions": None, "gsm8k_problems": args.gsm8k_limit, "batch_size": args.batch_size}  # fmt: skip

    tmp = tempfile.mkdtemp(prefix="lmeval-tasks-", dir=out)
    names = lm_eval_tasks(tmp, args.data_dir, subjects)
    cm_tasks, gsm_task = names[:-1], names[-1]
    # lm-eval: CMMLU and GSM8K are separate calls, so each has its own wall time
    le_cm, le_cm_samples, le_cm_s = run_lm_eval(folder, tmp, cm_tasks, args.cmmlu_limit, args.batch_size)
    le_gsm, le_gsm_samples, le_gsm_s = run_lm_eval(folder, tmp, [gsm_task], args.gsm8k_limit, args.batch_size)
    n_cm = sum(len(le_cm_samples[t]) for t in cm_tasks)
    le_acc = 100 * sum(le_cm[t]["acc,none"] * len(le_cm_samples[t]) for t in cm_tasks) / n_cm
    report["cmmlu_questions"] = n_cm

    t0 = time.perf_counter()
    hf = open_model(hanlin.load(folder, engine="hf", device="cpu"), batch_size=args.batch_size)
    hf_load_s = time.perf_counter() - t0  # counted in hanlin's CMMLU time: lm-eval's includes its own load
    h_cm, h_cm_s = run_hanlin(hf, ["cmmlu"], args.data_dir, args.cmmlu_limit, subjects, args.batch_size, os.path.join(out, "hanlin-hf-cmmlu"))
    h_gsm, h_gsm_s = run_hanlin(hf, ["gsm8k"], args.data_dir, args.gsm8k_limit, subjects, args.batch_size, os.path.join(out, "hanlin-hf-gsm8k"))

    # the prompts each harness built, compared request by request
    mismatch = 0
    want = {}
    for t in cm_tasks:
        for s in le_cm_samples[t]:
            want[(t[len("local_cmmlu_"):], s["doc"]["Question"])] = _context(s)
    got = {}

    spec = load_spec("cmmlu")
    p = Prompter(spec, args.data_dir)
    for s in subjects:
        rows, _ = read_rows(resolve_files(args.data_dir, f"cmmlu/test/{s}.csv", "cmmlu"), spec.data["fields"], "subject")
        for r in rows[: args.cmmlu_limit]:
            got[(s, r["Question"])] = p.context(r)
    for k, v in want.items():
        mismatch += got.get(k) != v
    report["cmmlu_prompt_mismatches"] = mismatch
    le_gsm_prompts = [_context(s) for s in le_gsm_samples[gsm_task]]
    gspec = load_spec("gsm8k")
    gp = Prompter(gspec, args.data_dir)
    grows, _ = read_rows(resolve_files(args.data_dir, "gsm8k/test.jsonl", "gsm8k"), gspec.data["fields"])
    report["gsm8k_prompt_mismatches"] = sum(a != gp.context(r) for a, r in zip(le_gsm_prompts, grows[: args.gsm8k_limit]))

    # answer by answer: the chosen option and its log-likelihoods (CMMLU), the generated text
    # and what each extractor took from it (GSM8K)
    hs = [json.loads(x) for x in open(os.path.join(out, "hanlin-hf-cmmlu", "samples", "cmmlu.jsonl"), encoding="utf-8")]
    report["hanlin_cmmlu_samples"] = len(hs)
    by_subject: dict[str, list[dict]] = {}
    for x in hs:
        by_subject.setdefault(x["where"].split(".csv:")[0], []).append(x)
    same_pred, max_ll_diff = 0, 0.0
    for t in cm_tasks:
        mine = by_subject[t[len("local_cmmlu_"):]]
        for le in sorted(le_cm_samples[t], key=lambda z: z["doc_id"]):
            lls = [float(r[0]) for r in le["filtered_resps"]]
            h = mine[le["doc_id"]]
            same_pred += max(range(len(lls)), key=lls.__getitem__) == h["pred"]
            max_ll_diff = max(max_ll_diff, max(abs(a - b) for a, b in zip(lls, h["loglikelihoods"])))
    report["cmmlu_same_answer"] = same_pred
    report["cmmlu_max_loglikelihood_diff"] = float(f"{max_ll_diff:.3g}")
    hg = [json.loads(x) for x in open(os.path.join(out, "hanlin-hf-gsm8k", "samples", "gsm8k.jsonl"), encoding="utf-8")]
    same_text = {"flexible-extract": 0, "strict-match": 0}
    same_extracted = dict(same_text)
    for le in le_gsm_samples[gsm_task]:
        f = le.get("filter")
        if f not in same_text:
            continue
        h = hg[le["doc_id"]]
        same_text[f] += le["resps"][0][0] == h["response"]
        same_extracted[f] += str(le["filtered_resps"][0]).strip() == h["extracted"]["flexible" if f == "flexible-extract" else "strict"].strip()
    report["gsm8k_same_response"] = same_text["flexible-extract"]
    report["gsm8k_same_extracted"] = {"flexible": same_extracted["flexible-extract"], "strict": same_extracted["strict-match"]}
    le_flex = 100 * le_gsm[gsm_task]["exact_match,flexible-extract"]
    le_strict = 100 * le_gsm[gsm_task]["exact_match,strict-match"]
    report["cmmlu_acc"] = {"lm_eval": round(le_acc, 2), "hanlin_hf": h_cm["cmmlu"].metrics["acc"]}
    report["cmmlu_acc"]["diff_points"] = round(report["cmmlu_acc"]["hanlin_hf"] - report["cmmlu_acc"]["lm_eval"], 2)
    report["gsm8k_flexible"] = {"lm_eval": round(le_flex, 2), "hanlin_hf": h_gsm["gsm8k"].metrics["exact_match,flexible"]}
    report["gsm8k_flexible"]["diff_points"] = round(report["gsm8k_flexible"]["hanlin_hf"] - report["gsm8k_flexible"]["lm_eval"], 2)
    report["gsm8k_strict"] = {"lm_eval": round(le_strict, 2), "hanlin_hf": h_gsm["gsm8k"].metrics["exact_match,strict"]}
    report["gsm8k_strict"]["diff_points"] = round(report["gsm8k_strict"]["hanlin_hf"] - report["gsm8k_strict"]["lm_eval"], 2)
    h_cm_s += hf_load_s
    report["seconds"] = {"cmmlu": {"lm_eval": round(le_cm_s, 1), "hanlin_hf": round(h_cm_s, 1)},
                         "gsm8k": {"lm_eval": round(le_gsm_s, 1), "hanlin_hf": round(h_gsm_s, 1)}}  # fmt: skip
    hf.close()
    if not args.skip_torch:
        t0 = time.perf_counter()
        native = open_model(hanlin.load(default_gguf(), engine="torch", device="cpu", dtype="float32"), batch_size=args.batch_size)
        load_s = time.perf_counter() - t0
        t_cm, t_cm_s = run_hanlin(native, ["cmmlu"], args.data_dir, args.cmmlu_limit, subjects, args.batch_size, os.path.join(out, "hanlin-torch-cmmlu"))
        t_gsm, t_gsm_s = run_hanlin(native, ["gsm8k"], args.data_dir, args.gsm8k_limit, subjects, args.batch_size, os.path.join(out, "hanlin-torch-gsm8k"))
        t_cm_s += load_s
        report["cmmlu_acc"]["hanlin_torch"] = t_cm["cmmlu"].metrics["acc"]
        report["gsm8k_flexible"]["hanlin_torch"] = t_gsm["gsm8k"].metrics["exact_match,flexible"]
        report["gsm8k_strict"]["hanlin_torch"] = t_gsm["gsm8k"].metrics["exact_match,strict"]
        report["seconds"]["gsm8k"]["hanlin_torch"] = round(t_gsm_s, 1)
        report["seconds"]["cmmlu"]["hanlin_torch"] = round(t_cm_s, 1)
        report["seconds"]["cmmlu"]["speedup_torch_vs_lm_eval"] = round(le_cm_s / t_cm_s, 2)
        native.close()
    report["seconds"]["cmmlu"]["speedup_hf_vs_lm_eval"] = round(le_cm_s / h_cm_s, 2)
    print(json.dumps(report, ensure_ascii=False))


if __name__ == "__main__":
    main()
