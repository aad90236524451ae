"""A request that fails as it starts in the batching scheduler fails alone: its slot comes
back and the next request is served. (A seed torch's generator rejected once left the slot
taken and the request waiting for ever, and every later request then failed.)"""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from hanlin.apps.server.scheduler import Scheduler  # noqa: E402
from hanlin.backends.base import GenerationConfig  # noqa: E402


def test_a_request_that_fails_to_start_frees_its_slot(default_model_path, monkeypatch):
    import hanlin
    import hanlin.backends.torch.generate as gen

    real = gen.make_generator
    calls = {"n": 0}

    def flaky(seed, device):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("generator refused the seed")
        return real(seed, device)

    # patched before the model thread starts: each scheduler round imports it as the round begins
    monkeypatch.setattr(gen, "make_generator", flaky)
    sched = Scheduler(max_batch=2, queue_size=4)
    llm = sched.start(lambda: hanlin.load(default_model_path, device="cpu", engine="torch", ctx_size=256))
    try:
        assert sched.batching
        ids = llm.tokenize("Hello")
        bad = sched.submit(ids, GenerationConfig(max_tokens=4, temperature=0), 4)
        with pytest.raises(RuntimeError, match="generator refused the seed"):
            list(bad.tokens(timeout=60))
        good = sched.submit(ids, GenerationConfig(max_tokens=4, temperature=0), 4)
        assert len(list(good.tokens(timeout=60))) == 4
        assert sched.stats()["running"] == 0 and sched._batch.free_slots() == 2
    finally:
        sched.close()
