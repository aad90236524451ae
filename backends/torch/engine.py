"""TorchEngine: the native Transformer behind the Engine protocol.

Tokenizers (backends/tokenizer.py, shared with the CPU engines): llama.cpp's own for a GGUF
file, tokenizer.json through `tokenizers` for a Hugging Face folder.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar, Iterator, Sequence

from hanlin.backends.base import (
    Capabilities,
    ConfigError,
    GenerationConfig,
    RawToken,
    TokenEvent,
    TokenizerMethods,
    TokenScores,
    check_load_options,
    check_prompt_fits,
    check_scorable,
    register,
    stream_tokens,
)
from hanlin.backends.hugepages import HugePages
from hanlin.backends.tokenizer import HFTokenizer, LlamaCppTokenizer
from hanlin.devices import Device
from hanlin.devices.tools import installed

DEFAULT_MAX_CTX = 4096
DTYPES = ("auto", "float32", "bfloat16", "float16")


_has = installed


@register
class TorchEngine(TokenizerMethods):
    name: ClassVar[str] = "torch"
    capabilities: ClassVar[Capabilities] = Capabilities(
        formats=frozenset({"hf", "gguf", "run"}),  # run: a hanlin finetune run directory
        device_kinds=frozenset({"cpu", "cuda", "npu", "mps"}),
        batching=True,
        trainable=True,
        priority=50,  # for a .gguf, llama.cpp (priority 100) is preferred; for HF folders this one
    )

    @classmethod
    def available(cls, device: Device) -> str | None:
        if not _has("torch"):
            return "torch not installed (pip install -c constraints.txt 'hanlin[torch]')"
        if device.kind == "npu" and not _has("torch_npu"):
            return "torch_npu not installed (pip install 'hanlin[ascend]' on a machine with Ascend CANN)"
        return None

    @classmethod
    def supports(cls, path: str) -> str | None:
        """None when this engine can build the model at path, else why not."""
        from hanlin.backends.torch.archs import why_not_native
        from hanlin.backends.torch.lora import is_run_dir, run_base

        if is_run_dir(path):  # a fine-tuning run: native when its base is
            base = run_base(path)
            return why_not_native(base) if base and os.path.isdir(base) else None
        if os.path.isdir(path):
            return why_not_native(path)
        return None

    @classmethod
    def load(cls, path: str, device: Device, *, ctx_size: int | None = None, dtype: str = "auto", compile: bool = False,
             huge_pages: bool = True, **_: Any) -> "TorchEngine":  # fmt: skip
        from hanlin.backends.hugepages import huge_pages as on_huge_pages

        # on the CPU, the weights (packed at __init__) on 2 MiB pages: see backends/hugepages.py
        with on_huge_pages(huge_pages and device.kind == "cpu") as pages:
            model, tok, meta = load_parts(path, device, _pick_dtype(dtype, device))
            ctx_size, _ = check_load_options(ctx_size, None, trained=model.config.max_seq_len, default_max=DEFAULT_MAX_CTX, device=device)
            engine = cls(model, tok, meta, path, device, ctx_size, compile=compile)
        engine.huge_pages = pages
        return engine

    def __init__(self, model: Any, tokenizer: Any, meta: dict[str, Any], path: str, device: Device, ctx_size: int, *, compile: bool = False):
        from hanlin.backends.torch.generate import CompiledDecode, KVCache

        self.model = model
        self.tok = tokenizer
        self._meta = meta
        self.model_path = path
        self.device = device
        self.context_length = ctx_size
        cfg = model.config
        eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, list) else [cfg.eos_token_id]
        self.eos_token_ids = frozenset(int(e) for e in eos if e is not None) | tokenizer.eos_ids
        self.bos_token_id = cfg.bos_token_id
        self.add_bos = tokenizer.add_bos
        param = next(model.parameters())
        self.dtype = param.dtype
        self._cache = KVCache(model, 1, ctx_size, param.dtype, param.device)
        self._step = CompiledDecode(model, self._cache) if compile else None
        self.packed_linears = 0
        self.huge_pages = HugePages(reason="not asked for")  # load() fills it in
        self._grammars = None
        if not compile and param.device.type == "cpu":
            from hanlin.backends.torch.cpu_pack import pack_linears

            self.packed_linears = pack_linears(model)  # oneDNN-packed weights: 2-3x faster linears, see cpu_pack.py

    def metadata(self) -> dict[str, Any]:
        pages = self.huge_pages.as_dict() if self.device.kind == "cpu" else {}
        return dict(self._meta, architecture=self.model.config.arch, context_length=self.model.config.max_seq_len, **pages)

    def generate(self, prompt_ids: Sequence[int], config: GenerationConfig) -> Iterator[TokenEvent]:
        from hanlin.backends.torch.generate import generate_one

        constraint = self.grammars().constraint(config.json_schema) if config.json_schema else None

        def sample_raw(ids: list[int], max_new: int) -> Iterator[RawToken]:
            for s in generate_one(self.model, self._cache, ids, config, max_new, self._step, constraint):
                yield RawToken(s.token_id, s.logprob)
                if constraint is not None and constraint.is_done:
                    yield RawToken(min(self.eos_token_ids), 0.0)  # the JSON is complete: end as at EOS
                    return

        return stream_tokens(self, prompt_ids, config, sample_raw)

    def grammars(self) -> Any:
        """The engine's JSON-schema compiler (built on first use: it reads the whole vocabulary)."""
        if self._grammars is None:
            from hanlin.backends.torch.constrain import GrammarCompiler

            self._grammars = GrammarCompiler(self)
        return self._grammars

    def generate_batch(self, prompts: Sequence[Sequence[int]], config: GenerationConfig, *, eos: bool = True) -> list[list[int]]:
        """Several prompts decoded together (token ids out, each ending at EOS or max_tokens;
        eos=False decodes exactly max_tokens each, for throughput measurements)."""
        from hanlin.backends.torch.generate import generate_batch

        longest = max(len(p) for p in prompts)
        check_prompt_fits(longest, self.context_length, config)
        max_new = min(config.max_tokens or self.context_length, self.context_length - longest)
        return generate_batch(self.model, prompts, config, max_new, self.eos_token_ids if eos else frozenset())

    def generate_text_batch(self, prompts: Sequence[Sequence[int]], config: GenerationConfig, *, max_batch: int = 8) -> list[str]:
        """Text for many prompts by continuous batching (the evaluation harness's generate
        requests): up to max_batch sequences decode together and a finished one hands its
        slot to the next prompt at once, so one long answer does not hold the others back. A
        prefix all prompts share (the few-shot examples) is run once and copied into each
        slot. Each answer ends at EOS, max_tokens or its first stop string, and is cut there as
        apply_stops would cut it."""
        import torch

        from hanlin.backends.torch.batching import Prefix, SlotBatch
        from hanlin.backends.torch.generate import make_generator, sample, shared_prefix

        prompts = [list(p) for p in prompts]
        longest = max(len(p) for p in prompts)
        check_prompt_fits(longest, self.context_length, config)
        max_new = min(config.max_tokens or self.context_length, self.context_length - longest)
        P = shared_prefix(prompts) if len(prompts) > 1 else 0
        stops, eos = config.stop, self.eos_token_ids
        gen = make_generator(config.seed, next(self.model.parameters()).device)
        with torch.inference_mode():
            prefix = Prefix(self.model, prompts[0][:P]) if P else None
            batch = SlotBatch(self.model, min(max_batch, len(prompts)), longest + max_new)
            out: list[list[int]] = [[] for _ in prompts]
            waiting = list(range(len(prompts)))
            running: dict[int, int] = {}  # slot -> prompt index

            def take(slot: int, logits: Any) -> int | None:
                """Sample the next token of the sequence in slot; None when it has ended."""
                i = running[slot]
                tok = int(sample(logits[None].float(), config, gen)[0][0])
                out[i].append(tok)
                text = self.detokenize(out[i][-64:]) if stops else ""
                if tok in eos or len(out[i]) >= max_new or any(s in text for s in stops):
                    batch.release(slot)
                    del running[slot]
                    return None
                return tok

            feed: dict[int, int] = {}
            while waiting or running:
                free = batch.free_slots()
                if free and waiting:
                    new, waiting = waiting[:free], waiting[free:]
                    admitted = batch.admit_many([prompts[i] for i in new], prefix)
                    for (slot, logits), i in zip(admitted, new):
                        running[slot] = i
                        tok = take(slot, logits)
                        if tok is not None:
                            feed[slot] = tok
                if not running:
                    continue
                # a step runs rows [0, highest busy slot]: every busy slot feeds its last token
                logits = batch.step({slot: feed[slot] for slot in running})
                feed = {}
                for slot, row in logits.items():
                    tok = take(slot, row)
                    if tok is not None:
                        feed[slot] = tok
        texts = []
        for seq in out:
            if seq and seq[-1] in eos:
                seq = seq[:-1]
            text = self.detokenize(seq)
            cuts = [i for i in (text.find(s) for s in stops) if i != -1]
            texts.append(text[: min(cuts)] if cuts else text)
        return texts

    shares_prefixes: ClassVar[bool] = True  # next_logprobs runs a prefix shared by many contexts once

    def next_logprobs(self, contexts: Sequence[Sequence[int]]) -> list[Any]:
        """float64 numpy (V,) per context: log p(next token | context).

        Contexts that share a long prefix (a few-shot prompt: CMMLU's five examples are ~80% of
        every question of a subject) have the prefix run once into a KV cache, and only their
        own suffixes run, together, after it; the rest run in one right-padded forward (causal
        attention never looks at the padding after a row's end)."""
        from hanlin.backends.torch.generate import PREFIX_MIN, common_prefix

        for c in contexts:
            check_scorable(len(c), self.context_length)
        if not contexts:
            return []
        order = sorted(range(len(contexts)), key=lambda i: list(contexts[i]))  # shared prefixes end up adjacent
        out: list[Any] = [None] * len(contexts)
        group = [order[0]]
        for i in order[1:] + [None]:
            if i is not None and common_prefix(contexts[group[0]], contexts[i]) >= PREFIX_MIN:
                group.append(i)
                continue
            for g, r in zip(group, self._next_logprobs_group([list(contexts[g]) for g in group])):
                out[g] = r
            group = [i]
        return out

    def _next_logprobs_group(self, contexts: list[list[int]]) -> list[Any]:
        """One group: its shared prefix (if long enough) run once, then every context's own
        tokens in one right-padded pass: SlotBatch.admit_many's prefill, whose logits at each
        row's last token are the next-token logits."""
        import torch

        from hanlin.backends.torch.batching import Prefix, SlotBatch
        from hanlin.backends.torch.generate import shared_prefix

        P = shared_prefix(contexts) if len(contexts) > 1 else 0
        with torch.inference_mode():
            prefix = Prefix(self.model, contexts[0][:P]) if P else None
            admitted = SlotBatch(self.model, len(contexts), max(len(c) for c in contexts) + 1).admit_many(contexts, prefix)
            logits = torch.stack([row for _, row in admitted])  # (B, V), in order
            return list(torch.log_softmax(logits.double(), dim=-1).cpu().numpy())

    def score_tokens(self, ids: Sequence[int]) -> TokenScores:
        import torch

        ids = list(ids)
        check_scorable(len(ids), self.context_length)
        device = next(self.model.parameters()).device
        with torch.inference_mode():
            logits = self.model(torch.tensor([ids], device=device))[0, :-1]  # (T-1, V)
            lps = torch.log_softmax(logits.double(), dim=-1)
            target = torch.tensor(ids[1:], device=device)
            chosen = lps.gather(1, target[:, None])[:, 0]
            return TokenScores(chosen.tolist(), logits.argmax(dim=-1).tolist())

    def logits(self, ids: Sequence[int]) -> Any:
        """float32 numpy (len(ids), V): the raw logits at every position of one causal pass
        (what the quantization report compares variants on). The forward runs without the KV
        cache, so a generation in progress is left as it was."""
        import torch

        ids = list(ids)
        check_scorable(len(ids), self.context_length)
        device = next(self.model.parameters()).device
        with torch.inference_mode():
            out = self.model(torch.tensor([ids], device=device))[0]  # (T, V)
            return out.float().cpu().numpy()

    def reset(self) -> None:
        self._cache.tokens = []

    def close(self) -> None:
        self.model = None
        self._cache = None


