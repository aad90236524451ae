"""Chat templates: hanlin's renderer against transformers' on a saved HF folder, the
template environment, and message validation."""

from __future__ import annotations

import json
import os

import pytest

from hanlin.backends.base import ConfigError, ModelError
from hanlin.chat_template import CHATML_TEMPLATE, TemplateError, load_folder_template, render, validate_messages

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi 你好"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Bye"},
]


def test_folder_template_renders_like_transformers(tmp_path, default_model_path):
    transformers = pytest.importorskip("transformers")
    folder, name = os.path.split(default_model_path)
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tok.save_pretrained(tmp_path)
    template, bos, eos = load_folder_template(str(tmp_path))
    assert template and eos == "<|im_end|>"
    for gen in (True, False):
        want = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=gen)
        assert render(template, MESSAGES, add_generation_prompt=gen, bos_token=bos, eos_token=eos) == want


def test_tokenizer_config_forms(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}],
        "bos_token": {"content": "<s>", "lstrip": False}, "eos_token": "</s>",
    }))  # fmt: skip
    assert load_folder_template(str(tmp_path)) == ("D", "<s>", "</s>")
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ModelError, match="is not valid JSON"):
        load_folder_template(str(tmp_path))
    assert load_folder_template(str(tmp_path / "missing")) == (None, None, None)


def test_template_environment_matches_hf_conventions():
    t = "{{ bos_token }}{% for m in messages %}{{ m['content'] | tojson }}{% endfor %}{{ strftime_now('%Y') | length }}"
    assert render(t, [{"role": "user", "content": "é\"x"}], bos_token="<s>") == '<s>"é\\"x"4'
    guard = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}ok"
    with pytest.raises(TemplateError, match="refused these messages: System role not supported"):
        render(guard, MESSAGES)
    with pytest.raises(ModelError, match="not valid Jinja"):
        render("{% for %}", MESSAGES)


def test_sandbox_blocks_attribute_escapes():
    from jinja2.exceptions import SecurityError

    with pytest.raises(SecurityError):
        render("{{ messages.__class__.__mro__ }}{{ ''.__class__.__subclasses__() }}", MESSAGES)


def test_chatml_fallback():
    assert render(CHATML_TEMPLATE, MESSAGES[1:2]) == "<|im_start|>user\nHi 你好<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize(
    "messages,needle",
    [
        ("hello", "messages must be a list"),
        ([], "messages is empty"),
        (["hi"], "messages[0] is a str"),
        ([{"role": "robot", "content": "x"}], "messages[0]['role'] is 'robot'"),
        ([{"role": "user"}], "messages[0] has no 'content'"),
        ([{"role": "user", "content": 5}], "messages[0]['content'] is a int"),
    ],
)
def test_bad_messages(messages, needle):
    with pytest.raises(ConfigError) as e:
        validate_messages(messages)
    assert needle in str(e.value)
