"""Do the small model's tool calls parse? Constrained decoding against the baseline of asking
nicely, same model, same prompts, same seeds, in one run.

For each question and seed the model is shown the tools in its own format (a Hermes
<tool_call> system note, calls.tools_note) and asked to call one. Baseline: free decoding, then
the first <tool_call> block (or the whole answer) is parsed. hanlin: the call decoded under
calls.call_schema. A call counts as valid when its JSON parses, names a tool and its
arguments pass that tool's own validation (Tool.validate). Also the decode speed of each way
(grammar masks cost time on the CPU).

    python tools/bench_agents.py [--model M] [--seeds 10]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import re
import time

QUESTIONS = [
    "What is 17 * 23?",
    "Compute the square root of 1764 with Python.",
    "How much is 2 to the power of 20?",
    "Print the first 10 Fibonacci numbers.",
    "What is (3.5 + 4.25) / 2?",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--temperature", type=float, default=0.8)
    args = ap.parse_args()

    import hanlin
    from hanlin.agents import ToolsConfig, builtin_tools
    from hanlin.agents import calls as C

    llm = hanlin.load(args.model or hanlin.DEFAULT_MODEL, device="cpu", engine="gguf")
    box = builtin_tools(ToolsConfig(python=True))
    names = box.names()
    rows = {"free": {"parsed": 0, "valid": 0, "tokens": 0, "seconds": 0.0}, "constrained": {"parsed": 0, "valid": 0, "tokens": 0, "seconds": 0.0}}
    n = 0
    for q in QUESTIONS:
        messages = C.template_messages([{"role": "user", "content": q}], list(box), llm.template_reads_tools)
        ids = llm.chat_ids(messages)
        for seed in range(args.seeds):
            n += 1
            for way in ("free", "constrained"):
                t = time.perf_counter()
                if way == "free":
                    c = llm.generate_ids(ids, temperature=args.temperature, seed=seed, max_tokens=args.max_tokens)
                    blocks = re.findall(r"<tool_call>\s*(\{.*?\})\s*(?:</tool_call>|$)", c.text, re.S) or [c.text.strip()]
                    text = blocks[0]
                else:
                    head = llm.tokenize(C.TRIGGER, add_bos=False)
                    c = llm.generate_ids(ids + head, temperature=args.temperature, seed=seed, max_tokens=args.max_tokens,
                                         json_schema=json.dumps(C.call_schema(box)))  # fmt: skip
                    text = c.text
                r = rows[way]
                r["seconds"] += time.perf_counter() - t
                r["tokens"] += c.completion_tokens
                try:
                    obj = C.loads(text)
                except ValueError:
                    continue
                r["parsed"] += 1
                if isinstance(obj, dict) and obj.get("name") in names:
                    try:
                        box[obj["name"]].validate(obj.get("arguments"))
                    except Exception:  # noqa: BLE001 - an invalid call is what is being counted
                        continue
                    r["valid"] += 1
    out = {"model": llm.name, "calls": n, "temperature": args.temperature, "max_tokens": args.max_tokens}
    for way, r in rows.items():
        out[way] = {"parse_rate": round(r["parsed"] / n, 3), "valid_rate": round(r["valid"] / n, 3),
                    "tokens_per_s": round(r["tokens"] / r["seconds"], 1) if r["seconds"] else None}  # fmt: skip
    print(json.dumps(out))


if __name__ == "__main__":
    main()
