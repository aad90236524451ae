"""Structured output by constrained decoding: a JSON Schema is a token mask at every step, so
even the 135M default model returns JSON that validates (torch engine: xgrammar; GGUF
engine: llama.cpp's grammar)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip(
    "xgrammar", reason="the serve extra brings xgrammar (part of the dev install)"
)

import hanlin
import torch
from hanlin.backends.base import ConfigError

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "colour": {"enum": ["red", "green", "blue"]},
        "tags": {
            "type": "array",
            "items": {"type": "string", "maxLength": 12},
            "maxItems": 3,
        },
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}},
            "required": ["city"],
            "additionalProperties": False,
        },
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
        assert isinstance(value, str) and schema.get("minLength", 0) <= len(
            value
        ) <= schema.get("maxLength", 10**9)
    elif kind == "integer":
        assert isinstance(value, int) and not isinstance(value, bool)
        assert (
            schema.get("minimum", -(10**18)) <= value <= schema.get("maximum", 10**18)
        )
    else:
        raise AssertionError(f"validator does not know {kind}")


def test_the_validator_rejects_what_the_schema_forbids():
    good = {
        "name": "Ann",
        "age": 30,
        "colour": "red",
        "tags": [],
        "address": {"city": "Oslo"},
    }
    check(good, PERSON)
    for bad in [
        dict(good, age=-1),
        dict(good, colour="pink"),
        dict(good, tags=["a"] * 4),
        dict(good, extra=1),
        {k: v for k, v in good.items() if k != "name"},
        dict(good, address={"town": "x"}),
    ]:
        with pytest.raises(AssertionError):
            check(bad, PERSON)


@pytest.fixture(scope="module", params=["torch", "gguf"])
def engine_llm(request, default_model_path):
    m = hanlin.load(default_model_path, device="cpu", engine=request.param)
    yield m
    m.close()


def test_output_validates_against_the_schema(engine_llm):
    msgs = [{"role": "user", "content": "Describe a person as JSON."}]
    eos = engine_llm.engine.eos_token_ids
    runs = [{"temperature": 0}] + [{"temperature": 0.8, "seed": s} for s in range(3)]
    for kw in runs:
        r = engine_llm.chat(msgs, max_tokens=160, json_schema=json.dumps(PERSON), **kw)
        # ended by itself (EOS once the JSON closed), not cut off at max_tokens
        assert r.finish_reason == "stop" and r.token_ids[-1] in eos, (kw, r.text)
        check(json.loads(r.text), PERSON)


def test_any_json_object_and_bad_schemas(engine_llm):
    r = engine_llm.chat(
        [{"role": "user", "content": "Give me a JSON object about cats."}],
        max_tokens=120,
        temperature=0,
        json_schema='{"type": "object"}',
    )
    assert r.finish_reason == "stop" and isinstance(json.loads(r.text), dict), r.text
    for bad in ['{"type": "nonsense"}', "{not json"]:
        with pytest.raises(ConfigError, match="json_schema"):
            engine_llm.chat(
                [{"role": "user", "content": "hi"}], max_tokens=8, json_schema=bad
            )


def greedy_reference(llm, prompt: list[int], n: int, raw_llama) -> list[int]:
    """What greedy decoding must give without a schema, from code that shares nothing with the
    engine's generation: argmax of a full causal pass per token (torch), or raw
    llama-cpp-python (GGUF: its batched and incremental logits differ in the last bits)."""
    out: list[int] = []
    if llm.engine.name == "torch":
        while len(out) < n and (not out or out[-1] not in llm.engine.eos_token_ids):
            scores = llm.engine.score_tokens(prompt + out + [0])  # last id: unscored
            out.append(scores.argmax[-1])
        return out
    raw_llama.reset()
    for tok in raw_llama.generate(prompt, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(tok)
        if tok in llm.engine.eos_token_ids or len(out) >= n:
            break
    return out


def test_unconstrained_output_is_unchanged(engine_llm, raw_llama):
    """Greedy decoding without a schema is what it was before constrained decoding existed,
    and a constrained call leaves nothing behind for the next request."""
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    a = engine_llm.chat(msgs, max_tokens=16, temperature=0, repeat_penalty=1.0)
    assert a.text and a.token_ids == greedy_reference(
        engine_llm, engine_llm.chat_ids(msgs), 16, raw_llama
    )
    # a constrained call in between
    engine_llm.chat(msgs, max_tokens=40, temperature=0, json_schema=json.dumps(PERSON))
    b = engine_llm.chat(msgs, max_tokens=16, temperature=0, repeat_penalty=1.0)
    assert a.token_ids == b.token_ids


@pytest.fixture(scope="module")
def torch_engine(default_model_path):
    """The Constraint API (what the batch scheduler calls) belongs to the torch engine."""
    m = hanlin.load(default_model_path, device="cpu", engine="torch")
    yield m.engine
    m.close()


def allowed(constraint, V: int) -> set[int]:
    logits = torch.zeros(V)  # (V,)
    constraint.mask_(logits)
    return set(torch.isfinite(logits).nonzero()[:, 0].tolist())


def test_constraint_masks_and_is_done_only_when_only_eos_may_follow(torch_engine):
    """The API the batch scheduler calls per row: mask_ on (V,) or (1, V), accept, is_done."""
    eng, V = torch_engine, torch_engine.model.config.vocab_size
    grammars = eng.grammars()
    eos = min(eng.eos_token_ids)
    c = grammars.constraint('{"type": "integer", "minimum": 0}')
    first = allowed(c, V)
    assert (
        first
        and eos not in first
        and all(eng.token_bytes(t) and eng.token_bytes(t).isdigit() for t in first)
    )
    row = torch.zeros(1, V)  # (1, V), as the scheduler passes it
    c.mask_(row)
    assert set(torch.isfinite(row[0]).nonzero()[:, 0].tolist()) == first
    for t in eng.tokenize("12", add_bos=False):
        c.accept(t)
    assert not c.is_done  # "12" is a whole integer, but "123" may still come
    assert eos in allowed(c, V) and len(allowed(c, V)) > 1
    c.accept(eos)
    assert c.is_done
    with pytest.raises(RuntimeError, match="breaks the grammar"):
        grammars.constraint('{"type": "integer"}').accept(
            eng.tokenize("x", add_bos=False)[0]
        )

    obj = grammars.constraint('{"type": "object"}')
    for t in eng.tokenize('{"a": 1}', add_bos=False):
        assert not obj.is_done
        obj.accept(t)
    # the object is closed: only EOS is left
    assert obj.is_done and allowed(obj, V) == set(eng.eos_token_ids)
    # the grammar is cached, the matcher is per sequence
    assert not grammars.constraint('{"type": "object"}').is_done
