"""Metadata of a Hugging Face model folder that every engine reading such folders needs
(the chat template and special tokens), without importing any vendor library."""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

from hanlin.backends.base import ModelError


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def load_folder_template(folder: str) -> tuple[str | None, str | None, str | None]:
    """(chat template, bos token, eos token) of a Hugging Face model folder.

    The template is read from chat_template.jinja (where transformers 4.43+ saves it) or from
    tokenizer_config.json's "chat_template" (a string, or a list of named templates of which
    "default" is used). Missing pieces are None.
    """
    cfg: dict[str, Any] = {}
    cfg_path = os.path.join(folder, "tokenizer_config.json")
    if os.path.isfile(cfg_path):
        try:
            with open(cfg_path, encoding="utf-8") as f:
                cfg = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ModelError(f"{cfg_path} is not valid JSON: {e}") from None
    template = None
    jinja_path = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            template = f.read()
    else:
        t = cfg.get("chat_template")
        if isinstance(t, list):
            named = {d.get("name"): d.get("template") for d in t if isinstance(d, Mapping)}
            t = named.get("default") or next(iter(named.values()), None)
        template = t if isinstance(t, str) else None
    return template, _token_text(cfg.get("bos_token")), _token_text(cfg.get("eos_token"))
