"""Structured output by constrained decoding: a JSON Schema is a token mask at every step, so
even the 135M default model returns JSON that validates (torch engine: xgrammar; GGUF
engine: llama.cpp's grammar)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("xgrammar", reason="the serve extra brings xgrammar (part of the dev install)")

import hanlin  # noqa: E402
from hanlin.backends.base import ConfigError  # noqa: E402

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "colour": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"], "additionalProperties": False},
    },
    "required": ["name", "age", "colour", "tags", "address"],
    "additionalProperties": False,
}


def check(value, schema) -> None:
    """A validator for the keywords these tests use (no extra dependency)."""
    if "enum" in schema:
        assert value in schema["enum"], (value, schema["enum"])
        return
    kind = schema["type"]
    if kind == "object":
        assert isinstance(value, dict)
        assert set(schema.get("required", [])) <= set(value)
        if schema.get("additionalProperties") is False:
            assert set(value) <= set(schema["properties"]), set(value)
        for k, v in value.items():
            if k in schema.get("properties", {}):
                check(v, schema["properties"][k])
    elif kind == "array":
        assert isinstance(value, list) and len(value) <= schema.get("maxItems", 10**9)
        for item in value:
            check(item, schema["items"])
    elif kind == "string":
        assert isinstance(value, str) and schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", 10**9)
    elif kind == "integer":
        assert isinstance(value, int) and not isinstance(value, bool)
        assert schema.get("minimum", -(10**18)) <= value <= schema.get("maximum", 10**18)
    else:
        raise AssertionError(f"validator does not know {kind}")


@pytest.fixture(scope="module", params=["torch", "gguf"])
def engine_llm(request, default_model_path):
    m = hanlin.load(default_model_path, device="cpu", engine=request.param)
    yield m
    m.close()


def test_output_validates_against_the_schema(engine_llm):
    msgs = [{"role": "user", "content": "Describe a person as JSON."}]
    runs = [dict(temperature=0)] + [dict(temperature=0.9, seed=s) for s in range(3)]
    for kw in runs:
        r = engine_llm.chat(msgs, max_tokens=160, json_schema=json.dumps(PERSON), **kw)
        assert r.finish_reason == "stop", (kw, r.text)  # ended by itself, not cut off
        check(json.loads(r.text), PERSON)


def test_any_json_object_and_bad_schemas(engine_llm):
    r = engine_llm.chat([{"role": "user", "content": "Give me a JSON object about cats."}], max_tokens=120, temperature=0, json_schema='{"type": "object"}')
    assert isinstance(json.loads(r.text), dict)
    with pytest.raises(ConfigError, match="json_schema"):
        engine_llm.chat([{"role": "user", "content": "hi"}], max_tokens=8, json_schema='{"type": "nonsense"}')
    with pytest.raises(ConfigError, match="json_schema"):
        engine_llm.chat([{"role": "user", "content": "hi"}], max_tokens=8, json_schema="{not json")


def test_unconstrained_output_is_unchanged(engine_llm):
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    a = engine_llm.chat(msgs, max_tokens=16, temperature=0)
    engine_llm.chat(msgs, max_tokens=40, temperature=0, json_schema=json.dumps(PERSON))  # a constrained call in between
    b = engine_llm.chat(msgs, max_tokens=16, temperature=0)
    assert a.token_ids == b.token_ids and a.text
