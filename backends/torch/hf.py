"""HFEngine: transformers as the fallback for architectures the native model does not build.

Same Engine protocol as the others: token events with logprobs, the shared sampler from
generate.py and the shared stop handling, and the score API. It streams by running the
model one step at a time with transformers' own KV cache (past_key_values). Remote code
is never trusted: an architecture transformers does not know is refused with its name.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar, Iterator, Sequence

from hanlin.backends.base import (
    Capabilities,
    ConfigError,
    GenerationConfig,
    ModelError,
    RawToken,
    TokenEvent,
    TokenScores,
    check_scorable,
    register,
    stream_tokens,
)
from hanlin.devices import Device
from hanlin.devices.tools import installed


def _auto_config(path: str) -> Any:
    """transformers' config for an HF folder; remote code is never trusted."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=False)
    except ValueError as e:
        raise ModelError(f"{path}: transformers does not know this architecture without remote code: {e}") from None


@register
class HFEngine:
    name: ClassVar[str] = "hf"
    capabilities: ClassVar[Capabilities] = Capabilities(
        formats=frozenset({"hf", "run"}),  # run: a hanlin finetune run of an architecture only transformers builds
        device_kinds=frozenset({"cpu", "cuda", "npu", "mps"}),
        trainable=True,
        priority=10,  # the fallback: the native engine goes first where it can
    )

    @classmethod
    def available(cls, device: Device) -> str | None:
        for mod, extra in (("torch", "torch"), ("transformers", "dev")):
            if not installed(mod):
                return f"{mod} not installed (pip install -c constraints.txt 'hanlin[{extra}]')"
        return None

    @classmethod
    def load(cls, path: str, device: Device, *, ctx_size: int | None = None, dtype: str = "auto", **_: Any) -> "HFEngine":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from hanlin.backends.hf_meta import load_folder_template
        from hanlin.backends.torch.engine import _pick_dtype
        from hanlin.backends.torch.lora import ADAPTER_DIR, MODEL_DIR, is_run_dir, merge_lora, read_run

        run_dir, tuned, adapter = None, None, None
        if is_run_dir(path):  # a fine-tuning run: its base, with the adapter merged or the tuned weights
            run = read_run(path)
            run_dir, path = path, run["base_model"]
            if run["method"] == "full":
                tuned = os.path.join(run_dir, MODEL_DIR)
            else:
                adapter = os.path.join(run_dir, ADAPTER_DIR)
        cfg = _auto_config(path)
        tdtype = _pick_dtype(dtype, device)
        model = AutoModelForCausalLM.from_pretrained(tuned or path, config=None if tuned else cfg, dtype=tdtype, trust_remote_code=False)
        if adapter:
            merge_lora(model, adapter)  # W += (alpha / r) B A: the adapter's keys are this model's module names
        model.to(device.spec() if device.kind != "cpu" else "cpu").eval()
        tok = AutoTokenizer.from_pretrained(path)
        trained = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 2048
        if ctx_size is None:
            ctx_size = min(trained, 4096)
        elif ctx_size < 16 or ctx_size > trained:
            raise ConfigError(f"ctx_size={ctx_size} is invalid: it must be between 16 and the model's {trained} tokens")
        template, bos, eos = load_folder_template(path)
        meta = {"chat_template": template or getattr(tok, "chat_template", None), "bos_token": bos or tok.bos_token,
                "eos_token": eos or tok.eos_token, "name": os.path.basename(path.rstrip("/")),
                "architecture": (cfg.architectures or [cfg.model_type])[0], "context_length": trained}  # fmt: skip
        return cls(model, tok, meta, path, device, ctx_size)

    def __init__(self, model: Any, tok: Any, meta: dict[str, Any], path: str, device: Device, ctx_size: int):
        self.model, self.tok, self._meta = model, tok, meta
        self.model_path, self.device, self.context_length = path, device, ctx_size
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        eos = eos if isinstance(eos, list) else [eos]
        self.eos_token_ids = frozenset(int(e) for e in eos + [tok.eos_token_id] if e is not None)
        self.bos_token_id = tok.bos_token_id
        self.add_bos = bool(getattr(tok, "add_bos_token", False))
        self._bytes: dict[int, bytes] = {}
        self._exact = None
        if os.path.isfile(os.path.join(path, "tokenizer.json")):
            from hanlin.backends.tokenizer import HFTokenizer

            self._exact = HFTokenizer(path)  # exact bytes per token (byte-level BPE pieces)

    def metadata(self) -> dict[str, Any]:
        return dict(self._meta)

    def tokenize(self, text: str, *, add_bos: bool = False, special: bool = True) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_bos)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def token_bytes(self, token_id: int) -> bytes:
        if self._exact is not None:
            return self._exact.token_bytes(token_id)
        b = self._bytes.get(token_id)
        if b is None:
            special = token_id in self.tok.all_special_ids
            b = b"" if special else self.tok.decode([token_id], clean_up_tokenization_spaces=False).encode("utf-8")
            self._bytes[token_id] = b
        return b

    def generate(self, prompt_ids: Sequence[int], config: GenerationConfig) -> Iterator[TokenEvent]:
        return stream_tokens(self, prompt_ids, config, lambda ids, max_new: self._raw(ids, config, max_new))

    def _raw(self, prompt_ids: list[int], config: GenerationConfig, limit: int) -> Iterator[RawToken]:
        import torch

        from hanlin.backends.torch.generate import PENALTY_LAST_N, apply_repeat_penalty, make_generator, sample

        device = self.model.device
        gen = make_generator(config.seed, device)
        history = torch.tensor([prompt_ids[-PENALTY_LAST_N:]], device=device)
        with torch.inference_mode():
            out = self.model(torch.tensor([prompt_ids], device=device), use_cache=True)
            for _ in range(limit):
                logits = out.logits[:, -1].float()
                ids, lps = sample(apply_repeat_penalty(logits, history, config.repeat_penalty), config, gen)
                yield RawToken(int(ids[0]), float(lps[0]))
                history = torch.cat([history, ids[:, None]], dim=1)[:, -PENALTY_LAST_N:]
                out = self.model(ids[:, None], past_key_values=out.past_key_values, use_cache=True)

    def score_tokens(self, ids: Sequence[int]) -> TokenScores:
        import torch

        ids = list(ids)
        check_scorable(len(ids), self.context_length)
        with torch.inference_mode():
            logits = self.model(torch.tensor([ids], device=self.model.device)).logits[0, :-1].double()
            lps = torch.log_softmax(logits, dim=-1)
            target = torch.tensor(ids[1:], device=logits.device)
            return TokenScores(lps.gather(1, target[:, None])[:, 0].tolist(), logits.argmax(-1).tolist())

    def next_logprobs(self, contexts: Sequence[Sequence[int]]) -> list[Any]:
        """float64 numpy (V,) per context: log p(next token | context); several contexts in one
        left-padded forward (attention mask, position ids counted from each row's first real
        token) with logits kept for the last position only (a (B, L, V) tensor would not fit)."""
        import torch

        for c in contexts:
            check_scorable(len(c), self.context_length)
        L = max(len(c) for c in contexts)
        device = self.model.device
        tokens = torch.tensor([[0] * (L - len(c)) + list(c) for c in contexts], device=device)  # (B, L)
        mask = torch.tensor([[0] * (L - len(c)) + [1] * len(c) for c in contexts], device=device)  # (B, L)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, L)
        with torch.inference_mode():
            logits = self.model(tokens, attention_mask=mask, position_ids=positions, logits_to_keep=1).logits[:, -1]  # (B, V)
            return list(torch.log_softmax(logits.double(), dim=-1).cpu().numpy())

    def close(self) -> None:
        self.model = None


