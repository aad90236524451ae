"""Chat templates, rendered once, by hanlin, from the model's own Jinja template.

Every engine receives token ids that come from this one rendering, so the GGUF engine, the
native torch engine and the ONNX engine see the same prompt for the same messages. The
environment mirrors what Hugging Face's `apply_chat_template` gives a template (sandboxed,
trim_blocks/lstrip_blocks, `raise_exception`, `tojson`, `strftime_now`), because model
authors write their templates against that environment.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Any, Mapping, Sequence

from hanlin.backends.base import ConfigError, ModelError
from hanlin.backends.hf_meta import load_folder_template  # noqa: F401  (re-exported)

ROLES = ("system", "user", "assistant", "tool")

# Used only when a model carries no template of its own: ChatML, which most small chat
# models (SmolLM2, Qwen2, InternLM2) use anyway. hanlin says when it falls back.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class TemplateError(ConfigError):
    """The template raised (e.g. the model does not support a system role)."""


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Check a chat history and return it as a list of plain dicts; say exactly what is wrong."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ConfigError("messages must be a list of {'role': ..., 'content': ...} dicts")
    if not messages:
        raise ConfigError("messages is empty: give at least one {'role': 'user', 'content': ...}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ConfigError(f"messages[{i}] is a {type(m).__name__}, expected a dict with 'role' and 'content'")
        role = m.get("role")
        if role not in ROLES:
            raise ConfigError(f"messages[{i}]['role'] is {role!r}; expected one of {', '.join(ROLES)}")
        content = m.get("content")
        if content is None and not m.get("tool_calls"):
            raise ConfigError(f"messages[{i}] has no 'content'")
        if content is not None and not isinstance(content, str):
            raise ConfigError(f"messages[{i}]['content'] is a {type(content).__name__}; expected a string")
        out.append(dict(m))
    return out


def _raise_exception(message: str) -> None:
    raise TemplateError(f"the model's chat template refused these messages: {message}")


def _tojson(value: Any, indent: int | None = None, separators=None, sort_keys: bool = False, ensure_ascii: bool = False) -> str:
    return json.dumps(value, indent=indent, separators=separators, sort_keys=sort_keys, ensure_ascii=ensure_ascii)


@functools.lru_cache(maxsize=16)
def _compile(template: str):
    from jinja2 import TemplateSyntaxError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except TemplateSyntaxError as e:
        raise ModelError(f"the model's chat template is not valid Jinja (line {e.lineno}): {e.message}") from None


def render(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    bos_token: str | None = None,
    eos_token: str | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
    **extra: Any,
) -> str:
    """Render messages with a model's chat template into the prompt text."""
    msgs = validate_messages(messages)
    ctx: dict[str, Any] = dict(
        messages=msgs,
        add_generation_prompt=add_generation_prompt,
        bos_token=bos_token or "",
        eos_token=eos_token or "",
        **extra,
    )
    if tools is not None:
        ctx["tools"] = list(tools)
    return _compile(template).render(**ctx)
