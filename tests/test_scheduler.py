"""The batching scheduler runs a prompt prefix that the requests it admits share (a chat
template's system prompt) once, copies its keys and values into each slot, and keeps it for
the requests after: they answer exactly as each does alone."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from hanlin.apps.server.scheduler import Scheduler  # noqa: E402
from hanlin.backends.base import GenerationConfig  # noqa: E402
from hanlin.backends.torch.generate import common_prefix  # noqa: E402

QUESTIONS = ["Name a colour.", "What is two plus two?", "Say hello in French.", "Name a large animal."]
GREEDY = GenerationConfig(max_tokens=10, temperature=0, repeat_penalty=1.0)


def test_a_shared_prompt_prefix_is_run_once_and_changes_no_token(default_model_path):
    import hanlin

    sched = Scheduler(max_batch=4, queue_size=8)
    llm = sched.start(lambda: hanlin.load(default_model_path, device="cpu", engine="torch", ctx_size=256))
    try:
        assert sched.batching
        prompts = [llm.chat_ids([{"role": "user", "content": q}]) for q in QUESTIONS]
        system = min(common_prefix(prompts[0], p) for p in prompts[1:])  # the template's system prompt and user marker
        assert system >= 16, system
        # submitted together: admitted in one round or more; the first admission finds no prefix
        # to share (nothing before it) unless others come with it, every later one does
        tickets = [sched.submit(p, GREEDY, 10) for p in prompts[:3]]
        got = [[t.token_id for t in ticket.tokens(timeout=120)] for ticket in tickets]
        first = sched.stats()["prefix_tokens_reused"]
        assert first >= 2 * system, sched.stats()
        late = sched.submit(prompts[3], GREEDY, 10)  # alone, later: the kept prefix still applies
        got.append([t.token_id for t in late.tokens(timeout=120)])
        assert sched.stats()["prefix_tokens_reused"] - first >= system
        want = [[e.token_id for e in llm.engine.generate(p, GREEDY) if e.token_id is not None] for p in prompts]
        assert got == want
        assert sched.stats()["running"] == 0 and sched._batch.free_slots() == 4
    finally:
        sched.close()