# --------------------------------------------------------------------------------------
# fine-tuning an architecture the native model does not build (hanlin.finetune)
# --------------------------------------------------------------------------------------


def _trainable_class():
    import torch

    class HFTrainable(torch.nn.Module):
        """A transformers causal LM behind the native Transformer's training interface:
        forward(ids, positions, mask, hidden_only=True) -> the final hidden states (B, T, C), and
        .lm_head, .config (the shape the planner reads), .gradient_checkpointing. peft's adapters
        go into .hf's own linears, so an adapter's keys are the transformers model's module names.

        Rows are never packed for it (transformers' support for a block-diagonal 4D mask varies by
        architecture): each row is one example, right-padded, and the padding mask is read from
        the positions (0, 1, ..., n-1 for the real tokens, 0 for the padding after them)."""

        def __init__(self, hf: Any, config: Any):
            super().__init__()
            self.hf = hf
            self.config = config
            self._checkpointing = False

        @property
        def lm_head(self):
            return self.hf.get_output_embeddings()

        @property
        def gradient_checkpointing(self) -> bool:
            return self._checkpointing

        @gradient_checkpointing.setter
        def gradient_checkpointing(self, on: bool) -> None:
            if bool(on) != self._checkpointing:
                if on:
                    self.hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                else:
                    self.hf.gradient_checkpointing_disable()
            self._checkpointing = bool(on)

        def forward(self, ids, positions=None, mask=None, hidden_only: bool = True):
            if not hidden_only:
                raise ValueError("HFTrainable returns hidden states only (the trainer applies lm_head itself)")
            real = torch.ones_like(ids, dtype=torch.bool)
            if positions is not None:
                real[:, 1:] = positions[:, 1:] > 0  # (B, T): unpacked rows, padding after the real tokens
            out = self.hf.get_decoder()(input_ids=ids, attention_mask=real.long(), position_ids=positions, use_cache=False)
            return out.last_hidden_state  # (B, T, C)

    return HFTrainable


def load_trainable(path: str, device: Device, dtype: Any) -> tuple[Any, Any, dict[str, Any]]:
    """(model, tokenizer, meta) for fine-tuning an HF folder with transformers: the model is an
    HFTrainable, the tokenizer the same tokenizer.json reader the native engine uses."""
    import json

    from transformers import AutoModelForCausalLM

    from hanlin.backends.hf_meta import load_folder_template
    from hanlin.backends.tokenizer import HFTokenizer
    from hanlin.backends.torch.weights import config_from_hf

    cfg = _auto_config(path)
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        raw = json.load(f)
    try:  # the shape the planner reads: the decoder fields every llama-like config has
        shape_cfg = config_from_hf(dict(raw, architectures=[], model_type="llama"))
    except KeyError as e:
        raise ModelError(f"{path}: config.json has no {e.args[0]!r}: the memory planner needs a decoder's "
                         "hidden_size, num_hidden_layers, num_attention_heads, intermediate_size and vocab_size") from None  # fmt: skip
    hf = AutoModelForCausalLM.from_pretrained(path, config=cfg, dtype=dtype, trust_remote_code=False)
    hf.to(device.spec() if device.kind != "cpu" else "cpu")
    template, bos, eos = load_folder_template(path)
    meta = {"chat_template": template, "bos_token": bos, "eos_token": eos, "name": os.path.basename(path.rstrip("/")),
            "architecture": (cfg.architectures or [cfg.model_type])[0]}  # fmt: skip
    return _trainable_class()(hf, shape_cfg), HFTokenizer(path), meta