def as_torch_device(device: Device) -> Any:
    """The torch.device a hanlin Device names ("cpu", "cuda:0", "npu:3", "mps"); for an NPU,
    torch_npu is imported first: it registers the "npu" device type with torch."""
    import torch

    if device.kind == "npu":
        import torch_npu  # noqa: F401
    return torch.device(device.spec())


def load_parts(path: str, device: Device, dtype: Any) -> tuple[Any, Any, dict[str, Any]]:
    """The native model (torch dtype `dtype`, on `device`), its tokenizer and its chat-template
    metadata from a GGUF file or an HF folder: what the engine serves and the fine-tuner trains."""
    from hanlin.backends.torch import weights

    torch_device = as_torch_device(device)
    from hanlin.backends.torch.lora import is_run_dir, load_run

    if is_run_dir(path):  # a fine-tuning run: its base with the adapter merged
        return load_run(path, device, dtype)
    if os.path.isdir(path):
        from hanlin.backends.hf_meta import load_folder_template

        model = weights.load_hf_folder(path, dtype=dtype, device=torch_device)
        template, bos, eos = load_folder_template(path)
        return model, HFTokenizer(path), {"chat_template": template, "bos_token": bos, "eos_token": eos, "name": os.path.basename(path.rstrip("/"))}
    from hanlin.backends.gguf.gguf_file import validate_gguf

    info = validate_gguf(path)
    model = weights.load_gguf(path, dtype=dtype, device=torch_device)
    tok = LlamaCppTokenizer(path)
    meta = {"chat_template": info.chat_template, "bos_token": tok.special_text(info.bos_token_id),
            "eos_token": tok.special_text(info.eos_token_id), "name": info.name}  # fmt: skip
    return model, tok, meta


def _pick_dtype(name: str, device: Device):
    import torch

    if name not in DTYPES:
        raise ConfigError(f"dtype={name!r} is invalid: use one of {', '.join(DTYPES)}")
    if name == "auto":
        # float32 on CPUs (exact, and bf16 matmuls are slow without AMX); bf16 where the
        # accelerator has it, else float16
        if device.kind == "cpu":
            return torch.float32
        return torch.bfloat16 if "bfloat16" in device.dtypes else torch.float16
    if name not in device.dtypes:
        raise ConfigError(f"dtype={name} is not supported on {device.label()} (it supports {', '.join(device.dtypes)})")
    return getattr(torch, name)

