"""What the harness asks of a model, for a loaded hanlin engine and for an OpenAI-compatible URL.

    loglikelihood([(context, continuation), ...]) -> [(sum log p, greedy?), ...]
    generate([prompt, ...], max_tokens, stop) -> [text, ...]          greedy
    perplexity(text, ctx, limit) -> PerplexityResult

Both take text: the harness never sees token ids, so an engine and a server are evaluated by
the same code. Tokenization follows lm-evaluation-harness (`_encode_pair`): trailing spaces
of the context move to the continuation, the pair is encoded whole and the continuation is
what follows the context's own tokens, so both harnesses score the same token ids.

Batching: multiple-choice questions whose choices are one token each (CMMLU's " A".." D") are
scored with one pass over the context, reading every choice's log-prob at its last position
(lm-eval's logits cache does the same), and the native engine runs several contexts in one
right-padded forward. Greedy generation on the native engine decodes a batch of prompts
together, each row stopping at EOS or at one of its stop strings.
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request
from typing import Any, Sequence

from hanlin.backends.base import GenerationConfig, HanlinError, loglikelihood as _ll, perplexity as _ppl

GREEDY = dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0, seed=0)


class NoLogLikelihood(HanlinError):
    """The model can generate but cannot score a continuation's log-likelihood."""


class EngineModel:
    """A hanlin LLM (any engine) behind the harness's three requests."""

    def __init__(self, llm: Any, *, chat_template: bool = False, batch_size: int = 8):
        self.llm = llm
        self.engine = llm.engine
        self.chat_template = chat_template
        self.batch_size = max(1, batch_size)
        self.name = llm.name
        self.identity = {"model": llm.model.path if hasattr(llm.model, "path") else llm.name, "engine": self.engine.name,
                         "device": llm.device.spec(), "chat_template": chat_template,
                         "dtype": str(getattr(self.engine, "dtype", ""))}  # fmt: skip

    @property
    def context_length(self) -> int:
        return self.engine.context_length

    # ---- text -> ids -------------------------------------------------------------------

    def prompt_text(self, prompt: str) -> str:
        """The text the model is given for a prompt: as is, or inside the chat template as one
        user message with the assistant's turn opened."""
        if not self.chat_template:
            return prompt
        return self.llm.render([{"role": "user", "content": prompt}])

    def encode(self, text: str, *, bos: bool = True) -> list[int]:
        ids = self.engine.tokenize(text, add_bos=False, special=self.chat_template)
        b = self.engine.bos_token_id
        if bos and self.engine.add_bos and b is not None and (not ids or ids[0] != b):
            ids = [b] + ids
        return ids

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        return ctx, whole[len(ctx) :]

    # ---- requests ----------------------------------------------------------------------

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        if not hasattr(self.engine, "score_tokens"):
            raise NoLogLikelihood(f"engine {self.engine.name} cannot score log-likelihoods: use a generation-mode task (e.g. cmmlu_gen)")
        pairs = [self.encode_pair(self.prompt_text(c), x) for c, x in requests]
        out: list[tuple[float, bool] | None] = [None] * len(pairs)
        # one-token continuations: group by context, one pass per context
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (ctx, cont) in enumerate(pairs):
            if len(cont) == 1 and 0 < len(ctx) < self.context_length:
                groups.setdefault(tuple(ctx), []).append(i)
            else:
                out[i] = _ll(self.engine, ctx, cont) if cont else (0.0, True)
        contexts = list(groups)
        # an engine that shares prefixes gets every context at once (more questions per
        # few-shot prefix); the others get batch_size contexts per forward
        step = len(contexts) if getattr(self.engine, "shares_prefixes", False) else self.batch_size
        for start in range(0, len(contexts), max(1, step)):
            chunk = contexts[start : start + max(1, step)]
            for ctx, lps in zip(chunk, self._next_logprobs([list(c) for c in chunk])):
                best = int(lps.argmax())
                for i in groups[ctx]:
                    tok = pairs[i][1][0]
                    out[i] = (float(lps[tok]), tok == best)
        return out  # type: ignore[return-value]

    def _next_logprobs(self, contexts: list[list[int]]) -> list[Any]:
        """log-softmax of the next-token logits after each context (numpy rows)."""
        import numpy as np

        eng = self.engine
        if hasattr(eng, "next_logprobs"):
            return eng.next_logprobs(contexts)
        if not hasattr(eng, "logits"):
            raise NoLogLikelihood(f"engine {eng.name} has neither next_logprobs nor logits: use a generation-mode task (e.g. cmmlu_gen)")
        rows = [np.asarray(eng.logits(c)[-1], dtype=np.float64) for c in contexts]  # (T, V) per context; the last row is next
        out = []
        for r in rows:
            m = r.max()
            out.append(r - (m + np.log(np.exp(r - m).sum())))
        return out

    def generate(self, prompts: Sequence[str], *, max_tokens: int, stop: Sequence[str] = ()) -> list[str]:
        config = GenerationConfig(max_tokens=max_tokens, stop=tuple(stop), **GREEDY)
        ids = [self.encode(self.prompt_text(p)) for p in prompts]
        room = self.context_length - max_tokens
        ids = [x[-room:] if len(x) > room else x for x in ids]  # keep the question, drop the oldest shots
        if hasattr(self.engine, "generate_text_batch") and len(ids) > 1:
            return self.engine.generate_text_batch(ids, config, max_batch=self.batch_size)
        return [self.llm.generate_ids(x, config=config).text for x in ids]

    def perplexity(self, text: str, ctx: int, limit: int | None = None):
        ids = self.engine.tokenize(text, add_bos=False, special=False)
        if limit:
            ids = ids[: limit * ctx]
        bos = self.engine.bos_token_id if self.engine.add_bos else None
        return _ppl(self.engine, ids, ctx, bos=bos)

    def token_count(self, text: str) -> int:
        return len(self.engine.tokenize(text, add_bos=False, special=False))

    def close(self) -> None:
        self.llm.close()


