"""`hanlin serve` as users run it: a real server process on 127.0.0.1, the real default model
on the torch engine (continuous batching), and the official `openai` client."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import socket
import subprocess
import sys
import time

import pytest

openai = pytest.importorskip("openai", reason="the dev install brings the openai client")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi", reason="the serve extra is part of the dev install")
pytest.importorskip("torch")

from conftest import hanlin_command  # noqa: E402

KEY = "test-key-7f3a"
MODEL = "smollm2-135m-instruct"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *flags: str, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [*hanlin_command(), "serve", "--port", str(self.port), *flags]
        self.log = open(os.devnull, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.5)
        raise RuntimeError("server did not come up in 180 s")

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=5).json()

    def wait_idle(self, timeout: float = 10) -> dict:
        deadline = time.time() + timeout
        while True:
            h = self.health()
            if (h["running"], h["waiting"]) == (0, 0) or time.time() > deadline:
                return h
            time.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture(scope="module")
def server(default_model_path):
    s = Server("--api-keys", KEY, "--max-concurrent", "8", "--queue-size", "64", "--max-body-bytes", "20000", "--ctx-size", "512")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def ask(client, content: str, **kw):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **kw)


def test_models_health_and_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert server.health()["status"] == "ok"
    ask(client, "Say hi.", max_tokens=4)
    text = httpx.get(server.url + "/metrics").text
    for name in ("hanlin_requests_total", "hanlin_prompt_tokens_total", "hanlin_generation_tokens_total", "hanlin_time_to_first_token_seconds_bucket",
                 "hanlin_time_per_output_token_seconds_bucket", "hanlin_queue_depth", "hanlin_running_requests"):  # fmt: skip
        assert name in text, name
    assert 'hanlin_requests_total{endpoint="/v1/chat/completions",status="200"}' in text


def test_chat_greedy_and_its_stream_agree(client):
    kw = dict(max_tokens=24, temperature=0)
    whole = ask(client, "What is the capital of France?", **kw)
    assert "Paris" in whole.choices[0].message.content
    assert whole.usage.completion_tokens > 0 and whole.usage.prompt_tokens > 10
    chunks = list(ask(client, "What is the capital of France?", stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_n_seed_logprobs_and_stop(client):
    r = ask(client, "Name a colour.", max_tokens=12, n=3, seed=7, temperature=1.0, logprobs=True, top_logprobs=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    again = ask(client, "Name a colour.", max_tokens=12, n=3, seed=7, temperature=1.0)
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]  # seeded: reproducible
    for c in r.choices:
        lps = c.logprobs.content
        assert lps and all(t.logprob <= 0 for t in lps)
        top = lps[0].top_logprobs
        assert len(top) == 3 and top[0].logprob >= top[1].logprob >= top[2].logprob
    cut = ask(client, "What is the capital of France?", max_tokens=24, temperature=0, stop=["Paris"])
    assert "Paris" not in cut.choices[0].message.content and cut.choices[0].finish_reason == "stop"


def test_completions_endpoint(client):
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0, logprobs=2, echo=True)
    c = r.choices[0]
    assert c.text.startswith("The capital of France is") and "Paris" in c.text
    assert len(c.logprobs.tokens) == r.usage.completion_tokens and all(len(t) <= 2 for t in c.logprobs.top_logprobs)
    streamed = "".join(ch.choices[0].text for ch in client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0, stream=True))
    assert "The capital of France is" + streamed == c.text


def test_api_keys(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.get(server.url + "/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_bad_requests_get_openai_errors(server, client):
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, "hi", max_tokens=-1)
    assert e.value.body["param"] == "max_tokens" and e.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, "hi", temperature="hot")
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, "word " * 600, max_tokens=8)  # over the 512-token window
    assert e.value.body["code"] == "context_length_exceeded"
    h = {"Authorization": f"Bearer {KEY}", "content-type": "application/json"}
    r = httpx.post(server.url + "/v1/chat/completions", headers=h, content=b"{not json")
    assert r.status_code in (400, 422) and "error" in r.json()
    big = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * 30000}]})
    r = httpx.post(server.url + "/v1/chat/completions", headers=h, content=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    r = httpx.post(server.url + "/v1/chat/completions", headers=h, json={"model": MODEL, "messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as e:  # torch's generators take no more; it once wedged the scheduler
        ask(client, "hi", max_tokens=2, seed=2**64)
    assert e.value.body["param"] == "seed"
    assert ask(client, "hi", max_tokens=2).choices[0].message.content is not None  # and the server still answers
    assert server.health()["status"] == "ok"


def test_disconnects_free_their_slots(server):
    server.wait_idle()
    idle = server.rss_mb()
    h = {"Authorization": f"Bearer {KEY}"}
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Write a long story."}], "max_tokens": 400, "stream": True}
    for _ in range(12):
        with httpx.stream("POST", server.url + "/v1/chat/completions", headers=h, json=body, timeout=30) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and '"content"' in line:
                    break  # got a token: hang up mid-stream
    after = server.wait_idle(timeout=5)
    assert (after["running"], after["waiting"]) == (0, 0), after
    assert server.rss_mb() < idle + 60, (idle, server.rss_mb())


def test_a_full_queue_answers_429(default_model_path):
    s = Server("--max-concurrent", "1", "--queue-size", "1", "--ctx-size", "512")
    try:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Write a long story."}], "max_tokens": 60}

        def post(_):
            return httpx.post(s.url + "/v1/chat/completions", json=body, timeout=120)

        with cf.ThreadPoolExecutor(6) as ex:
            rs = list(ex.map(post, range(6)))
        codes = sorted(r.status_code for r in rs)
        assert 429 in codes and codes.count(200) >= 2, codes
        refused = next(r for r in rs if r.status_code == 429)
        assert refused.headers["Retry-After"] == "1" and refused.json()["error"]["type"] == "rate_limit_error"
        assert all(r.json()["choices"][0]["message"]["content"] for r in rs if r.status_code == 200)
    finally:
        s.stop()


def test_32_concurrent_streaming_clients(server, client):
    server.wait_idle()
    idle = server.rss_mb()
    deadline = time.time() + 30

    def worker(i: int) -> tuple[int, int]:
        done = errors = 0
        while time.time() < deadline:
            try:
                chunks = list(ask(client, f"Tell me fact number {i}.", max_tokens=12, stream=True, seed=i))
                finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
                done += finish in (["stop"], ["length"])
                errors += finish not in (["stop"], ["length"])
            except Exception:  # noqa: BLE001  (counted: the test wants zero)
                errors += 1
        return done, errors

    with cf.ThreadPoolExecutor(32) as ex:
        results = list(ex.map(worker, range(32)))
    assert sum(e for _, e in results) == 0
    assert all(d >= 1 for d, _ in results)  # every client completed streams
    assert server.wait_idle()["running"] == 0
    assert server.rss_mb() < idle + 100, (idle, server.rss_mb())


def test_settings_from_flags_and_environment(monkeypatch):
    from hanlin.apps.server.settings import ServerSettings

    monkeypatch.setenv("HANLIN_SERVE_MAX_CONCURRENT", "3")
    monkeypatch.setenv("HANLIN_SERVE_API_KEYS", "a, b")
    s = ServerSettings()
    assert s.max_concurrent == 3 and s.api_keys == ["a", "b"] and s.host == "127.0.0.1" and s.port == 8000
    assert ServerSettings(max_concurrent=5).max_concurrent == 5  # a flag wins over the environment
    out = subprocess.run([*hanlin_command(), "serve", "--max-concurrent", "0"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--max-concurrent" in out.stderr
    assert "HANLIN_SERVE_QUEUE_SIZE" in subprocess.run([*hanlin_command(), "serve", "--help"], capture_output=True, text=True, timeout=60).stdout


def test_tool_and_format_requests_are_checked(client):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, "Weather in Paris?", tools=tools, tool_choice={"type": "function", "function": {"name": "nope"}})
    assert e.value.body["param"] == "tool_choice" and "nope" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, "hi", response_format={"type": "yaml"})
    assert e.value.body["param"] == "response_format"
    r = ask(client, "Weather in Paris?", tools=tools, tool_choice="none", max_tokens=8, temperature=0)  # tools off: a plain answer
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather for a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}, "unit": {"enum": ["C", "F"]}},
                          "required": ["city", "unit"], "additionalProperties": False}}}  # fmt: skip
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 20}},
                                                                           "required": ["zone"], "additionalProperties": False}}}  # fmt: skip


def test_structured_output_validates(client):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0},
              "colour": {"enum": ["red", "green", "blue"]}}, "required": ["name", "age", "colour"], "additionalProperties": False}  # fmt: skip
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}
    r = ask(client, "Describe a person.", response_format=fmt, max_tokens=120, n=3, seed=5, temperature=0.9)
    for c in r.choices:
        obj = json.loads(c.message.content)
        assert set(obj) == {"name", "age", "colour"} and obj["colour"] in ("red", "green", "blue") and isinstance(obj["age"], int) and obj["age"] >= 0
        assert c.finish_reason == "stop"
    streamed = "".join(ch.choices[0].delta.content or "" for ch in ask(client, "Describe a person.", response_format=fmt, max_tokens=120, stream=True) if ch.choices)
    assert set(json.loads(streamed)) == {"name", "age", "colour"}
    any_obj = ask(client, "A JSON object about cats.", response_format={"type": "json_object"}, max_tokens=200, temperature=0).choices[0]
    assert any_obj.finish_reason == "stop" and isinstance(json.loads(any_obj.message.content), dict)  # (cut off by max_tokens it could not parse)
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, "hi", response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}})
    assert "json_schema" in e.value.body["message"]


def test_forced_tool_calls_parse(client):
    for choice, names in (("required", {"get_weather", "get_time"}), ({"type": "function", "function": {"name": "get_weather"}}, {"get_weather"})):
        r = ask(client, "What is the weather in Paris in celsius?", tools=[WEATHER, TIME], tool_choice=choice, max_tokens=80, temperature=0)
        c = r.choices[0]
        assert c.finish_reason == "tool_calls" and c.message.content is None
        call = c.message.tool_calls[0]
        assert call.type == "function" and call.function.name in names and call.id.startswith("call")
        args = json.loads(call.function.arguments)
        assert set(args) == ({"city", "unit"} if call.function.name == "get_weather" else {"zone"})
    chunks = list(ask(client, "Weather in Oslo?", tools=[WEATHER], tool_choice="required", max_tokens=80, stream=True))
    deltas = [ch.choices[0].delta.tool_calls for ch in chunks if ch.choices and ch.choices[0].delta.tool_calls]
    assert deltas and json.loads(deltas[0][0].function.arguments)["unit"] in ("C", "F")
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == ["tool_calls"]
    # the result goes back as a tool message and the model answers in words
    follow = client.chat.completions.create(model=MODEL, max_tokens=20, temperature=0, tools=[WEATHER], messages=[
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "C"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 3}'},
    ], tool_choice="none")  # fmt: skip
    assert follow.choices[0].message.content and follow.choices[0].finish_reason in ("stop", "length")


def test_schemathesis_finds_no_server_error(default_model_path, tmp_path):
    """Fuzz every operation of the server's own OpenAPI document (hundreds of generated
    requests, with and without the key): no 5xx, no crash. max_tokens is capped at 4 so the
    generated generation requests stay quick."""
    s = Server("--api-keys", KEY, "--max-tokens-cap", "4", "--ctx-size", "512")
    try:
        out = subprocess.run([sys.executable, "-m", "schemathesis.cli", "run", s.url + "/openapi.json", "--checks", "not_a_server_error", "--header",
                              f"Authorization: Bearer {KEY}", "--max-examples", "30", "--seed", "1", "--no-color",
                              "--request-timeout", "60"],  # an agent run is several model steps: on a busy machine more than the 10 s default
                             capture_output=True, text=True, timeout=600, cwd=tmp_path)  # fmt: skip
        assert out.returncode == 0, out.stdout[-3000:]
        assert " passed" in out.stdout and " failed" not in out.stdout.split("SUMMARY")[-1]
        assert s.health()["status"] == "ok" and s.proc.poll() is None
    finally:
        s.stop()


def test_gguf_engine_serves_too(default_model_path):
    """The GGUF engine batches too: each request a llama.cpp sequence, one decode for all."""
    s = Server("--engine", "gguf", "--ctx-size", "512")
    try:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0)
        assert httpx.get(s.url + "/v1/models").json()["data"][0]["engine"] == "gguf"
        chunks = list(ask(c, "What is the capital of France?", max_tokens=24, temperature=0, stream=True))
        pieces = [ch.choices[0].delta.content for ch in chunks if ch.choices and ch.choices[0].delta.content]
        assert len(pieces) > 3 and "".join(pieces).strip()  # several chunks: streamed, not delivered at the end
        with cf.ThreadPoolExecutor(4) as ex:
            outs = list(ex.map(lambda i: ask(c, "What is the capital of France?", max_tokens=24, temperature=0).choices[0].message.content, range(4)))
        assert outs == ["".join(pieces)] * 4  # four at once in one batch: each the same as alone
        peak = httpx.get(s.url + "/metrics").text
        assert "hanlin_running_requests" in peak and s.wait_idle()["running"] == 0
        seeded = [ask(c, "Name a colour.", max_tokens=12, temperature=1.0, seed=3, logprobs=True, top_logprobs=2).choices[0] for _ in range(2)]
        assert seeded[0].message.content == seeded[1].message.content and seeded[0].logprobs.content[0].logprob <= 0
        r = ask(c, "A person as JSON.", max_tokens=200, temperature=0, response_format={"type": "json_object"})
        assert r.choices[0].finish_reason == "stop" and isinstance(json.loads(r.choices[0].message.content), dict)
    finally:
        s.stop()


def test_embeddings(minilm_folder):
    import base64
    import struct

    s = Server("--embedding-model", minilm_folder, "--ctx-size", "512")
    try:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0)
        name = os.path.basename(minilm_folder)
        texts = ["A cat sits on the mat.", "A kitten is resting on a rug.", "The quarterly tax report is due."]
        r = c.embeddings.create(model=name, input=texts)
        vecs = [d.embedding for d in r.data]
        assert [d.index for d in r.data] == [0, 1, 2] and all(len(v) == 384 for v in vecs) and r.usage.prompt_tokens > 10
        assert all(abs(sum(x * x for x in v) - 1) < 1e-4 for v in vecs)  # normalised, as the model's modules.json says

        def cos(a, b):
            return sum(x * y for x, y in zip(a, b))

        assert cos(vecs[0], vecs[1]) > 0.5 > cos(vecs[0], vecs[2])
        raw = httpx.post(s.url + "/v1/embeddings", json={"model": name, "input": texts[0], "encoding_format": "base64"}).json()
        floats = struct.unpack("<384f", base64.b64decode(raw["data"][0]["embedding"]))
        assert max(abs(a - b) for a, b in zip(floats, vecs[0])) < 1e-6
        short = c.embeddings.create(model=name, input=texts[0], dimensions=64).data[0].embedding
        assert len(short) == 64 and abs(sum(x * x for x in short) - 1) < 1e-4
        with pytest.raises(openai.BadRequestError):
            c.embeddings.create(model=name, input=[])
        with pytest.raises(openai.NotFoundError):
            c.embeddings.create(model="other", input="x")
        assert "Paris" in ask(c, "What is the capital of France?", max_tokens=16, temperature=0).choices[0].message.content  # chat still served
    finally:
        s.stop()
