"""Fine-tuning data: JSONL rows -> token ids with loss only on assistant tokens, packed or not.

    renderer = Renderer(template, lambda text: tok.encode(text, add_bos=False, special=True))
    examples, bad = load_sft("facts.jsonl", renderer, seq_len=512)      # alpaca | sharegpt | messages
    train, val = split(examples, 0.05, seed=0)
    batch = collate(pack(train, 512, pad_id)[:4])                       # ids, labels, positions, mask

    pairs, bad = load_dpo("prefs.jsonl", renderer, seq_len=512)        # prompt / chosen / rejected
    batch = collate_pairs(pairs[:4], pad_id)                            # chosen rows, then rejected rows

The steps, top to bottom:
1. Rows: each JSONL line becomes OpenAI-style messages (row_messages) or a DPO triple (row_pair).
   A bad row is a BadRow with its 1-based line number: skipped and reported, or (on_bad="stop")
   the run stops there. It is never silently kept.
2. Rendering: the model's own chat template renders the conversation; the text the template
   produces for each assistant message is found by rendering prefixes of the conversation
   (template-agnostic, see Renderer), and only those tokens get labels.
3. Packing: several conversations share one sequence of seq_len tokens; positions restart at 0
   for each and the attention mask is block-diagonal causal, so a packed document computes
   exactly what it would alone.

Labels follow Hugging Face's convention: labels[i] is the token the model must produce at i,
predicted from position i - 1 (the trainer shifts); IGNORE marks tokens that are not learned.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from typing import Any, Callable

from hanlin.backends.base import ConfigError

__all__ = [
    "IGNORE",
    "DataError",
    "BadRow",
    "Example",
    "Pair",
    "Packed",
    "row_messages",
    "row_pair",
    "Renderer",
    "read_jsonl",
    "load_sft",
    "load_dpo",
    "split",
    "pack",
    "unpacked",
    "collate",
    "collate_pairs",
]

IGNORE = -100  # the label of a token that is not learned (PyTorch cross_entropy's ignore_index)


class DataError(ConfigError):
    """The training data cannot be used; the message names "FILE:LINE: reason" where it can."""


@dataclass
class BadRow:
    line: int  # 1-based line number in the JSONL file (blank lines count)
    reason: str


@dataclass
class Example:
    ids: list[int]  # (L,) the rendered conversation
    labels: list[int]  # (L,) labels[i] == ids[i] on assistant tokens, IGNORE elsewhere
    line: int


@dataclass
class Pair:
    prompt: list[int]  # the rendered prompt, ending with the generation prompt ("<|im_start|>assistant\n")
    chosen: list[int]  # the completion's tokens, including what the template puts after it ("<|im_end|>\n")
    rejected: list[int]
    line: int


@dataclass
class Packed:
    ids: list[int]  # (seq_len,) documents back to back, then pad_id
    labels: list[int]  # (seq_len,) IGNORE on padding and on each document's first token
    positions: list[int]  # (seq_len,) 0, 1, 2.. restarting for each document; 0 on padding
    docs: list[int]  # (seq_len,) which document of this sequence (0, 1, 2..); -1 on padding


# --------------------------------------------------------------------------------------
# 1. Rows -> messages
# --------------------------------------------------------------------------------------

SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
MESSAGE_ROLES = ("system", "user", "assistant")


def _text(value: Any, where: str, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where} is {'missing' if value is None else 'a ' + type(value).__name__}; expected a string")
    if not allow_empty and not value.strip():
        raise ValueError(f"{where} is empty")
    return value


def _check_conversation(messages: list[dict], what: str) -> list[dict]:
    """The rules every SFT conversation follows, whatever its row format."""
    if not messages:
        raise ValueError(f"{what} is empty")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{what} has no assistant turn: nothing to learn")
    if messages[0]["role"] == "assistant":
        raise ValueError(f"{what} starts with an assistant turn; the chat template needs a user (or system) turn before it")
    return messages


def _messages_list(value: Any, what: str) -> list[dict]:
    """An OpenAI `messages` list, checked: [{role: system|user|assistant, content: str}, ...]."""
    if not isinstance(value, list):
        raise ValueError(f"{what} is a {type(value).__name__}; expected a list of {{'role', 'content'}} objects")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise ValueError(f"{what}[{i}] is a {type(m).__name__}; expected an object with 'role' and 'content'")
        role = m.get("role")
        if role not in MESSAGE_ROLES:
            raise ValueError(f"{what}[{i}] has unknown role {role!r}; expected one of {', '.join(MESSAGE_ROLES)}")
        content = _text(m.get("content"), f"{what}[{i}].content", allow_empty=role != "assistant")
        out.append({"role": role, "content": content})
    return out


def row_messages(row: dict) -> list[dict]:
    """One SFT row -> OpenAI messages. Raises ValueError(reason) on anything malformed.

    alpaca:   {"instruction", "input"?, "output", "system"?}
    sharegpt: {"conversations": [{"from": system|human|user|gpt|assistant, "value"}]}
    OpenAI:   {"messages": [{"role": system|user|assistant, "content"}]}
    """
    if not isinstance(row, dict):
        raise ValueError(f"the row is a JSON {type(row).__name__}; expected an object")
    if "messages" in row:
        return _check_conversation(_messages_list(row["messages"], "messages"), "messages")

    if "conversations" in row:
        conv = row["conversations"]
        if not isinstance(conv, list):
            raise ValueError(f"conversations is a {type(conv).__name__}; expected a list of {{'from', 'value'}} objects")
        out = []
        for i, turn in enumerate(conv):
            if not isinstance(turn, dict):
                raise ValueError(f"conversations[{i}] is a {type(turn).__name__}; expected an object with 'from' and 'value'")
            who = turn.get("from")
            if who not in SHAREGPT_ROLES:
                raise ValueError(f"conversations[{i}] has unknown role 'from': {who!r}; expected one of {', '.join(SHAREGPT_ROLES)}")
            role = SHAREGPT_ROLES[who]
            out.append({"role": role, "content": _text(turn.get("value"), f"conversations[{i}].value", allow_empty=role != "assistant")})
        return _check_conversation(out, "conversations")

    if "instruction" in row or "output" in row:
        instruction = _text(row.get("instruction"), "instruction")
        extra = row.get("input")
        if extra is not None:
            extra = _text(extra, "input", allow_empty=True)
        output = _text(row.get("output"), "output")
        user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction  # alpaca's input follows its instruction
        out = []
        if row.get("system") is not None:
            out.append({"role": "system", "content": _text(row["system"], "system")})
        return out + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]

    if "chosen" in row or "rejected" in row:
        raise ValueError("this is a DPO row (prompt/chosen/rejected); supervised fine-tuning needs messages, conversations or instruction/output")
    keys = ", ".join(sorted(map(str, row))) or "none"
    raise ValueError(
        f"not a known row format (keys: {keys}); expected 'messages' (OpenAI), 'conversations' (sharegpt) or 'instruction' + 'output' (alpaca)"
    )


def _completion(value: Any, name: str) -> str:
    """A DPO completion: a string, an assistant message, or a list of one assistant message."""
    if isinstance(value, list):
        if len(value) != 1:
            raise ValueError(f"{name} is a list of {len(value)} messages; expected exactly one assistant message")
        value = value[0]
    if isinstance(value, dict):
        if value.get("role", "assistant") != "assistant":
            raise ValueError(f"{name} has role {value.get('role')!r}; expected 'assistant'")
        return _text(value.get("content"), f"{name}.content")
    if value is None:
        raise ValueError(f"{name} is missing")
    return _text(value, name)


def row_pair(row: dict) -> tuple[list[dict], str, str]:
    """One DPO row {prompt, chosen, rejected} -> (prompt messages, chosen text, rejected text).

    prompt: a string (one user turn) or a messages list ending with a user turn;
    chosen / rejected: a string, {"role": "assistant", "content"} or [that message].
    """
    if not isinstance(row, dict):
        raise ValueError(f"the row is a JSON {type(row).__name__}; expected an object")
    if "prompt" not in row:
        keys = ", ".join(sorted(map(str, row))) or "none"
        raise ValueError(f"a DPO row needs 'prompt', 'chosen' and 'rejected' (keys: {keys})")
    prompt = row["prompt"]
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": _text(prompt, "prompt")}]
    else:
        messages = _messages_list(prompt, "prompt")
        if not messages:
            raise ValueError("prompt is an empty list")
        if messages[-1]["role"] == "assistant":
            raise ValueError("prompt ends with an assistant turn; it must end with the turn the completions answer")
    chosen = _completion(row.get("chosen"), "chosen")
    rejected = _completion(row.get("rejected"), "rejected")
    if chosen == rejected:
        raise ValueError("chosen and rejected are the same text: the pair teaches nothing")
    return messages, chosen, rejected


# --------------------------------------------------------------------------------------
# 2. Rendering with the model's chat template; labels on assistant tokens only
# --------------------------------------------------------------------------------------


class Renderer:
    """Renders conversations with a model's chat template and finds the assistant's tokens.

    Template-agnostic: for assistant message k, the text the template writes for it is
    render(messages[:k+1]) minus render(messages[:k], add_generation_prompt=True). For ChatML
    (SmolLM2, Qwen2, InternLM2) that is "content<|im_end|>\\n": the content, the end-of-turn
    token and the newline the template puts after it. All of it is learned. Learning the
    end-of-turn token is what teaches the model to stop (as TRL's assistant_only_loss does);
    the newline after it is kept because cutting it out would need to know which token ends a
    turn in each template, and it is harmless (generation stops at <|im_end|> and never
    reaches it).

    The text is tokenized segment by segment (template text, assistant text, template text..)
    and the ids concatenated, so no token straddles the boundary between what is learned and
    what is not. This is also how the model meets the tokens when it chats: the prompt up to
    "<|im_start|>assistant\\n" is tokenized, and the reply is generated after it. For ChatML
    the segments meet at special tokens and newlines, and the ids equal those of tokenizing
    the whole text at once (a test checks it), except where a reply starts with two or more
    whitespace characters: whole-text BPE would merge the template's "\\n" with them into one
    token that straddles the boundary; here they stay apart, as when the model generates.
    """

    def __init__(
        self,
        template: str,
        encode: Callable[[str], list[int]],
        *,
        bos_token: str = "",
        eos_token: str = "",
        add_bos: bool = False,
        bos_id: int | None = None,
    ):
        if not isinstance(template, str) or not template.strip():
            raise ConfigError("Renderer: the chat template is empty; fine-tuning renders rows with the model's own template")
        if add_bos and bos_id is None:
            raise ConfigError("Renderer: add_bos=True needs bos_id (the tokenizer's BOS token id)")
        self.template = template
        self.encode = encode
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.add_bos = add_bos
        self.bos_id = bos_id

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        from hanlin.chat_template import render

        return render(self.template, messages, add_generation_prompt=generation_prompt, bos_token=self.bos_token, eos_token=self.eos_token)

    def segments(self, messages: list[dict]) -> list[tuple[str, bool]]:
        """The rendered conversation as consecutive (text, is_assistant) pieces, in order."""
        if not messages:
            raise ValueError("the conversation is empty")
        full = self._render(messages, False)
        spans = []  # (start, end) of each assistant message's text in `full`
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            if k == 0:
                raise ValueError("the conversation starts with an assistant turn; the template needs a user (or system) turn before it")
            before = self._render(messages[:k], True)  # ... "<|im_start|>assistant\n"
            through = self._render(messages[: k + 1], False)  # ... "<|im_start|>assistant\nPARIS<|im_end|>\n"
            if not through.startswith(before) or not full.startswith(through):
                raise DataError(
                    f"the chat template renders message {k} (assistant) differently depending on what follows it "
                    "(a conversation's rendering does not start with the rendering of its first turns), so the "
                    "assistant's tokens cannot be located; use a template whose rendering of a conversation prefix "
                    "is a prefix of the whole rendering"
                )
            if spans and len(before) < spans[-1][1]:
                raise DataError(f"the chat template's generation prompt for message {k} overlaps the previous assistant turn")
            spans.append((len(before), len(through)))
        pieces, at = [], 0
        for start, end in spans:
            pieces.append((full[at:start], False))
            pieces.append((full[start:end], True))
            at = end
        pieces.append((full[at:], False))
        return [(text, learn) for text, learn in pieces if text]

    def _tokens(self, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        labels: list[int] = []
        if self.add_bos and not (self.bos_token and pieces and pieces[0][0].startswith(self.bos_token)):
            ids.append(self.bos_id)  # the template did not write the BOS itself
            labels.append(IGNORE)
        for text, learn in pieces:
            piece = list(self.encode(text))
            ids += piece
            labels += piece if learn else [IGNORE] * len(piece)
        return ids, labels

    def sft(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """messages -> (ids, labels), labels == ids on the assistant's tokens, IGNORE elsewhere."""
        return self._tokens(self.segments(messages))

    def pair(self, prompt: list[dict], chosen: str, rejected: str) -> tuple[list[int], list[int], list[int]]:
        """-> (prompt ids, chosen ids, rejected ids); prompt + chosen == sft(prompt + [assistant chosen])'s ids."""
        if prompt and prompt[-1]["role"] == "assistant":
            raise ValueError("the prompt ends with an assistant turn; it must end with the turn the completions answer")
        out = []
        for text in (chosen, rejected):
            pieces = self.segments([*prompt, {"role": "assistant", "content": text}])
            if not pieces or not pieces[-1][1]:
                raise DataError("the chat template wrote text after the final assistant turn; cannot split prompt from completion")
            prompt_ids, _ = self._tokens(pieces[:-1])
            out.append((prompt_ids, list(self.encode(pieces[-1][0]))))
        (p_chosen, c_chosen), (p_rejected, c_rejected) = out
        if p_chosen != p_rejected:
            raise DataError("the chat template renders the same prompt differently for the chosen and the rejected completion")
        return p_chosen, c_chosen, c_rejected


# --------------------------------------------------------------------------------------
# Reading JSONL files
# --------------------------------------------------------------------------------------


def _check_on_bad(on_bad: str) -> None:
    if on_bad not in ("skip", "stop"):
        raise ConfigError(f"on_bad={on_bad!r} is not valid: 'skip' (report bad rows and go on) or 'stop' (stop at the first)")


def read_jsonl(path: str, parse: Callable[[dict], Any], *, on_bad: str = "skip") -> tuple[list[tuple[int, Any]], list[BadRow]]:
    """-> ([(line, parse(row)) for each good row], [BadRow for each bad one]). Blank lines are ignored
    (but counted in the numbering). A line that is not JSON, not an object, or that `parse` rejects
    with ValueError is a BadRow; with on_bad="stop" the first one raises DataError("FILE:LINE: reason").
    A DataError from `parse` (a problem with the template, not the row) always stops the run.
    """
    _check_on_bad(on_bad)
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file (expected a JSONL file, one JSON object per line)")
    good: list[tuple[int, Any]] = []
    bad: list[BadRow] = []

    def reject(line: int, reason: str) -> None:
        if on_bad == "stop":
            raise DataError(f"{path}:{line}: {reason} (on_bad='skip' would skip this row and go on)")
        bad.append(BadRow(line, reason))

    with open(path, "rb") as f:
        for line, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8-sig" if line == 1 else "utf-8")
            except UnicodeDecodeError as e:
                reject(line, f"not UTF-8 text ({e.reason} at byte {e.start})")
                continue
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                reject(line, f"not valid JSON: {e.msg} at column {e.colno}")
                continue
            if not isinstance(row, dict):
                reject(line, f"a JSON {type(row).__name__}, not an object")
                continue
            try:
                good.append((line, parse(row)))
            except DataError as e:
                raise DataError(f"{path}:{line}: {e}") from None
            except ValueError as e:
                reject(line, str(e))
    if not good:
        detail = f"; the first bad one, line {bad[0].line}: {bad[0].reason}" if bad else ""
        raise DataError(f"{path}: no usable rows ({len(bad)} bad{detail})")
    return good, bad


def _check_seq_len(seq_len: int) -> None:
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ConfigError(f"seq_len={seq_len!r} is not valid: it must be an integer >= 2")


def load_sft(path: str, renderer: Renderer, *, seq_len: int, on_bad: str = "skip") -> tuple[list[Example], list[BadRow]]:
    """A JSONL file of alpaca / sharegpt / messages rows -> (examples, bad rows).

    A row longer than seq_len is cut to its first seq_len tokens; if no learnable token is left
    (one with a label at position >= 1: position 0 has nothing before it to predict it from)
    the row is bad.
    """
    _check_seq_len(seq_len)

    def parse(row: dict) -> tuple[list[int], list[int]]:
        ids, labels = renderer.sft(row_messages(row))
        if len(ids) > seq_len:
            ids, labels = ids[:seq_len], labels[:seq_len]
            if all(t == IGNORE for t in labels[1:]):
                raise ValueError(f"longer than seq_len={seq_len} with no assistant token in the first {seq_len}")
        elif all(t == IGNORE for t in labels[1:]):
            raise ValueError("the rendered conversation has no assistant token to learn")
        return ids, labels

    rows, bad = read_jsonl(path, parse, on_bad=on_bad)
    return [Example(ids, labels, line) for line, (ids, labels) in rows], bad


def load_dpo(path: str, renderer: Renderer, *, seq_len: int, on_bad: str = "skip") -> tuple[list[Pair], list[BadRow]]:
    """A JSONL file of prompt / chosen / rejected rows -> (pairs, bad rows).

    When prompt + the longer completion exceeds seq_len, the prompt loses tokens from its start
    (the end of the prompt is what the completion answers); completions are never cut, so a
    pair whose longer completion leaves no room for at least one prompt token is bad.
    """
    _check_seq_len(seq_len)

    def parse(row: dict) -> Pair:
        prompt, chosen, rejected = renderer.pair(*row_pair(row))
        longest = max(len(chosen), len(rejected))
        if longest > seq_len - 1:
            raise ValueError(f"a completion has {longest} tokens: it does not fit seq_len={seq_len} with at least one prompt token")
        room = seq_len - longest
        if len(prompt) > room:
            prompt = prompt[len(prompt) - room :]  # keep the prompt's end
        return Pair(prompt, chosen, rejected, 0)

    rows, bad = read_jsonl(path, parse, on_bad=on_bad)
    pairs = []
    for line, p in rows:
        p.line = line
        pairs.append(p)
    return pairs, bad


def split(items: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """-> (train, validation): a seeded random choice of round(len * val_fraction) items (at least
    1 when val_fraction > 0 and there are 2 or more items; never all of them) for validation.
    Each part keeps the items' original order; the trainer shuffles what it trains on."""
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"val_fraction={val_fraction!r} is not valid: it must be in [0, 1)")
    n = len(items)
    if val_fraction == 0 or n < 2:
        return list(items), []
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    chosen = set(order[:n_val])
    train = [x for i, x in enumerate(items) if i not in chosen]
    val = [x for i, x in enumerate(items) if i in chosen]
    return train, val


# --------------------------------------------------------------------------------------
# 3. Packing and batches
# --------------------------------------------------------------------------------------


def _first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins of `capacity`: first-fit decreasing.

    Why FFD: it never splits a document (each keeps its start and its attention stays inside
    it), it is deterministic, and it wastes little (at most 11/9 of the optimal number of bins
    plus one), so far fewer padding tokens than filling sequences in file order. First fit
    is found in O(log n) with a max-segment-tree over the bins' free space: the leftmost bin
    with room is either an open bin or the next fresh one (fresh bins have full capacity).
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep file order
    size = 1
    while size < max(1, len(lengths)):
        size *= 2
    free = [capacity] * (2 * size)  # free[size + b] = room left in bin b; free[node] = max of its children
    bins: list[list[int]] = []
    for i in order:
        need, node = lengths[i], 1
        while node < size:  # descend to the leftmost leaf with room >= need
            node = 2 * node if free[2 * node] >= need else 2 * node + 1
        b = node - size
        if b == len(bins):
            bins.append([])
        bins[b].append(i)
        free[node] -= need
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return bins


def _check_examples(examples: list[Example], seq_len: int) -> None:
    _check_seq_len(seq_len)
    for ex in examples:
        if len(ex.ids) != len(ex.labels):
            raise DataError(f"example from line {ex.line}: {len(ex.ids)} ids but {len(ex.labels)} labels")
        if not ex.ids:
            raise DataError(f"example from line {ex.line} has no tokens")
        if len(ex.ids) > seq_len:
            raise DataError(
                f"example from line {ex.line} has {len(ex.ids)} tokens, more than seq_len={seq_len}; "
                "load_sft cuts rows to seq_len: load and pack with the same seq_len"
            )


def _sequence(docs: list[Example], seq_len: int, pad_id: int) -> Packed:
    ids, labels, positions, doc_ids = [], [], [], []
    for d, ex in enumerate(docs):
        ids += ex.ids
        # The first token of a document is never a target: it would be predicted from the
        # previous document's last token (the trainer predicts labels[i] from position i - 1).
        labels += [IGNORE] + ex.labels[1:]
        positions += range(len(ex.ids))
        doc_ids += [d] * len(ex.ids)
    pad = seq_len - len(ids)
    return Packed(ids + [pad_id] * pad, labels + [IGNORE] * pad, positions + [0] * pad, doc_ids + [-1] * pad)


def pack(examples: list[Example], seq_len: int, pad_id: int) -> list[Packed]:
    """Examples -> sequences of exactly seq_len tokens, several documents each (first-fit decreasing)."""
    _check_examples(examples, seq_len)
    bins = _first_fit_decreasing([len(ex.ids) for ex in examples], seq_len)
    return [_sequence([examples[i] for i in b], seq_len, pad_id) for b in bins]


def unpacked(examples: list[Example], seq_len: int, pad_id: int) -> list[Packed]:
    """Examples -> one sequence each, right-padded to seq_len (packing off)."""
    _check_examples(examples, seq_len)
    return [_sequence([ex], seq_len, pad_id) for ex in examples]


def collate(batch: list[Packed]) -> dict[str, Any]:
    """Packed sequences -> tensors: ids, labels, positions (B, T) long; mask (B, 1, T, T) bool.

    mask[b, 0, i, j] is True where query i may attend key j: same document, j <= i, j not padding.
    A padding query attends to itself only, so no row of the mask is all False (a softmax over
    nothing is NaN, and NaN would reach the gradients through 0 * NaN).
    """
    import torch

    if not batch:
        raise ValueError("collate: the batch is empty")
    T = len(batch[0].ids)
    if any(len(p.ids) != T for p in batch):
        raise ValueError(f"collate: sequences of different lengths {sorted({len(p.ids) for p in batch})}; pack them with one seq_len")
    ids = torch.tensor([p.ids for p in batch], dtype=torch.long)  # (B, T)
    labels = torch.tensor([p.labels for p in batch], dtype=torch.long)  # (B, T)
    positions = torch.tensor([p.positions for p in batch], dtype=torch.long)  # (B, T)
    docs = torch.tensor([p.docs for p in batch], dtype=torch.long)  # (B, T)
    same_doc = docs[:, :, None] == docs[:, None, :]  # (B, T, T)
    causal = torch.ones(T, T, dtype=torch.bool).tril()  # (T, T)
    real_key = (docs >= 0)[:, None, :]  # (B, 1, T)
    pad_query = (docs < 0)[:, :, None]  # (B, T, 1)
    eye = torch.eye(T, dtype=torch.bool)  # (T, T)
    mask = (same_doc & causal & real_key) | (pad_query & eye)  # (B, T, T)
    return {"ids": ids, "labels": labels, "positions": positions, "mask": mask[:, None]}


def collate_pairs(pairs: list[Pair], pad_id: int) -> dict[str, Any]:
    """DPO pairs -> 2B rows: B chosen sequences (prompt + chosen), then B rejected (prompt + rejected),
    right-padded to the longest. ids, labels, positions (2B, T) long; mask (2B, 1, T, T) bool.
    labels are set on the completion tokens only; the mask is causal over the real tokens, and
    a padding query attends to itself only (no all-False row)."""
    import torch

    if not pairs:
        raise ValueError("collate_pairs: no pairs")
    rows = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
    T = max(len(prompt) + len(completion) for prompt, completion in rows)
    ids, labels, positions, lengths = [], [], [], []
    for prompt, completion in rows:
        n = len(prompt) + len(completion)
        pad = T - n
        ids.append(prompt + completion + [pad_id] * pad)
        labels.append([IGNORE] * len(prompt) + completion + [IGNORE] * pad)
        positions.append(list(range(n)) + [0] * pad)
        lengths.append(n)
    real = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]  # (2B, T)
    causal = torch.ones(T, T, dtype=torch.bool).tril()  # (T, T)
    eye = torch.eye(T, dtype=torch.bool)
    mask = (causal & real[:, :, None] & real[:, None, :]) | (~real[:, :, None] & eye)  # (2B, T, T)
    return {
        "ids": torch.tensor(ids, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "positions": torch.tensor(positions, dtype=torch.long),
        "mask": mask[:, None],
    }
