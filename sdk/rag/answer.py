"""Answer a question from retrieved passages, citing them by number."""

from __future__ import annotations

from typing import Any, Sequence

from .index import Hit

# what a declined question gets (KnowledgeBase.answerable said no): the CLI, the server and the
# terminal app say the same words, and the model is not asked
DECLINED = "I can't answer that from this knowledge base: the question does not match its documents."

PROMPT = """Answer the question using only the numbered passages below. Cite the passages you use as [1], [2], ...
If the passages do not contain the answer, say that you do not know.

{passages}

Question: {question}"""


def answer(llm: Any, question: str, hits: Sequence[Hit], *, max_tokens: int = 256, max_context_chars: int = 6000) -> tuple[str, list[Hit]]:
    """(the model's answer, the passages it was given, in their citation order). Passages are
    added best first until max_context_chars, so a small context window is never overrun."""
    used: list[Hit] = []
    parts: list[str] = []
    size = 0
    for h in hits:
        block = f"[{len(used) + 1}] ({h.citation()}) {h.text}"
        if used and size + len(block) > max_context_chars:
            break
        used.append(h)
        parts.append(block)
        size += len(block)
    messages = [{"role": "user", "content": PROMPT.format(passages="\n\n".join(parts), question=question)}]
    return llm.chat(messages, temperature=0, max_tokens=max_tokens).text.strip(), used
