"""The `hanlin` command.

    hanlin chat [--model M] [--device D] [--engine E] [--prompt TEXT] [--json] ...
    hanlin devices [--json]
    hanlin models [--json]
    hanlin pull NAME [--force]
    hanlin perplexity [--model M] [--engine E] [--ctx 512] FILE
    hanlin eval [--model M|URL] [--engine E] --tasks gsm8k,cmmlu,... [--limit N] [--shots K]
    hanlin eval compare RUN1 RUN2 ...
    hanlin data prepare RAW... OUT [--tokenizer M] [--workers N] [--executor local|ray] [--heldout F]
    hanlin [tui]              the terminal app (what `hanlin` alone opens in a terminal)

Errors a user can cause are printed as one clear sentence (exit code 2), never a traceback.
The CLI holds no logic of its own: it parses flags and calls the SDK.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence, TextIO

HELP_INTERACTIVE = """\
Type a message and press Enter. Commands:
  /reset           forget the conversation (keeps the system prompt)
  /system [TEXT]   set the system prompt (no TEXT: show it; "/system -" clears it)
  /help            this help
  /exit            quit (also /bye, Ctrl-D)
Multi-line input: start with \"\"\" and end with \"\"\", or end a line with \\ to continue it.
Ctrl-C stops the answer being generated; at the prompt it clears the line."""


# --------------------------------------------------------------------------------------
# argument parsing
# --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hanlin",
        description="Chat with, serve, fine-tune and evaluate language models on whatever hardware is here.",
        epilog="Run `hanlin COMMAND --help` for a command's options. Models live in $HANLIN_HOME/models (default ~/.cache/hanlin/models).",
    )
    p.add_argument("--version", action="version", version=f"hanlin {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    c = sub.add_parser(
        "chat",
        help="chat with a model (interactive, or one shot with --prompt)",
        description="Chat with a model. Interactive by default; --prompt (or piped input) answers once and exits. "
        "A catalogue model that is not here yet is pulled first.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _model_args(c)
    c.add_argument("--prompt", "-p", help="answer this one message and exit")
    c.add_argument("--system", "-s", help="system prompt")
    c.add_argument("--json", action="store_true", help="print the answer as one JSON object (with --prompt or piped input)")
    c.add_argument("--explain", action="store_true", help="print why this device and engine were chosen")
    c.add_argument("--no-pull", action="store_true", help="fail instead of pulling a catalogue model that is missing")
    g = c.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=512, help="most tokens to generate per answer")
    g.add_argument("--temperature", "-t", type=float, default=0.7, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling, in (0, 1]")
    g.add_argument("--top-k", type=int, default=40, help="0 disables")
    g.add_argument("--min-p", type=float, default=0.05, help="0 disables")
    g.add_argument("--repeat-penalty", type=float, default=1.1, help="1.0 disables")
    g.add_argument("--seed", type=int, default=None, help="for reproducible sampling")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    c.set_defaults(func=cmd_chat)

    px = sub.add_parser(
        "perplexity",
        help="perplexity of a text file (like llama.cpp's perplexity tool)",
        description="Perplexity of a text under a model: the text is tokenized, cut into chunks of --ctx tokens, and the "
        "second half of each chunk is scored given the first (llama.cpp's method), so engines can be compared.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _model_args(px)
    px.add_argument("file", help="a UTF-8 text file, e.g. ../shared/datasets/wikitext2/test.txt")
    px.add_argument("--ctx", type=int, default=512, help="tokens per chunk")
    px.add_argument("--max-tokens", type=int, default=None, help="use only the first N tokens of the text")
    px.add_argument("--json", action="store_true", help="machine-readable output")
    px.set_defaults(func=cmd_perplexity)

    d = sub.add_parser("devices", help="list the devices here and what can run on them", description="List the devices the device layer found, and why the others were not found.")
    d.add_argument("--json", action="store_true", help="machine-readable output")
    d.set_defaults(func=cmd_devices)

    m = sub.add_parser("models", help="list catalogue models and whether they are here", description="List the built-in model catalogue: name, size, source, and where each is on this machine.")
    m.add_argument("--json", action="store_true", help="machine-readable output")
    m.set_defaults(func=cmd_models)

    pl = sub.add_parser("pull", help="fetch a catalogue model", description="Fetch a catalogue model into $HANLIN_HOME/models, with progress.")
    pl.add_argument("name", help="catalogue name (see `hanlin models`)")
    pl.add_argument("--force", action="store_true", help="download again even if the model is here")
    pl.set_defaults(func=cmd_pull)

    ex = sub.add_parser("export", help="write a model as GGUF, ONNX or OpenVINO for phones, laptops and CPUs",
                        description="Export a model the native engine loads (a catalogue name, a .gguf file or an HF folder). "
                        "gguf: one file, float (F16, F32) written by hanlin, any other type by llama.cpp's own quantizer. "
                        "onnx: a folder for ONNX Runtime (MatMulNBits weights: fp32, int8, int4, int4-gptq, int4-rtn, int4-hqq). "
                        "openvino: a folder for OpenVINO (f32, int8, int4 weights by NNCF). `hanlin chat --model OUT` runs "
                        "the result with the matching engine. Everything is written beside OUT and renamed into place.")  # fmt: skip
    ex.add_argument("model", help="catalogue name, .gguf file or HF model folder")
    ex.add_argument("out", help="the file (gguf) or folder (onnx, openvino) to write, e.g. smol-q8_0.gguf")
    ex.add_argument("--to", default="gguf", choices=["gguf", "onnx", "openvino"], help="output format (default: gguf)")
    ex.add_argument("--quant", "-q", default=None,
                    help="gguf: F16 (default), F32 or a llama.cpp type (Q8_0, Q4_0, Q4_K_M, Q5_K_M, ...); "
                    "onnx: fp32, int8, int4 (default: Q4_1's layout, a float offset per block), int4-gptq (GPTQ, calibrated), "
                    "int4-rtn, int4-hqq; "
                    "openvino: f32, int8 (default), int4")  # fmt: skip
    ex.add_argument("--calibration", default=None, metavar="FILE",
                    help="onnx int4-gptq: a UTF-8 text GPTQ calibrates on (32 windows of 512 tokens; text like the model's use is best); "
                    "default: text the model writes itself")  # fmt: skip
    ex.add_argument("--tokenizer-from", default=None, help="a GGUF with the model's tokenizer and chat template (needed for an HF folder to gguf/openvino)")
    ex.set_defaults(func=cmd_export)

    qr = sub.add_parser("quant-report", help="what each format and quantization of a model costs: perplexity, KL, speed, memory",
                        description="Export a model to every format and quantization available here (GGUF, ONNX, OpenVINO) and "
                        "measure each against the float model (hanlin's torch engine in float32): file size, WikiText-2 perplexity "
                        "(llama.cpp's method), mean KL divergence and top-1 agreement, greedy decode tokens/s and peak RSS, each "
                        "variant in its own process. A variant that cannot be exported or loaded here is listed with the reason.")  # fmt: skip
    qr.add_argument("model", nargs="?", default=None, help="catalogue name, .gguf file or HF model folder (default: smollm2-135m-instruct)")
    qr.add_argument("--formats", default="gguf,onnx,openvino", help="comma-separated formats to export (default: gguf,onnx,openvino)")
    qr.add_argument("--quants", default=None, help="comma-separated quantizations to keep, e.g. Q8_0,int4 (default: F16,Q8_0,Q5_K_M,"
                    "Q4_K_M,Q4_0 for GGUF; fp32,int8,int4,int4-gptq,int4-rtn,int4-hqq for ONNX; f32,int8,int4 for OpenVINO)")  # fmt: skip
    qr.add_argument("--tokens", type=int, default=8192, help="WikiText-2 tokens to use; the second half of each chunk is scored (default: 8192)")
    qr.add_argument("--ctx", type=int, default=512, help="tokens per perplexity chunk (default: 512)")
    qr.add_argument("--decode-tokens", type=int, default=128, help="most tokens generated per decode-speed run (default: 128)")
    qr.add_argument("--runs", type=int, default=2, help="decode-speed runs per variant, the median is reported (default: 2)")
    qr.add_argument("--threads", type=int, default=None, help="CPU threads (default: physical cores)")
    qr.add_argument("--keep", default=None, metavar="DIR", help="keep the exported files in DIR (and reuse those already there); default: a temporary folder, removed")
    qr.add_argument("--text", default=None, metavar="FILE", help="evaluation text (default: ../shared/datasets/wikitext2/test.txt)")
    qr.add_argument("--json", action="store_true", help="print one JSON object (rows, reference, settings, machine) instead of the table")
    qr.set_defaults(func=cmd_quant_report)

    ft = sub.add_parser("finetune", help="fine-tune a model: LoRA, QLoRA, full or DPO, with a memory plan first",
                        description="Fine-tune a model on a JSONL file (alpaca, sharegpt or OpenAI messages rows; prompt/chosen/rejected "
                        "for dpo), rendered with the model's own chat template, loss on the assistant's tokens only. A memory plan "
                        "is printed first (--plan: print it and stop; it also works for --model-size 7b and --device-memory 8GB). "
                        "The run directory holds checkpoints, log.jsonl, loss.png and the adapter: `hanlin chat --model RUN_DIR` "
                        "chats with it, `hanlin finetune merge RUN_DIR OUT` writes a merged HF folder.")  # fmt: skip
    ft.add_argument("action", nargs="*", metavar="merge RUN_DIR OUT", help="merge RUN_DIR OUT: write the run's model with its adapter merged as an HF folder")
    ft.add_argument("--model", "-m", default=None, help="catalogue name, .gguf file or HF folder (default: smollm2-135m-instruct)")
    ft.add_argument("--data", default=None, metavar="FILE", help="the training rows (JSONL)")
    ft.add_argument("--method", default="lora", choices=["lora", "qlora", "full", "dpo"], help="default: lora")
    ft.add_argument("--out", "-o", default=None, metavar="RUN_DIR", help="the run directory (default: runs/<model>-<method>)")
    ft.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, npu:0 (default: auto)")
    ft.add_argument("--plan", action="store_true", help="print the memory plan and stop")
    ft.add_argument("--model-size", default=None, help="plan for a shape instead of a model on disk: 135m, 0.5b, 1.8b, 7b, 8b, 13b")
    ft.add_argument("--device-memory", default=None, help="plan against this much device memory (e.g. 8GB) instead of this device's")
    ft.add_argument("--device-kind", default=None, choices=["cpu", "cuda", "npu"], help="with --device-memory: the kind of device planned for (default: cuda)")
    ft.add_argument("--seq-len", type=int, default=512, help="tokens per packed sequence (default: 512)")
    ft.add_argument("--micro-batch", type=int, default=4, help="sequences per forward/backward (default: 4)")
    ft.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default: 1)")
    ft.add_argument("--epochs", type=float, default=1.0, help="passes over the data (default: 1)")
    ft.add_argument("--max-steps", type=int, default=None, help="optimizer steps (wins over --epochs)")
    ft.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 2e-4 lora/qlora, 2e-5 full, 5e-5 dpo)")
    ft.add_argument("--schedule", default="cosine", choices=["cosine", "linear", "constant"], help="after warmup (default: cosine)")
    ft.add_argument("--warmup", type=float, default=0.03, help="warmup: a fraction of the steps (< 1) or a step count (default: 0.03)")
    ft.add_argument("--optimizer", default="adamw", choices=["adamw", "adamw8bit", "paged_adamw8bit"], help="default: adamw")
    ft.add_argument("--lora-r", type=int, default=8, help="LoRA rank (default: 8)")
    ft.add_argument("--lora-alpha", type=int, default=16, help="LoRA alpha (default: 16)")
    ft.add_argument("--lora-targets", default="q_proj,v_proj", help="comma-separated projections (default: q_proj,v_proj)")
    ft.add_argument("--grad-checkpoint", action="store_true", help="recompute each layer in backward: less memory, more time")
    ft.add_argument("--no-packing", action="store_true", help="one example per sequence, padded (default: packed)")
    ft.add_argument("--val-fraction", type=float, default=0.05, help="rows held out for validation loss (default: 0.05)")
    ft.add_argument("--save-every", type=int, default=0, help="optimizer steps between checkpoints (default: only at the end)")
    ft.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint (SIGTERM stops a run with one saved)")
    ft.add_argument("--stop-on-bad-row", action="store_true", help="stop at the first malformed row (default: report it with its line number and skip it)")
    ft.add_argument("--allocator", default=None, choices=["auto", "mimalloc", "glibc"],
                    help="CPU memory allocator (default: $HANLIN_ALLOCATOR or auto: mimalloc where cmeel-mimalloc is installed, "
                         "re-executing once under LD_PRELOAD; measured 355 vs 248 tokens/s at a similar peak)")
    ft.add_argument("--keep-freed-memory", action="store_true",
                    help="glibc: let it keep freed memory: faster steps (370 vs 248 tokens/s measured), higher peak than planned")
    ft.add_argument("--dpo-beta", type=float, default=0.1, help="DPO's beta (default: 0.1)")
    ft.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="compute dtype (default: bfloat16 where fast, else float32)")
    ft.add_argument("--seed", type=int, default=0)
    ft.set_defaults(func=cmd_finetune)

    ev = sub.add_parser("eval", help="evaluate a model: GSM8K, CMMLU, HumanEval, WikiText-2, needle in a haystack",
                        description="Run evaluation tasks on a model (any engine) or an OpenAI-compatible URL. Every answer is cached "
                        "in the output folder, so running the same command again resumes where it stopped. "
                        "`hanlin eval compare RUN1 RUN2 ...` puts runs side by side.",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    _model_args(ev)
    ev.add_argument("--tasks", "-T", default=None, help="comma-separated built-in task names or .toml spec paths "
                    "(gsm8k, cmmlu, cmmlu_circular, cmmlu_gen, humaneval, wikitext, needle)")  # fmt: skip
    ev.add_argument("--limit", type=int, default=None, help="first N rows per task (per subject for CMMLU; chunks for wikitext)")
    ev.add_argument("--shots", type=int, default=None, help="few-shot examples (default: each task's own)")
    ev.add_argument("--chat-template", choices=("on", "off"), default="off", help="wrap each prompt in the model's chat template")
    ev.add_argument("--data-dir", default=None, help="dataset folder (default: $HANLIN_DATA_DIR or ../shared/datasets)")
    ev.add_argument("--output", "-o", default=None, help="run folder (default: eval-runs/<model>-<engine>): results.json/.md, samples, answer cache")
    ev.add_argument("--fresh", action="store_true", help="delete the run folder's cached answers first")
    ev.add_argument("--batch-size", type=int, default=8, help="requests per engine call")
    ev.add_argument("--api-key", default=None, help="for an http(s):// --model (default: $OPENAI_API_KEY)")
    ev.add_argument("--model-name", default=None, help="for an http(s):// --model: the served model's id (default: the first listed)")
    ev.add_argument("--json", action="store_true", help="print the results as JSON")
    evs = ev.add_subparsers(dest="eval_command", metavar="compare")
    cmp_ = evs.add_parser("compare", help="put eval runs side by side", description="Put the results of several eval runs (their folders or results.json files) side by side.")
    cmp_.add_argument("runs", nargs="+", help="run folders or results.json files")
    cmp_.add_argument("--json", action="store_true", dest="compare_json", help="print the comparison as JSON")
    ev.set_defaults(func=cmd_eval)

    tu = sub.add_parser("tui", help="the terminal app (also what `hanlin` alone opens in a terminal)",
                        description="Open the full-screen terminal app: pick a device and a model, then chat, fine-tune, evaluate or serve. "
                        "Conversations are kept in $HANLIN_HOME/history.sqlite.")  # fmt: skip
    tu.add_argument("--model", "-m", default=None, help="load this model at start (skips the device and model pickers with --device)")
    tu.add_argument("--device", "-d", default=None, help="start on this device (cpu, cuda:0, npu:0, mps), skipping the device picker")
    tu.add_argument("--engine", "-e", default="auto", help="engine for the model (auto, gguf, torch, ...)")
    tu.add_argument("--history", default=None, help="the conversation database (default: $HANLIN_HOME/history.sqlite)")
    tu.add_argument("--light", action="store_true", help="start in the light theme (Ctrl-T toggles)")
    tu.set_defaults(func=cmd_tui)

    kb = sub.add_parser("kb", help="a knowledge base over your documents: ingest, search, calibrate, ask",
                        description="Index a folder of documents (pdf, docx, xlsx, pptx, html, md, txt) and ask it questions.")  # fmt: skip
    kbs = kb.add_subparsers(dest="kb_command", metavar="ACTION", required=True)
    default_kb = os.path.join("~", ".cache", "hanlin", "kb", "default")
    for name, helptext in (("ingest", "index a folder (incremental: only new and changed files are read)"),
                           ("search", "the passages that match a question, with where they are"),
                           ("calibrate", "fit the threshold that declines unrelated questions"),
                           ("ask", "answer a question from the knowledge base, with citations")):  # fmt: skip
        a = kbs.add_parser(name, help=helptext, description=helptext[0].upper() + helptext[1:] + ".")
        a.add_argument("--kb", default=os.environ.get("HANLIN_KB", default_kb), help="the knowledge base folder (env HANLIN_KB)")
        a.add_argument("--embedding-model", default="all-minilm-l6-v2", help="sentence-embedding model: all-minilm-l6-v2 or a folder")
        if name == "ingest":
            a.add_argument("dir", help="the folder of documents")
        elif name == "calibrate":
            a.add_argument("--good", required=True, help="a text file of questions the knowledge base should answer, one per line")
            a.add_argument("--bad", required=True, help="a text file of unrelated questions it should decline, one per line")
        else:
            a.add_argument("question")
            a.add_argument("-k", type=int, default=5, help="passages to retrieve")
            a.add_argument("--json", action="store_true", help="print JSON")
        if name == "ask":
            _model_args(a)
        a.set_defaults(func=cmd_kb)

    ag = sub.add_parser("agent", help="answer a question with a tool-using agent (ReAct, ReWOO or function calling)",
                        description="Run an agent on a question. It may call: calculator; python (a sandboxed process, no network); "
                        "search (with --kb); read_file (with --workspace); http_fetch (only the hosts given with --allow-host). "
                        "Each thought, tool call, tool result and the answer is printed as it happens.")  # fmt: skip
    ag.add_argument("question")
    ag.add_argument("--agent", "-a", choices=["react", "rewoo", "function"], default="react", help="the loop: react (default), rewoo, function")
    ag.add_argument("--max-steps", type=int, default=6, help="tool calls before the agent must answer (default 6)")
    ag.add_argument("--kb", default=None, help="a knowledge base folder (`hanlin kb ingest`): adds the search tool")
    ag.add_argument("--workspace", default=None, help="a folder the read_file tool may read and the python tool gets a copy of")
    ag.add_argument("--allow-host", action="append", default=[], metavar="HOST", help="let http_fetch reach this host (repeatable)")
    ag.add_argument("--no-python", action="store_true", help="no code execution tool")
    ag.add_argument("--tool-choice", choices=["auto", "required"], default="auto", help="function agent: must the first turn call a tool?")
    _agent_common(ag)
    ag.set_defaults(func=cmd_agent)

    se = sub.add_parser("search", help="answer a question by planning sub-questions over a knowledge base (MindSearch-style)",
                        description="Plan the question as a graph of sub-questions, search the knowledge base for each (independent "
                        "ones in parallel), answer each from what it found, then answer the question citing the passages.")  # fmt: skip
    se.add_argument("question")
    se.add_argument("--kb", default=os.environ.get("HANLIN_KB", default_kb), help="the knowledge base folder (env HANLIN_KB)")
    se.add_argument("--max-nodes", type=int, default=4, help="sub-questions at most (1-9, default 4)")
    se.add_argument("--parallel", type=int, default=3, help="sub-questions searched at once (default 3)")
    se.add_argument("-k", type=int, default=3, help="passages per sub-question (default 3)")
    _agent_common(se)
    se.set_defaults(func=cmd_search)

    da = sub.add_parser("data", help="prepare pre-training data: raw text -> filtered, deduplicated token shards",
                        description="Prepare pre-training data. `hanlin data prepare RAW... OUT` reads text, Markdown, JSONL and "
                        "HTML, filters it (language, Gopher and C4 rules), removes exact and near duplicates and writes token "
                        "shards with a report of every document dropped and why (docs/data.md).")  # fmt: skip
    das = da.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    dp = das.add_parser("prepare", help="raw documents -> token shards in OUT, with report.json/report.md",
                        description="Raw documents (files or folders of .txt .md .jsonl[.gz] .html) -> filtered, deduplicated, "
                        "tokenized shards in OUT (manifest.json, .bin/.idx, tokenizer/, report.json, report.md). OUT is written "
                        "atomically; the per-rule counts are printed when it is done.")  # fmt: skip
    dp.add_argument("raw", nargs="+", metavar="RAW", help="input files or folders (read recursively, in sorted order)")
    dp.add_argument("out", metavar="OUT", help="the shard folder to create")
    dp.add_argument("--tokenizer", "-t", default=None, help="the model whose tokenizer to use: catalogue name, .gguf, HF folder "
                    "or tokenizer.json (default: smollm2-135m-instruct)")  # fmt: skip
    dp.add_argument("--workers", "-j", type=int, default=None, help="worker processes (default: all CPU cores)")
    dp.add_argument("--executor", choices=("local", "ray"), default="local", help="local: a process pool (default); ray: a Ray Data job")
    dp.add_argument("--ray-address", default=os.environ.get("RAY_ADDRESS"), help="with --executor ray: the cluster to attach to "
                    "(env RAY_ADDRESS; default: a local Ray instance)")  # fmt: skip
    dp.add_argument("--heldout", type=float, default=0.0, help="fraction of the kept documents put in the heldout split, chosen by hash of the text (default 0)")
    dp.add_argument("--langs", default=None, help="comma-separated cld2 language codes to keep, e.g. en,zh (default: every language)")
    dp.add_argument("--text-field", default="text", help="the JSONL field holding a document's text (default: text)")
    dp.add_argument("--near-dup-threshold", type=float, default=0.8, help="MinHash Jaccard similarity above which a document is a near duplicate (default 0.8)")
    dp.add_argument("--eos-token", default=None, help="the document separator token (default: <|endoftext|>, else the tokenizer's EOS)")
    dp.add_argument("--force", action="store_true", help="replace an existing OUT")
    dp.add_argument("--json", action="store_true", help="print the report as JSON instead of the table")
    da.set_defaults(func=cmd_data)

    tr = sub.add_parser("train", help="pre-train or continue pre-training: one process, torchrun, deepspeed, or a cluster's launch files",
                        description="Causal-LM training of the native model on `hanlin data prepare` shards, from a YAML config "
                                    "(docs/train.md). One process by default; --nproc N starts N on this machine with torchrun "
                                    "or the deepspeed launcher; --print-launch writes the files for a multi-node job.")
    tr.add_argument("--config", required=True, help="the run's YAML config (see docs/train.md for every key)")
    tr.add_argument("--resume", default="never", help="never (default), auto (newest checkpoint that verifies) or a checkpoint folder")
    tr.add_argument("--nproc", type=int, default=1, help="processes on this machine (default 1: in this process)")
    tr.add_argument("--launcher", choices=("torchrun", "deepspeed"), default="torchrun", help="what starts --nproc processes")
    tr.add_argument("--max-restarts", type=int, default=0, help="torchrun: restart the worker group this often after a failure "
                    "(with --resume auto it continues from the newest checkpoint)")
    tr.add_argument("--print-launch", choices=("slurm", "torchrun", "deepspeed"), help="write a multi-node job's launch files instead of training")
    tr.add_argument("--nodes", type=int, default=1, help="--print-launch: machines")
    tr.add_argument("--per-node", type=int, default=8, help="--print-launch: devices (processes) per machine")
    tr.add_argument("--device", choices=("cuda", "npu", "cpu"), default="cuda", help="--print-launch: the devices' kind")
    tr.add_argument("--launch-out", default="launch", help="--print-launch: folder for the files (default ./launch)")
    tr.add_argument("--force", action="store_true", help="--print-launch: overwrite existing files")
    tr.set_defaults(func=cmd_train)

    sv = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API",
                        description="Serve a model over an OpenAI-compatible API (FastAPI + uvicorn) on 127.0.0.1:8000 by default. "
                        "Every flag is also an environment variable: --max-concurrent is HANLIN_SERVE_MAX_CONCURRENT.")  # fmt: skip
    _serve_args(sv)
    sv.set_defaults(func=cmd_serve)
    return p


def _serve_args(p: argparse.ArgumentParser) -> None:
    """One flag per ServerSettings field, so flags and environment variables never drift."""
    try:
        from hanlin.apps.server.settings import ServerSettings
    except ImportError:  # the serve extra is not installed: cmd_serve says so
        return
    for name, field in ServerSettings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = "HANLIN_SERVE_" + name.upper()
        p.add_argument(flag, dest=f"serve_{name}", default=None, metavar=name.upper(), help=f"{field.description} [env {env}]")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None, help="catalogue name or path to a .gguf file / model folder (default: smollm2-135m-instruct)")
    p.add_argument("--device", "-d", default="auto", help="auto, cpu, cuda, cuda:N, npu:N, mps")
    p.add_argument("--engine", "-e", default="auto", help="auto or an engine name (gguf, torch)")
    p.add_argument("--dtype", default="auto", help="torch engine: auto, float32, bfloat16, float16")
    p.add_argument("--compile", action="store_true", help="torch engine: torch.compile the decode step (eager if it fails)")
    p.add_argument("--ctx-size", type=int, default=None, help="context window in tokens (default: the model's, at most 4096)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: physical cores)")


def _version() -> str:
    from hanlin import __version__

    return __version__


# --------------------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------------------


def cmd_devices(args: argparse.Namespace) -> int:
    from hanlin.backends.base import engines_for
    from hanlin.devices import detect

    report = detect()
    rows = [(dev, engines_for(dev)) for dev in report.devices]
    if args.json:
        data = report.to_dict()
        for d, (_, runs) in zip(data["devices"], rows):
            d["engines"] = runs
        print(json.dumps(data, indent=2))
        return 0
    for dev, runs in rows:
        print(dev.label())
        extra = []
        if dev.dtypes:
            extra.append("dtypes " + ", ".join(dev.dtypes))
        if dev.features:
            extra.append("features " + " ".join(dev.features))
        if dev.physical_cores:
            extra.append(f"{dev.physical_cores} physical cores")
        if dev.is_phone:
            extra.append("phone")
        for e in extra:
            print(f"    {e}")
        for name, why in runs.items():
            print(f"    engine {name}: {'can run here' if why == 'ok' else why}")
    for kind, why in report.notes.items():
        print(f"{kind}: none ({why})")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from hanlin.catalog import DEFAULT_MODEL, list_models

    statuses = list_models()
    if args.json:
        print(json.dumps([
            {"name": s.entry.name, "aliases": list(s.entry.aliases), "params": s.entry.params, "size_mb": s.entry.size_mb,
             "context_length": s.entry.context_length, "source": s.entry.source, "license": s.entry.license,
             "description": s.entry.description, "path": str(s.path) if s.path else None, "present": s.path is not None,
             "default": s.entry.name == DEFAULT_MODEL}
            for s in statuses
        ], indent=2))  # fmt: skip
        return 0
    width = max(len(s.entry.name) for s in statuses)
    print(f"{'NAME':<{width}}  {'PARAMS':>6}  {'SIZE':>8}  STATUS")
    for s in statuses:
        status = f"here ({s.where}: {s.path})" if s.path else f"not pulled: hanlin pull {s.entry.name}"
        mark = " *" if s.entry.name == DEFAULT_MODEL else ""
        print(f"{s.entry.name:<{width}}  {s.entry.params:>6}  {s.entry.size_mb:>5} MB  {status}{mark}")
        print(f"{'':<{width}}  {s.entry.description}; from {s.entry.source}")
    print("* the default model. Any local .gguf file or model folder works too: hanlin chat --model PATH")
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from hanlin.catalog import pull

    pull(args.name, force=args.force)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import time

    from hanlin.export import DEFAULT_QUANT, export

    t0 = time.perf_counter()
    out = export(args.model, args.out, to=args.to, quant=args.quant, tokenizer_from=args.tokenizer_from, calibration=args.calibration,
                 log=lambda m: print(m, file=sys.stderr, flush=True))  # fmt: skip
    size = os.path.getsize(out) if os.path.isfile(out) else sum(e.stat().st_size for e in os.scandir(out) if e.is_file())
    quant = args.quant or DEFAULT_QUANT[args.to]
    quant = quant.upper() if args.to == "gguf" else quant.lower()  # as each format names its types
    print(f"wrote {out} ({size / 2**20:.1f} MiB, {args.to} {quant}) in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_quant_report(args: argparse.Namespace) -> int:
    import hanlin
    from hanlin.quant_report import Settings, format_table, parse_list, quant_report

    settings = Settings(model=args.model or hanlin.DEFAULT_MODEL, formats=parse_list(args.formats) or (), quants=parse_list(args.quants),
                        tokens=args.tokens, ctx=args.ctx, decode_tokens=args.decode_tokens, runs=args.runs, threads=args.threads,
                        keep=args.keep, text=args.text)  # fmt: skip
    report = quant_report(settings, log=lambda line: print(f"quant-report: {line}", file=sys.stderr, flush=True))
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    import hanlin
    from hanlin import finetune as ft

    if args.action:
        if args.action[0] != "merge" or len(args.action) != 3:
            raise _UsageError(f"finetune: unexpected arguments {' '.join(args.action)!r}; the only action is `hanlin finetune merge RUN_DIR OUT`")
        out = ft.merge(args.action[1], args.action[2], log=lambda m: print(m, file=sys.stderr, flush=True))
        print(f"wrote {out}")
        return 0
    model = args.model or hanlin.DEFAULT_MODEL
    targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
    if args.plan:
        p = ft.plan_for(model if not args.model_size else None, model_size=args.model_size, method=args.method, seq_len=args.seq_len,
                        micro_batch=args.micro_batch, grad_checkpoint=args.grad_checkpoint, optimizer=args.optimizer, lora_r=args.lora_r,
                        lora_targets=targets, device=args.device, device_memory=args.device_memory, device_kind=args.device_kind,
                        dtype=args.dtype)  # fmt: skip
        print(p.table())
        return 0
    if args.model_size or args.device_memory:
        raise _UsageError("finetune: --model-size and --device-memory describe a plan (add --plan); a run trains a real model on this device")
    if not args.data:
        raise _UsageError("finetune: --data FILE is required (JSONL rows; or --plan to only print the memory plan)")
    from hanlin.finetune import allocator

    allocator.reexec_if_needed(args.allocator)  # LD_PRELOAD takes effect only at a process's start
    out = args.out or os.path.join("runs", f"{os.path.basename(model.rstrip('/')).split('.')[0]}-{args.method}")
    cfg = ft.FinetuneConfig(model=model, data=args.data, out=out, method=args.method, device=args.device, seq_len=args.seq_len,
                            micro_batch=args.micro_batch, grad_accum=args.grad_accum, epochs=args.epochs, max_steps=args.max_steps,
                            lr=args.lr, schedule=args.schedule, warmup=args.warmup, optimizer=args.optimizer, lora_r=args.lora_r,
                            lora_alpha=args.lora_alpha, lora_targets=targets, grad_checkpoint=args.grad_checkpoint,
                            packing=not args.no_packing, val_fraction=args.val_fraction, save_every=args.save_every, seed=args.seed,
                            on_bad_row="stop" if args.stop_on_bad_row else "skip", dpo_beta=args.dpo_beta, dtype=args.dtype,
                            release_memory=not args.keep_freed_memory)  # fmt: skip
    r = ft.train(cfg, resume=args.resume, should_stop=_stop_on_sigterm())
    print(f"run: {r.run_dir}\nsteps: {r.steps}  train loss: {r.train_loss}  validation loss: {r.val_loss}  peak memory: {r.peak_rss / 2**30:.2f} GiB")
    if r.stopped:
        print(f"stopped at step {r.steps}; continue with the same command and --resume --out {r.run_dir}")
    else:
        print(f"chat with it: hanlin chat --model {r.run_dir}")
    return 0


def _stop_on_sigterm():
    """SIGTERM (the TUI's cancel, `kill PID`) asks the fine-tuner to stop after the current
    step with a checkpoint saved; a second SIGTERM kills at once. Returns the should_stop test."""
    import signal

    asked = {"stop": False}

    def on_term(signum, frame):
        asked["stop"] = True
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        # os.write, not print: the handler may run while the main thread is inside a write to stderr
        os.write(2, b"SIGTERM: stopping after the current step with a checkpoint saved (send it again to kill now)\n")

    signal.signal(signal.SIGTERM, on_term)
    return lambda: asked["stop"]


def _agent_common(a: argparse.ArgumentParser) -> None:
    _model_args(a)
    a.add_argument("--max-tokens", type=int, default=512, help="tokens per model step (default 512)")
    a.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    a.add_argument("--seed", type=int, default=None)
    a.add_argument("--json", action="store_true", help="print each event as one JSON line")


def _agent_llm(args: argparse.Namespace):
    import hanlin

    return hanlin.load(args.model or hanlin.DEFAULT_MODEL, device=args.device, engine=args.engine, pull_missing=True,
                       ctx_size=args.ctx_size, threads=args.threads, dtype=args.dtype)  # fmt: skip


def _print_events(events, as_json: bool) -> int:
    """Each agent event as it happens: a JSON line, or a readable one. 0 when an answer came."""
    answered = False
    for ev in events:
        answered = answered or ev.kind == "answer"
        if as_json:
            print(ev.to_json(), flush=True)
            continue
        d = ev.to_dict()
        if ev.kind == "thought":
            line = f"thought: {d['text']}"
        elif ev.kind == "tool_call":
            line = f"call {d['id']}: {d['name']}({json.dumps(d['arguments'], ensure_ascii=False)})"
        elif ev.kind == "tool_result":
            line = f"result {d['id']}{'' if d['ok'] else ' (error)'}: {d['content'][:2000]}"
        elif ev.kind == "notice":
            line = f"note: {d['text']}"
        elif ev.kind == "plan":
            line = "plan:\n" + "\n".join(f"  {n['id']}: {n['question']}" + (f"  (after {', '.join(n['depends_on'])})" if n["depends_on"] else "")
                                          for n in d["nodes"])  # fmt: skip
        elif ev.kind == "node":
            if d["state"] not in ("done", "failed"):
                line = f"{d['id']} {d['state']}"
            else:
                line = f"{d['id']} {d['state']}: {d['answer'] or d['error']}"
        else:
            stopped = f" (stopped: {d['stopped']})" if d.get("stopped") else ""
            line = f"\nanswer{stopped}: {d['text']}"
            if d.get("sources"):
                line += "\n" + "\n".join(f"[{i}] {s['citation']}" for i, s in enumerate(d["sources"], 1))
        print(line, flush=True)
    return 0 if answered else 1


def cmd_agent(args: argparse.Namespace) -> int:
    from hanlin.agents import ToolsConfig, builtin_tools, make_agent, search_tool

    if args.max_steps < 1:
        raise _UsageError(f"--max-steps {args.max_steps}: at least 1")
    if args.workspace is not None and not os.path.isdir(args.workspace):
        raise _UsageError(f"--workspace {args.workspace}: not a directory")
    box = builtin_tools(ToolsConfig(workspace=args.workspace, allowed_hosts=tuple(args.allow_host), python=not args.no_python))
    if args.kb is not None:
        box.add(search_tool(_open_kb(args.kb)))
    options = {"tool_choice": args.tool_choice} if args.agent == "function" else {}
    agent = make_agent(args.agent, _agent_llm(args), box, max_steps=args.max_steps, max_tokens=args.max_tokens,
                       temperature=args.temperature, seed=args.seed, **options)  # fmt: skip
    return _print_events(agent.run(args.question), args.json)


def cmd_search(args: argparse.Namespace) -> int:
    from hanlin.agents import Planner, kb_searcher

    for flag, value, low, high in (("--max-nodes", args.max_nodes, 1, 9), ("--parallel", args.parallel, 1, 64), ("-k", args.k, 1, 50)):
        if not low <= value <= high:
            raise _UsageError(f"{flag} {value}: must be between {low} and {high}")
    searcher = kb_searcher(_open_kb(args.kb), k=args.k)
    planner = Planner(_agent_llm(args), searcher, max_nodes=args.max_nodes, parallel=args.parallel, max_tokens=args.max_tokens,
                      temperature=args.temperature, seed=args.seed)  # fmt: skip
    return _print_events(planner.run(args.question), args.json)


def _open_kb(path: str):
    try:
        from hanlin.rag import KnowledgeBase
    except ImportError as e:
        raise _UsageError(f"the knowledge base needs the rag extra ({e.name} is missing): pip install -c constraints.txt -e '.[rag]'") from None
    kb = KnowledgeBase(os.path.expanduser(path))
    if kb.current() is None:
        raise _UsageError(f"the knowledge base at {kb.path} is empty: run `hanlin kb ingest DIR --kb {path}` first")
    return kb


def cmd_kb(args: argparse.Namespace) -> int:
    try:
        from hanlin.rag import KnowledgeBase
    except ImportError as e:
        raise _UsageError(f"the knowledge base needs the rag extra ({e.name} is missing): pip install -c constraints.txt -e '.[rag]'") from None
    kb = KnowledgeBase(os.path.expanduser(args.kb), embedding_model=args.embedding_model)
    if args.kb_command == "ingest":
        if not os.path.isdir(args.dir):
            raise _UsageError(f"{args.dir} is not a directory")
        print(kb.ingest(args.dir, log=lambda m: print(m, file=sys.stderr, flush=True)).summary())
        print(f"knowledge base: {kb.path}")
        return 0
    if args.kb_command == "calibrate":
        lines = []
        for f in (args.good, args.bad):
            try:
                with open(f, encoding="utf-8") as fh:
                    lines.append([q.strip() for q in fh if q.strip()])
            except OSError as e:
                raise _UsageError(f"{f}: {e.strerror}") from None
        try:
            r = kb.calibrate(*lines)
        except ValueError as e:
            raise _UsageError(str(e)) from None
        print(f"threshold {r['threshold']:.4f}: {r['correct']}/{r['good'] + r['bad']} example questions decided right "
              f"({r['good']} good, {r['bad']} bad)")  # fmt: skip
        return 0
    if args.k < 1:
        raise _UsageError(f"-k {args.k}: retrieve at least 1 passage")
    from hanlin.rag.index import RELEVANCE_K

    hits = kb.search(args.question, k=max(args.k, RELEVANCE_K))
    ok, relevance = kb.answerable(args.question, hits)
    hits = hits[: args.k]
    if args.kb_command == "search":
        if args.json:
            print(json.dumps({"answerable": ok, "relevance": relevance, "hits": [vars(h) for h in hits]}, ensure_ascii=False))
        else:
            for i, h in enumerate(hits, 1):
                print(f"[{i}] {h.citation()}  similarity {h.similarity:.3f}\n    {h.text[:300]}")
            if not ok:
                print(f"(relevance {relevance:.3f} is under the calibrated threshold: `kb ask` would decline this question)")
        return 0
    from hanlin.rag.answer import answer

    import hanlin

    if not ok:
        from hanlin.rag.answer import DECLINED

        text, used = DECLINED, []
    else:
        llm = hanlin.load(args.model or hanlin.DEFAULT_MODEL, device=args.device, engine=args.engine, pull_missing=True,
                          ctx_size=args.ctx_size, threads=args.threads, dtype=args.dtype)  # fmt: skip
        text, used = answer(llm, args.question, hits)
    if args.json:
        print(json.dumps({"answer": text, "declined": not ok, "relevance": relevance, "sources": [h.citation() for h in used]}, ensure_ascii=False))
    else:
        print(text)
        for i, h in enumerate(used, 1):
            print(f"[{i}] {h.citation()}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from hanlin.data import NoDocumentsError, prepare
    from hanlin.data.pipeline import main_log

    try:
        report = prepare(args.raw, args.out, tokenizer=args.tokenizer, workers=args.workers, executor=args.executor,
                         ray_address=args.ray_address, heldout=args.heldout, langs=args.langs, text_field=args.text_field,
                         near_dup_threshold=args.near_dup_threshold, eos_token=args.eos_token, force=args.force, log=main_log)  # fmt: skip
    except NoDocumentsError as e:
        if e.report is not None:
            print(json.dumps(e.report.to_dict(), indent=2, ensure_ascii=False) if args.json else e.report.table())
        raise
    print(json.dumps(report.to_dict(), indent=2, ensure_ascii=False) if args.json else report.table())
    print(f"wrote {report.out} (report: {os.path.join(report.out, 'report.md')})", file=sys.stderr)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import subprocess

    from hanlin.train.config import TrainConfig

    cfg = TrainConfig.from_yaml(args.config)
    if args.print_launch:
        from hanlin.train import launch

        world = args.nodes * args.per_node
        cfg.check(world)  # a job that cannot run is refused before it is submitted
        spec = launch.LaunchSpec(launcher=args.print_launch, nodes=args.nodes, per_node=args.per_node, device=args.device,
                                 config=os.path.abspath(args.config), resume=args.resume if args.resume != "never" else "auto")
        files = launch.render(spec)
        for path in launch.write(files, args.launch_out, force=args.force):
            print(f"==> {path}")
            with open(path, encoding="utf-8") as f:
                print(f.read())
        return 0
    if args.nproc < 1:
        raise _UsageError(f"--nproc must be >= 1, got {args.nproc}")
    cfg.check(args.nproc)  # before any process starts
    if args.nproc == 1 and args.launcher == "torchrun" and args.max_restarts == 0:
        from hanlin.train.trainer import run

        result = run(cfg, resume=args.resume)
        print(f"trained to step {result.steps}: loss {result.final_loss:.4f}"
              + (f", held-out loss {result.heldout_loss:.4f}" if result.heldout_loss is not None else "") + f"; {result.out}")
        return 0
    worker = ["-m", "hanlin.train", "--config", args.config, "--resume", args.resume]
    if args.launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc),
               "--max-restarts", str(args.max_restarts), *worker]
    else:
        if args.max_restarts:
            raise _UsageError("--max-restarts is torchrun's; the deepspeed launcher does not restart workers")
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.nproc), "--master_port", str(_free_port()),
               "--module", *worker[1:]]
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    return subprocess.call(cmd)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cmd_tui(args: argparse.Namespace) -> int:
    try:
        from hanlin.apps.tui import run
    except ImportError as e:
        raise _UsageError(f"the terminal app needs the tui extra ({e.name} is missing): pip install -c constraints.txt -e '.[tui]'") from None
    if args.model and not args.device:
        raise _UsageError("--model needs --device too (the model is loaded on the device you name); or pick both in the app")
    return run(model=args.model, device=args.device, engine=args.engine, history=args.history, theme="textual-light" if args.light else "textual-dark")


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from pydantic import ValidationError

        from hanlin.apps.server.app import serve
        from hanlin.apps.server.settings import ServerSettings
    except ImportError as e:
        raise _UsageError(f"serving needs the serve extra ({e.name} is missing): pip install -c constraints.txt -e '.[serve]'") from None
    given = {k[len("serve_"):]: v for k, v in vars(args).items() if k.startswith("serve_") and v is not None}
    try:
        settings = ServerSettings(**{k: _split(k, v) for k, v in given.items()})
    except ValidationError as e:
        first = e.errors()[0]
        raise _UsageError(f"--{'-'.join(str(x) for x in first['loc']).replace('_', '-')}: {first['msg']}") from None
    serve(settings)
    return 0


def _split(name: str, value: str):
    return [v.strip() for v in value.split(",") if v.strip()] if name in ("api_keys", "cors_origins") else value


def cmd_eval(args: argparse.Namespace) -> int:
    import re
    import time

    from hanlin import evaluate as ev

    if args.eval_command == "compare":
        text, data = ev.compare(args.runs)
        print(json.dumps(data, ensure_ascii=False) if args.compare_json else text)
        return 0
    if not args.tasks:
        raise _UsageError(f"--tasks is required: choose from {', '.join(ev.builtin_tasks())} (comma-separated), or give .toml spec paths")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    model = args.model or __import__("hanlin").DEFAULT_MODEL
    chat = args.chat_template == "on"
    out = args.output or os.path.join("eval-runs", re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.basename(model.rstrip("/")) or model)
                                      + f"-{args.engine}" + ("-chat" if chat else ""))  # fmt: skip
    tty = sys.stderr.isatty()
    last = {"t": 0.0}

    def progress(task: str, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - last["t"] < (0.2 if tty else 10):
            return
        last["t"] = now
        line = f"{task}: {done}/{total} answers"
        print(("\r" + line + "   ") if tty else line, end="" if tty and done < total else "\n", file=sys.stderr, flush=True)

    opts: dict[str, Any] = {}
    if not model.startswith(("http://", "https://")):
        opts = {"ctx_size": args.ctx_size, "threads": args.threads, "dtype": args.dtype}
    m = ev.open_model(model, engine=args.engine, device=args.device, chat_template=chat, batch_size=args.batch_size,
                      api_key=args.api_key, model_name=args.model_name, **opts)  # fmt: skip
    try:
        results = ev.evaluate(m, tasks, out_dir=out, data_dir=args.data_dir, limit=args.limit, shots=args.shots,
                              batch_size=args.batch_size, fresh=args.fresh, progress=progress)  # fmt: skip
    finally:
        m.close()
    if args.json:
        print(json.dumps(results, ensure_ascii=False))
        return 0
    print(ev.table(results))
    for t in results["tasks"]:
        if t["bad_row_count"]:
            print(f"{t['task']}: {t['bad_row_count']} malformed row(s) skipped, first: {t['bad_rows'][0]}", file=sys.stderr)
    print(f"reports: {results['files']['json']}, {results['files']['markdown']}")
    return 0


def cmd_perplexity(args: argparse.Namespace) -> int:
    import time

    import hanlin
    from hanlin.backends.base import perplexity

    try:
        with open(args.file, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise _UsageError(f"{args.file} does not exist") from None
    except UnicodeDecodeError as e:
        raise _UsageError(f"{args.file} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if args.max_tokens is not None and args.max_tokens < args.ctx:
        raise _UsageError(f"--max-tokens {args.max_tokens} is less than one chunk (--ctx {args.ctx})")
    llm = hanlin.load(args.model or hanlin.DEFAULT_MODEL, device=args.device, engine=args.engine,
                      pull_missing=True, ctx_size=args.ctx_size or max(args.ctx, 512), threads=args.threads, dtype=args.dtype)  # fmt: skip
    ids = llm.tokenize(text, add_bos=False)
    if args.max_tokens is not None:
        ids = ids[: args.max_tokens]
    bos = llm.engine.bos_token_id if llm.engine.add_bos else None
    t0 = time.perf_counter()
    res = perplexity(llm.engine, ids, args.ctx, bos=bos)
    secs = time.perf_counter() - t0
    out = {"model": llm.name, "engine": llm.engine.name, "device": llm.device.spec(), "file": args.file,
           "perplexity": round(res.perplexity, 4), "tokens_scored": res.tokens_scored, "chunks": res.chunks,
           "ctx": res.ctx, "seconds": round(secs, 2)}  # fmt: skip
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{llm.name} on {llm.engine.name}/{llm.device.spec()}: perplexity {res.perplexity:.4f} "
              f"over {res.tokens_scored} tokens ({res.chunks} chunks of {res.ctx}), {secs:.1f} s")  # fmt: skip
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    import hanlin
    from hanlin.backends.base import GenerationConfig

    config = GenerationConfig(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        min_p=args.min_p, repeat_penalty=args.repeat_penalty, seed=args.seed, stop=tuple(args.stop),
    )  # fmt: skip  (validated here, before the model is loaded)
    prompt = args.prompt
    if prompt is None and not sys.stdin.isatty():
        prompt = sys.stdin.read()
        if not prompt.strip():
            raise _UsageError("no input on stdin: pass --prompt TEXT, or run `hanlin chat` in a terminal")
    if args.json and prompt is None:
        raise _UsageError("--json answers one message: use it with --prompt TEXT or piped input")

    llm = hanlin.load(
        args.model or hanlin.DEFAULT_MODEL, device=args.device, engine=args.engine, config=config,
        pull_missing=not args.no_pull, ctx_size=args.ctx_size, threads=args.threads, dtype=args.dtype,
        compile=args.compile,
    )  # fmt: skip
    if args.explain:
        print(llm.explain(), file=sys.stderr)
    if llm.template_is_fallback:
        print("note: this model has no chat template; using ChatML", file=sys.stderr)
    system = [{"role": "system", "content": args.system}] if args.system else []
    if prompt is not None:
        return _one_shot(llm, system + [{"role": "user", "content": prompt}], args.json)
    return ChatSession(llm, args.system).run()


def _one_shot(llm: Any, messages: list[dict], as_json: bool) -> int:
    stream = llm.chat(messages, stream=True)
    try:
        for ev in stream:
            if not as_json and ev.text:
                sys.stdout.write(ev.text)
                sys.stdout.flush()
    except KeyboardInterrupt:
        stream.close()
    done = stream.completion
    if as_json:
        out = {"model": llm.name, "engine": llm.engine.name, "device": llm.device.spec(), **done.to_dict()}
        print(json.dumps(out, ensure_ascii=False))
    else:
        sys.stdout.write("\n")
    return 0


class ChatSession:
    """The interactive loop: read a message, stream the answer, keep the history."""

    def __init__(self, llm: Any, system: str | None, *, out: TextIO = sys.stdout):
        self.llm = llm
        self.system = system
        self.history: list[dict[str, str]] = []
        self.out = out

    def messages(self) -> list[dict[str, str]]:
        sys_msg = [{"role": "system", "content": self.system}] if self.system else []
        return sys_msg + self.history

    def run(self) -> int:
        try:
            import readline  # noqa: F401  (line editing and history where available)
        except ImportError:
            pass
        dev = self.llm.device
        self._say(f"hanlin · {self.llm.name} · {self.llm.engine.name} on {dev.label()} · context {self.llm.context_length} tokens")
        self._say("Type /help for commands, /exit to quit.")
        while True:
            text = self._read()
            if text is None:
                self._say("")
                return 0
            if not text.strip():
                continue
            if text.startswith("/"):
                if self._command(text.strip()) == "exit":
                    return 0
                continue
            self._answer(text)

    def _say(self, line: str) -> None:
        print(line, file=self.out, flush=True)

    def _read(self) -> str | None:
        """One user message (possibly multi-line); None at end of input."""
        lines: list[str] = []
        fence = False
        while True:
            try:
                line = input("... " if (lines or fence) else ">>> ")
            except EOFError:
                return "\n".join(lines) if lines else None
            except KeyboardInterrupt:
                self._say("\n(Ctrl-C: line cleared; /exit or Ctrl-D quits)")
                lines, fence = [], False
                continue
            if not lines and not fence and line.strip().startswith('"""'):
                rest = line.strip()[3:]
                if rest.endswith('"""') and len(rest) >= 3:
                    return rest[:-3]
                fence = True
                if rest:
                    lines.append(rest)
                continue
            if fence:
                if line.rstrip().endswith('"""'):
                    lines.append(line.rstrip()[:-3])
                    return "\n".join(lines)
                lines.append(line)
                continue
            if line.endswith("\\"):
                lines.append(line[:-1])
                continue
            lines.append(line)
            return "\n".join(lines)

    def _command(self, cmd: str) -> str | None:
        name, _, arg = cmd.partition(" ")
        arg = arg.strip()
        if name in ("/exit", "/bye", "/quit"):
            return "exit"
        if name == "/reset":
            self.history.clear()
            self._say("(conversation reset)")
        elif name == "/system":
            if not arg:
                self._say(f"(system prompt: {self.system!r})" if self.system else "(no system prompt)")
            elif arg == "-":
                self.system = None
                self._say("(system prompt cleared)")
            else:
                self.system = arg
                self._say("(system prompt set)")
        elif name in ("/help", "/?"):
            self._say(HELP_INTERACTIVE)
        else:
            self._say(f"unknown command {name}; /help lists the commands")
        return None

    def _answer(self, text: str) -> None:
        from hanlin.backends.base import HanlinError

        self.history.append({"role": "user", "content": text})
        try:
            stream = self.llm.chat(self.messages(), stream=True)
        except HanlinError as e:
            self.history.pop()
            self._say(f"error: {e}")
            if "context window" in str(e):
                self._say("(the conversation no longer fits: /reset starts a new one)")
            return
        pieces: list[str] = []
        try:
            for ev in stream:
                if ev.text:
                    pieces.append(ev.text)
                    self.out.write(ev.text)
                    self.out.flush()
        except KeyboardInterrupt:
            stream.close()
            self.out.write(" [stopped]")
        self.out.write("\n")
        self.out.flush()
        if stream.completion.finish_reason == "length" and stream.completion.completion_tokens:
            self._say("(answer cut at the token limit)")
        self.history.append({"role": "assistant", "content": "".join(pieces)})


# --------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------


class _UsageError(Exception):
    """Flags that do not go together (printed like any other user error)."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        if sys.stdin.isatty() and sys.stdout.isatty():  # a person at a terminal: open the app
            args = parser.parse_args(["tui"])
        else:
            parser.print_help()
            return 0
    from hanlin.backends.base import HanlinError

    try:
        return args.func(args)
    except (HanlinError, _UsageError) as e:
        print(f"hanlin: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (e.g. `hanlin chat -p ... | head -1`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
