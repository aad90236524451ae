"""The Engine protocol's shared parts: GenerationConfig validation, stop handling, the
registry and auto-selection. Pure functions, checked exactly."""

from __future__ import annotations

import pytest

from hanlin.backends.base import (
    Capabilities,
    ConfigError,
    ContextOverflowError,
    EngineUnavailable,
    GenerationConfig,
    RawToken,
    apply_stops,
    check_prompt_fits,
    detect_format,
    register,
    registered_engines,
    select_engine,
)
from hanlin.devices import Device

# A toy vocabulary: id -> bytes. 9 is EOS. 5 and 6 are the two halves of "é" (0xC3 0xA9).
VOCAB = {0: b"Hel", 1: b"lo", 2: b" wor", 3: b"ld", 4: b"<", 5: b"\xc3", 6: b"\xa9", 7: b"/s", 8: b">", 9: b"", 10: b"!"}


def run(ids, room=100, **cfg):
    config = GenerationConfig(**cfg)
    events = list(apply_stops((RawToken(i, -0.5) for i in ids), token_bytes=VOCAB.__getitem__, eos_ids=[9], config=config, room=room))
    return "".join(e.text for e in events), events


@pytest.mark.parametrize(
    "field,value,needle",
    [
        ("temperature", -0.1, "temperature=-0.1 is invalid: it must be >= 0"),
        ("top_p", 0.0, "top_p=0.0 is invalid: it must be in (0, 1]"),
        ("top_p", 1.5, "top_p=1.5 is invalid"),
        ("top_k", -1, "top_k=-1 is invalid"),
        ("min_p", 1.0, "min_p=1.0 is invalid"),
        ("max_tokens", 0, "max_tokens=0 is invalid"),
        ("repeat_penalty", 0, "repeat_penalty=0 is invalid"),
        ("seed", -3, "seed=-3 is invalid"),
        ("temperature", float("nan"), "temperature=nan is invalid"),
        ("stop", ("",), "stop strings must be non-empty"),
    ],
)
def test_generation_config_rejects_impossible_values(field, value, needle):
    with pytest.raises(ConfigError) as e:
        GenerationConfig(**{field: value})
    assert needle in str(e.value)


def test_generation_config_update_and_stop_normalisation():
    c = GenerationConfig(stop="###")
    assert c.stop == ("###",)
    d = c.updated(temperature=0, max_tokens=None)
    assert d.greedy and d.max_tokens == 512 and d.stop == ("###",)  # None keeps the old value
    with pytest.raises(ConfigError, match="unknown generation setting"):
        c.updated(temprature=0.1)
    with pytest.raises(ConfigError, match="top_p"):
        c.updated(top_p=2.0)


def test_plain_text_and_eos():
    text, events = run([0, 1, 2, 3, 9, 10])
    assert text == "Hello world"
    assert events[-1].finish_reason == "stop" and events[-1].token_id == 9
    assert [e.finish_reason for e in events[:-1]] == [None] * 4
    assert all(e.logprob == -0.5 for e in events)


def test_multibyte_character_split_over_tokens_comes_out_whole():
    text, events = run([0, 5, 6, 9])
    assert text == "Helé"
    assert events[1].text == "" and events[2].text == "é"


def test_stop_string_spanning_token_boundaries_is_cut_and_held_back():
    # "</s>" arrives as "<", "/s", ">": nothing of it may leak out before it is recognised
    text, events = run([0, 1, 4, 7, 8, 10], stop=["</s>"])
    assert text == "Hello"
    assert [e.text for e in events] == ["Hel", "lo", "", "", ""]
    assert events[-1].finish_reason == "stop"


def test_held_back_text_is_released_when_it_is_not_a_stop():
    text, events = run([4, 10, 9], stop=["</s>"])  # "<" then "!" : not a stop after all
    assert text == "<!"
    assert [e.text for e in events] == ["", "<!", ""]


def test_earliest_of_several_stop_strings_wins():
    text, _ = run([0, 1, 2, 3], stop=["world", "lo w"])
    assert text == "Hel"


def test_max_tokens_and_room_end_with_length():
    text, events = run([0, 1, 2, 3, 10], max_tokens=2)
    assert text == "Hello" and events[-1].finish_reason == "length" and len(events) == 2
    text, events = run([0, 1, 2, 3, 10], room=3, max_tokens=None)
    assert text == "Hello wor" and events[-1].finish_reason == "length"
    # held-back text is flushed when the limit is hit
    text, events = run([0, 4], max_tokens=2, stop=["</s>"])
    assert text == "Hel<" and events[-1].finish_reason == "length"


def test_engine_running_dry_reports_length():
    text, events = run([0, 1])
    assert text == "Hello" and events[-1].finish_reason == "length" and events[-1].token_id is None


def test_check_prompt_fits_names_the_numbers():
    check_prompt_fits(10, 11, GenerationConfig())
    with pytest.raises(ContextOverflowError) as e:
        check_prompt_fits(5000, 4096, GenerationConfig())
    msg = str(e.value)
    assert "5000 tokens" in msg and "4096 tokens" in msg and "905" in msg


def test_registry_has_gguf_and_registration_is_by_decorator():
    engines = registered_engines()
    assert "gguf" in engines
    with pytest.raises(TypeError):
        register(type("Nameless", (), {}))


def test_selection_explains_every_engine_and_honours_requests(monkeypatch):
    from hanlin.backends import base

    monkeypatch.setattr(base, "_REGISTRY", dict(base.registered_engines()))  # undone after the test
    cpu = Device(kind="cpu", name="test cpu")

    @register
    class OnnxOnly:  # a second engine, registered the way every engine is
        name = "test-onnx-only"
        capabilities = Capabilities(formats=frozenset({"onnx"}), device_kinds=frozenset({"cpu"}), priority=500)  # above the real onnx engine

        @classmethod
        def available(cls, device):
            return None

    sel = select_engine("gguf", cpu)
    assert sel.engine.name == "gguf"
    text = sel.explain()
    assert "gguf: chosen" in text
    assert "test-onnx-only: skipped: does not read gguf models (reads onnx)" in text
    assert select_engine("onnx", cpu).engine is OnnxOnly
    assert "onnx: could run it too, lower priority" in select_engine("onnx", cpu).explain()
    with pytest.raises(EngineUnavailable, match="engine 'test-onnx-only' cannot run this model here: does not read gguf"):
        select_engine("gguf", cpu, "test-onnx-only")
    with pytest.raises(EngineUnavailable, match="unknown engine 'nope'; known engines: .*gguf"):
        select_engine("gguf", cpu, "nope")
    npu = Device(kind="npu", name="Ascend 910B3")
    with pytest.raises(EngineUnavailable, match="no engine can run a gguf model on .*gguf: skipped: does not run on npu"):
        select_engine("gguf", npu)


def test_detect_format(tmp_path):
    g = tmp_path / "m.gguf"
    g.write_bytes(b"GGUF" + b"\0" * 20)
    assert detect_format(str(g)) == "gguf"
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    assert detect_format(str(tmp_path / "hf")) == "hf"
    (tmp_path / "empty").mkdir()
    with pytest.raises(Exception, match="is a folder but not a model"):
        detect_format(str(tmp_path / "empty"))
    t = tmp_path / "notes.txt"
    t.write_text("hello")
    with pytest.raises(Exception, match="unknown model format"):
        detect_format(str(t))