class OpenAIModel:
    """An OpenAI-compatible server (`hanlin serve`, vLLM, llama.cpp's server...) by URL.

    Generation goes through /v1/completions (raw text) or /v1/chat/completions (with
    --chat-template on, the server applies its template). Chat servers give no log-likelihood
    of a given continuation, so log-likelihood tasks are refused with the generation-mode
    alternative named."""

    def __init__(self, url: str, *, model: str | None = None, api_key: str | None = None, chat_template: bool = False,
                 timeout: float = 600, context_length: int = 2048):  # fmt: skip
        self.base = url.rstrip("/")
        if not self.base.endswith("/v1"):
            self.base += "/v1"
        self.api_key = api_key
        self.timeout = timeout
        self.chat_template = chat_template
        self.model = model or self._first_model()
        self.name = self.model
        self.context_length = context_length
        self.identity = {"model": self.model, "engine": "openai", "url": self.base, "chat_template": chat_template}

    def _call(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        req = urllib.request.Request(self.base + path, data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json"})  # fmt: skip
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            detail = e.read().decode("utf-8", "replace")[:300]
            raise HanlinError(f"{self.base}{path} answered {e.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as e:
            raise HanlinError(f"cannot reach {self.base}{path}: {getattr(e, 'reason', e)}") from None

    def _first_model(self) -> str:
        data = self._call("/models").get("data") or []
        if not data:
            raise HanlinError(f"{self.base}/models lists no model: pass --model-name")
        return data[0]["id"]

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        raise NoLogLikelihood(f"{self.base} is an OpenAI-compatible server, which scores no log-likelihoods: "
                              "use a generation-mode task (e.g. cmmlu_gen instead of cmmlu)")  # fmt: skip

    def generate(self, prompts: Sequence[str], *, max_tokens: int, stop: Sequence[str] = ()) -> list[str]:
        out = []
        stop = list(stop)[:4]  # OpenAI's limit
        for p in prompts:
            body = {"model": self.model, "max_tokens": max_tokens, "temperature": 0, "seed": 0, **({"stop": stop} if stop else {})}
            if self.chat_template:
                r = self._call("/chat/completions", {**body, "messages": [{"role": "user", "content": p}]})
                out.append(r["choices"][0]["message"].get("content") or "")
            else:
                r = self._call("/completions", {**body, "prompt": p})
                out.append(r["choices"][0]["text"])
        return out

    def perplexity(self, text: str, ctx: int, limit: int | None = None):
        raise NoLogLikelihood(f"{self.base} is an OpenAI-compatible server, which gives no token log-probabilities of a given text: perplexity needs an engine")

    def token_count(self, text: str) -> int:
        return math.ceil(len(text.encode("utf-8")) / 4)  # no tokenizer endpoint: bytes / 4, only to size needles

    def close(self) -> None:
        pass
