"""The scheduler: one thread owns the model and serves every request through it.

Requests wait in a bounded queue (`submit` refuses with QueueFull instead of accepting work it
cannot hold). Two ways to run them, chosen by what the engine can do:

- continuous batching (the native torch engine): requests join the running batch between
  decode steps, each in a KV-cache slot of `SlotBatch`, and leave it when they end or their
  client goes away (`Ticket.cancel`, honoured before the next step). Sampling is per request,
  with its own settings, seed and JSON-schema constraint.
- one at a time (any other engine): the engine's own `generate`, request after request.

The HTTP side never touches the model: a request's tokens come back through its `Ticket`, a
thread-safe queue that the endpoint reads (`RawToken`s, then None at the end, or an
exception). The shared stop policy (base.apply_stops) runs on the endpoint side.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

from hanlin.backends.base import PENALTY_LAST_N, ConfigError, GenerationConfig, RawToken

log = logging.getLogger("hanlin.server")
PREFILL_TOKENS = 2048  # prompt tokens admitted per round at most (one forward pass; always at least one request)
# a prompt prefix shared this long is run once and kept (_shared_prefix): the default model's
# chat template puts 24 tokens before every user message
PREFIX_MIN = 16


class QueueFull(Exception):
    """The wait queue holds as many requests as it may; the client should retry later."""


@dataclass
class Ticket:
    """One request in the scheduler: its inputs, and the queue its tokens come back through."""

    prompt_ids: list[int]
    config: GenerationConfig
    max_new: int
    top_logprobs: int = 0
    out: queue.Queue = field(default_factory=queue.Queue)  # RawToken ..., then None (or an exception)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None

    loop: Any = None  # an asyncio loop: tokens are then delivered to `aout` on it (the HTTP side)
    aout: Any = None  # asyncio.Queue, when loop is set

    def deliver(self, item: Any) -> None:
        """From the scheduler thread: a RawToken, None (the end) or an exception."""
        if self.loop is None:
            self.out.put(item)
            return
        try:
            self.loop.call_soon_threadsafe(self.aout.put_nowait, item)
        except RuntimeError:  # the loop has closed (server shutting down): nobody is listening
            self.cancelled.set()

    def cancel(self) -> None:
        """The client is gone or has what it needs: free the slot at the next step."""
        self.cancelled.set()
        self.out.put(None)  # wake a reader blocked on the queue

    def tokens(self, timeout: float | None = None) -> Iterator[RawToken]:
        """The tokens as they come (blocking); ends at the end of generation."""
        while True:
            item = self.out.get(timeout=timeout)
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


class Scheduler:
    def __init__(self, *, max_batch: int, queue_size: int, metrics: Any = None):
        self.engine: Any = None
        self.max_batch = max_batch
        self.metrics = metrics
        self.waiting: queue.Queue[Ticket] = queue.Queue(maxsize=queue_size)
        self.batching = False
        self.running: dict[int, _Running] = {}  # slot -> request (batching mode)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="hanlin-scheduler", daemon=True)
        self._ready = threading.Event()
        self._loaded: Any = None  # what load() returned, or the exception it raised
        self._batch = None
        self._prefix = None  # the last shared prompt prefix's keys and values (batching mode)
        self._last_prompt: list[int] | None = None  # the prompt admitted last, to find what the next one shares
        self.prefix_tokens_reused = 0  # admitted prompt tokens whose keys and values came from it
        self._slots = None  # GGUFSlots, for the GGUF engine
        self._grammar_lock = threading.Lock()
        self._outbox: list[tuple[Ticket, Any]] = []
        self._jobs: queue.Queue = queue.Queue()  # (fn, Future) to run on the model thread  # (ticket, item) posted this round, sent by _flush

    # ---- the HTTP side ----------------------------------------------------------------

    def start(self, load: Callable[[], Any]) -> Any:
        """Start the model thread, which calls load() (returning an LLM) and then serves;
        returns the LLM once loaded (or raises what loading raised).

        Why the model is loaded in this thread and not the caller's: every torch op must run
        on one thread. Each thread that runs OpenMP work gets its own worker pool; with two
        pools on a 2-core machine libgomp counts more threads than cores and drops from
        spinning to sleeping at every barrier, which made the packed products of a decode
        step ~35% slower than the same products on one thread (measured: 9.8 vs 7.0 ms)."""
        self._load = load
        self._thread.start()
        atexit.register(self.close)  # a model thread still running at interpreter exit aborts it (C++ threads)
        self._ready.wait()
        if isinstance(self._loaded, BaseException):
            raise self._loaded
        return self._loaded

    def _main(self) -> None:
        try:
            llm = self._load()
            self.engine = llm.engine
            self.batching = _can_batch(self.engine)
            if self.batching:
                from hanlin.backends.hugepages import huge_pages
                from hanlin.backends.torch.batching import SlotBatch

                with huge_pages(self.engine.device.kind == "cpu"):  # the slots' KV cache, as the engine's weights
                    self._batch = SlotBatch(self.engine.model, self.max_batch, self.engine.context_length)
            elif getattr(self.engine, "name", None) == "gguf":  # llama.cpp sequences: several requests per decode
                from hanlin.backends.gguf.batching import GGUFSlots

                self._slots = GGUFSlots(self.engine, self.max_batch, self.engine.context_length)
            self._loaded = llm
        except BaseException as e:  # noqa: BLE001  (handed to start(), which raises it)
            self._loaded = e
            return
        finally:
            self._ready.set()
        self._loop()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run fn on the model thread, between decode steps (other torch work, e.g. embeddings,
        must not run its own OpenMP pool beside the decode step's; see start())."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((fn, future))
        return future

    def _run_jobs(self) -> None:
        while True:
            try:
                fn, future = self._jobs.get_nowait()
            except queue.Empty:
                return
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as e:  # noqa: BLE001  (the caller gets it)
                    future.set_exception(e)

    def submit(self, prompt_ids: Sequence[int], config: GenerationConfig, max_new: int, top_logprobs: int = 0, loop: Any = None) -> Ticket:
        """Queue a request (from any thread); with an asyncio loop, its tokens arrive on
        ticket.aout in that loop. Raises QueueFull rather than accept work it cannot hold."""
        ticket = Ticket(list(prompt_ids), config, max_new, top_logprobs)
        if loop is not None:
            import asyncio

            ticket.loop, ticket.aout = loop, asyncio.Queue()
        try:
            self.waiting.put_nowait(ticket)
        except queue.Full:
            raise QueueFull(f"the server is at capacity ({self.max_batch} running, {self.waiting.maxsize} waiting)") from None
        self._gauge()
        return ticket

    def stats(self) -> dict[str, int]:
        return {"running": len(self.running), "waiting": self.waiting.qsize(), "slots": self.max_batch,
                "prefix_tokens_reused": self.prefix_tokens_reused}  # fmt: skip

    # ---- the model side (the scheduler thread) -------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._run_jobs()
                if self.batching:
                    self._batch_round()
                elif self._slots is not None:
                    self._gguf_round()
                else:
                    self._serial_round()
            except Exception as e:  # a bug must not kill the thread silently: fail the requests it held
                log.exception("scheduler step failed")
                for run in list(self.running.values()):
                    self._finish(run, e)
            finally:
                self._flush()

    def _post(self, ticket: Ticket, item: Any) -> None:
        """Queue an item for a ticket; sent at the end of the round (_flush), so the HTTP side's
        event loop wakes once per decode step rather than once per request and token: on two
        cores every wake-up takes CPU from the decode step's threads."""
        if ticket.loop is None:
            ticket.deliver(item)
        else:
            self._outbox.append((ticket, item))

    def _flush(self) -> None:
        if not self._outbox:
            return
        by_loop: dict[Any, list[tuple[Ticket, Any]]] = {}
        for ticket, item in self._outbox:
            by_loop.setdefault(ticket.loop, []).append((ticket, item))
        self._outbox = []
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that loop has closed (server shutting down): nobody is listening
                for ticket, _ in items:
                    ticket.cancelled.set()

    def _serial_round(self) -> None:
        try:
            ticket = self.waiting.get(timeout=0.1)
        except queue.Empty:
            return
        self._gauge()
        if ticket.cancelled.is_set():
            return
        self.running[0] = run = _Running(ticket, slot=0)
        self._gauge()
        try:
            for event in self.engine.generate(ticket.prompt_ids, ticket.config.updated(max_tokens=ticket.max_new, stop=())):
                if ticket.cancelled.is_set():
                    break
                if event.token_id is not None:
                    self._emit(run, RawToken(event.token_id, event.logprob))
                    self._flush()  # one request at a time: each token goes out as it comes
            self._finish(run)
        except Exception as e:
            self._finish(run, e)

    def _gguf_round(self) -> None:
        """Continuous batching on llama.cpp: admit into free sequences, then one decode for all."""
        slots = self._slots
        for run in [r for r in self.running.values() if r.ticket.cancelled.is_set()]:
            self._finish(run)
        while slots.free_slots():
            try:
                ticket = self.waiting.get(timeout=0.1 if not self.running else 0)
            except queue.Empty:
                break
            if ticket.cancelled.is_set():
                continue
            try:
                slot = slots.admit(ticket.prompt_ids, ticket.config)
            except Exception as e:  # noqa: BLE001  (a bad schema, ...: this request alone fails)
                ticket.deliver(e)
                continue
            run = self.running[slot] = _Running(ticket, slot)
            self._gguf_sample(run)
        self._gauge()
        if self.running:
            slots.step({slot: run.last for slot, run in self.running.items()})
            for run in list(self.running.values()):
                self._gguf_sample(run)

    def _gguf_sample(self, run: "_Running") -> None:
        tok, lp, top = self._slots.sample(run.slot, run.ticket.config.logprobs or bool(run.ticket.top_logprobs), run.ticket.top_logprobs)
        run.last = tok
        self._emit(run, RawToken(tok, lp, top))
        if tok in self.engine.eos_token_ids or run.produced >= run.ticket.max_new or self._slots.room(run.slot) <= 0:
            self._finish(run)

    def _batch_round(self) -> None:
        import torch

        from hanlin.backends.torch.generate import apply_repeat_penalty, make_generator, sample

        for run in [r for r in self.running.values() if r.ticket.cancelled.is_set()]:
            self._finish(run)  # a client that went away frees its slot before this step
        # admit waiting requests into free slots, prefilled together in one forward pass
        admitted: list[tuple[Ticket, Any]] = []
        budget = PREFILL_TOKENS
        while len(admitted) < self._batch.free_slots():
            try:
                ticket = self.waiting.get(timeout=0.1 if not self.running and not admitted else 0)
            except queue.Empty:
                break
            if ticket.cancelled.is_set():
                continue
            try:
                constraint = self._constraint(ticket.config)  # checked on the HTTP side already; a failure here ends this request alone
            except Exception as e:  # noqa: BLE001
                ticket.deliver(e)
                continue
            admitted.append((ticket, constraint))
            budget -= len(ticket.prompt_ids)
            if budget <= 0:
                break  # long prompts: the rest wait for the next round, so running requests are not stalled long
        if admitted:
            try:
                prompts = [t.prompt_ids for t, _ in admitted]
                prefilled = self._batch.admit_many(prompts, self._shared_prefix(prompts))
            except Exception as e:  # noqa: BLE001  (these requests fail; the running ones go on)
                log.exception("prefill failed")
                for ticket, _ in admitted:
                    ticket.deliver(e)
                prefilled = []
            for (ticket, constraint), (slot, logits) in zip(admitted, prefilled):
                run = _Running(ticket, slot, constraint=constraint)
                self.running[slot] = run  # from here on _finish frees the slot, whatever fails below
                try:
                    run.generator = make_generator(ticket.config.seed, logits.device)
                    run.history = torch.tensor([ticket.prompt_ids[-PENALTY_LAST_N:]], device=logits.device)
                    self._sample_and_emit(run, logits, sample, apply_repeat_penalty)
                except Exception as e:  # noqa: BLE001  (this request fails alone; a leaked slot once wedged the server)
                    log.exception("starting a request failed")
                    self._finish(run, e)
        self._gauge()
        if not self.running:
            return
        feed = {slot: run.last for slot, run in self.running.items()}
        with torch.inference_mode():
            logits = self._batch.step(feed)
            for slot, row in logits.items():
                self._sample_and_emit(self.running[slot], row, sample, apply_repeat_penalty)

    def _shared_prefix(self, prompts: list) -> Any:
        """The keys and values of a prefix every prompt admitted now starts with, run once and
        copied into each slot (batching.Prefix): the kept one when they all still start with it
        (chat requests share their template's system prompt), else the prefix they share with
        each other and with the prompt admitted before them, when long enough
        (PREFIX_MIN), which is then kept. Measured with tools/bench_serve.py: see README."""
        from hanlin.backends.torch.batching import Prefix
        from hanlin.backends.torch.generate import shared_prefix

        last, seen = self._prefix, self._last_prompt
        self._last_prompt = list(prompts[-1])
        if last is None or not all(len(p) > len(last.tokens) and list(p[: len(last.tokens)]) == last.tokens for p in prompts):
            seqs = [*prompts, seen] if seen is not None else list(prompts)  # these and the prompt admitted before them
            P = shared_prefix(seqs, PREFIX_MIN) if len(seqs) > 1 else 0
            if not P:
                return None
            last = self._prefix = Prefix(self.engine.model, prompts[0][:P])
        self.prefix_tokens_reused += len(last.tokens) * len(prompts)
        return last

    def _sample_and_emit(self, run: "_Running", logits, sample, apply_repeat_penalty) -> None:
        import torch

        cfg = run.ticket.config
        logits = logits[None].float()  # (1, V)
        if run.constraint is not None:
            run.constraint.mask_(logits)
        ids, lps = sample(apply_repeat_penalty(logits, run.history, cfg.repeat_penalty), cfg, run.generator)
        tok = int(ids[0])
        top: tuple[tuple[int, float], ...] = ()
        if run.ticket.top_logprobs:
            values, idx = torch.log_softmax(logits, dim=-1)[0].topk(run.ticket.top_logprobs)
            top = tuple(zip(idx.tolist(), values.tolist()))
        run.last = tok
        run.history = torch.cat([run.history, ids[:, None]], dim=1)[:, -PENALTY_LAST_N:]
        self._emit(run, RawToken(tok, float(lps[0]), top))
        if run.constraint is not None:
            run.constraint.accept(tok)
        done = tok in self.engine.eos_token_ids or run.produced >= run.ticket.max_new or self._batch.room(run.slot) <= 0
        if run.constraint is not None and run.constraint.is_done and not done:
            self._emit(run, RawToken(min(self.engine.eos_token_ids), 0.0))  # the JSON is complete: end as at EOS
            done = True
        if done:
            self._finish(run)

    def check(self, config: GenerationConfig) -> None:
        """From the HTTP side, before submit: can this request be served as asked? Raises
        ConfigError naming the problem (an invalid schema; structured output unavailable)."""
        if config.json_schema is not None and self.batching:
            self._constraint(config)  # compiles (cached) the schema's grammar, or says why not

    def _constraint(self, config: GenerationConfig):
        if config.json_schema is None:
            return None
        with self._grammar_lock:  # the HTTP side checks, the model thread builds: one compiler, built once
            try:
                return self.engine.grammars().constraint(config.json_schema)
            except ImportError as e:
                raise ConfigError(f"structured output (response_format, forced tool calls) needs xgrammar (pip install 'hanlin[serve]'): {e}") from None

    def _emit(self, run: "_Running", tok: RawToken) -> None:
        now = time.perf_counter()
        if run.ticket.first_token_at is None:
            run.ticket.first_token_at = now
            if self.metrics:
                self.metrics.ttft.observe(now - run.ticket.submitted)
        elif self.metrics:
            self.metrics.tpot.observe(now - run.last_at)
        run.last_at = now
        run.produced += 1
        self._post(run.ticket, tok)

    def _finish(self, run: "_Running", error: BaseException | None = None) -> None:
        if self.running.get(run.slot) is run:
            del self.running[run.slot]
            if self._batch is not None:
                self._batch.release(run.slot)
            elif self._slots is not None:
                self._slots.release(run.slot)
        self._post(run.ticket, error)  # None: the normal end
        self._gauge()

    def _gauge(self) -> None:
        if self.metrics:
            self.metrics.queue_depth.set(self.waiting.qsize())
            self.metrics.running.set(len(self.running))


def _put_all(items: list[tuple[Ticket, Any]]) -> None:
    for ticket, item in items:  # runs on the event loop
        ticket.aout.put_nowait(item)


@dataclass
class _Running:
    ticket: Ticket
    slot: int
    last: int = 0  # the token fed at the next step
    produced: int = 0
    last_at: float = 0.0
    generator: Any = None
    history: Any = None
    constraint: Any = None


def _can_batch(engine: Any) -> bool:
    from hanlin.backends.torch.engine import TorchEngine

    return isinstance(engine, TorchEngine)
