"""Sampling on one row of logits in numpy, for the CPU engines whose runtimes hand back numpy
arrays (ONNX Runtime, OpenVINO). Same chain and order as llama.cpp's sampler and the torch
engine's `generate.sample`: repeat penalty, top-k, top-p, min-p, temperature, then a seeded
draw (argmax at temperature 0), so a setting means the same thing on every engine.

Why numpy and not numba here: a step touches the 49k logits a handful of times in vectorised
calls (argpartition, one softmax over the top-k); there is no Python-level loop to compile.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from hanlin.backends.base import GenerationConfig


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))


def apply_repeat_penalty(logits: np.ndarray, recent: Sequence[int], penalty: float) -> np.ndarray:
    """llama.cpp's repeat penalty: recent tokens' logits divided by the penalty when positive,
    multiplied when negative (each token once, however often it appeared)."""
    if penalty == 1.0 or not len(recent):
        return logits
    out = logits.copy()
    ids = np.unique(np.asarray(recent, dtype=np.int64))
    seen = out[ids]
    out[ids] = np.where(seen > 0, seen / penalty, seen * penalty)
    return out


class Sampler:
    """One generation's sampler: the config, a seeded generator and the penalty window."""

    def __init__(self, config: GenerationConfig, history: Sequence[int], window: int):
        self.config = config
        self.rng = np.random.default_rng(config.seed)  # seed None: fresh entropy
        self.recent = list(history[-window:]) if window else []
        self.window = window

    def __call__(self, logits: np.ndarray) -> tuple[int, float | None]:
        """(token id, its log-probability under the model when the config asks for logprobs,
        else None: the float64 log-softmax over the whole vocabulary cost ~0.25 ms a token,
        2-3% of a decode step of the default model, for a number nobody read)."""
        cfg = self.config
        x = apply_repeat_penalty(logits.astype(np.float32, copy=False), self.recent, cfg.repeat_penalty)
        tok = int(x.argmax()) if cfg.greedy else self._draw(x)
        if self.window:
            self.recent = (self.recent + [tok])[-self.window :]
        return tok, float(log_softmax(x)[tok]) if cfg.logprobs else None

    def _draw(self, x: np.ndarray) -> int:
        cfg = self.config
        idx = np.arange(x.shape[0])
        if 0 < cfg.top_k < x.shape[0]:
            idx = np.argpartition(-x, cfg.top_k - 1)[: cfg.top_k]
        vals = x[idx].astype(np.float64)
        order = np.argsort(-vals, kind="stable")  # descending, ties by position: deterministic
        idx, vals = idx[order], vals[order]
        if cfg.top_p < 1.0:
            p = np.exp(vals - vals[0])
            p /= p.sum()
            keep = (np.cumsum(p) - p) <= cfg.top_p  # the smallest prefix reaching top_p
            idx, vals = idx[keep], vals[keep]
        if cfg.min_p > 0.0:
            p = np.exp(vals - vals[0])  # relative to the most likely: p_i / p_max
            keep = p >= cfg.min_p
            idx, vals = idx[keep], vals[keep]
        z = vals / cfg.temperature
        p = np.exp(z - z.max())
        p /= p.sum()
        return int(idx[self.rng.choice(len(idx), p=p)])
