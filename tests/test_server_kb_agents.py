"""`hanlin serve --kb DIR`: /v1/kb/search, /v1/kb/ask and /v1/agents/runs on a real server
on 127.0.0.1 (the default model on the GGUF engine, as users run it with --engine gguf), over
a small knowledge base built here from real files with the real MiniLM embedder."""

from __future__ import annotations

import json
import os
import socket
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi", reason="the serve extra is part of the dev install")
pytest.importorskip("faiss", reason="the rag extra is part of the dev install")

from test_rag_index import DOCS as INDEX_DOCS  # noqa: E402
from test_server import KEY, Server  # noqa: E402

# the index tests' English documents (the server tests ask English questions)
DOCS = {name: INDEX_DOCS[name] for name in ("finetune.md", "serve.md", "devices.txt")}
GOOD = ["How do I continue a fine-tune that stopped?", "What does the server answer when its queue is full?"]
BAD = ["What is a good recipe for banana bread?", "Who painted the Mona Lisa?"]
FLAGS = ("--engine", "gguf", "--ctx-size", "1024", "--max-concurrent", "4")


@pytest.fixture(scope="module")
def kb_dir(tmp_path_factory, embedder):
    from hanlin.rag import KnowledgeBase

    root = tmp_path_factory.mktemp("kb")
    (root / "docs").mkdir()
    for name, text in DOCS.items():
        (root / "docs" / name).write_text(text, encoding="utf-8")
    kb = KnowledgeBase(root / "kb", embedder=embedder)
    kb.ingest(root / "docs")
    fit = kb.calibrate(GOOD, BAD)  # the threshold that declines unrelated questions, saved in the index
    assert fit["correct"] == 4, fit
    return str(root / "kb")


@pytest.fixture(scope="module")
def kb_server(kb_dir, default_model_path):
    s = Server(*FLAGS, "--kb", kb_dir)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def plain_server(default_model_path):
    """No knowledge base; an API key."""
    s = Server(*FLAGS, "--api-keys", KEY)
    yield s
    s.stop()


AUTH = {"Authorization": f"Bearer {KEY}"}


def post(server, path: str, body: dict, headers: dict | None = None, timeout: float = 300) -> httpx.Response:
    return httpx.post(server.url + path, json=body, headers=headers or {}, timeout=timeout)


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def sse_events(server, body: dict, headers: dict | None = None) -> list:
    """The data of each server-sent event, parsed; the final [DONE] as the string itself."""
    out = []
    with httpx.stream("POST", server.url + "/v1/agents/runs", json=dict(body, stream=True), headers=headers or {}, timeout=300) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                data = line[len("data: "):]
                out.append(data if data == "[DONE]" else json.loads(data))
            else:
                assert line == "", line
    return out


def check_calls(events: list[dict]) -> None:
    """Every tool_call has dict arguments and is followed by the tool_result of the same id."""
    for i, ev in enumerate(events):
        if ev["type"] == "tool_call":
            assert isinstance(ev["arguments"], dict) and ev["id"]
            nxt = events[i + 1]
            assert nxt["type"] == "tool_result" and nxt["id"] == ev["id"] and nxt["name"] == ev["name"] and isinstance(nxt["content"], str)


def test_kb_search_returns_cited_hits(kb_server):
    r = post(kb_server, "/v1/kb/search", {"query": "how do I resume a stopped fine-tune?", "k": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["answerable"] is True and 0 < body["relevance"] <= 1
    top = body["data"][0]
    assert (top["path"], top["location"]) == ("finetune.md", "Fine-tuning > Resume") and "--resume" in top["text"]
    assert top["citation"] == "finetune.md (Fine-tuning > Resume)" and top["title"]
    assert len(body["data"]) == 3 and all(isinstance(h[f], float) for h in body["data"] for f in ("score", "similarity", "bm25"))
    only = post(kb_server, "/v1/kb/search", {"query": "npu-smi", "k": 1, "mode": "bm25"}).json()["data"]
    assert [h["path"] for h in only] == ["devices.txt"] and only[0]["bm25"] > 0


def test_kb_ask_answers_with_citations_and_declines_unrelated(kb_server):
    r = post(kb_server, "/v1/kb/ask", {"question": "How do I resume a stopped fine-tune?", "k": 2, "max_tokens": 24})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["declined"] is False and body["answer"].strip()
    assert [c["n"] for c in body["citations"]] == [1, 2] and body["citations"][0]["path"] == "finetune.md"
    assert body["citations"][0]["citation"] == "finetune.md (Fine-tuning > Resume)" and body["citations"][0]["location"] == "Fine-tuning > Resume"
    before = httpx.get(kb_server.url + "/metrics").text
    off = post(kb_server, "/v1/kb/ask", {"question": "What is the best way to bake sourdough bread?"}).json()
    assert off["declined"] is True and off["citations"] == [] and "can't answer" in off["answer"]
    assert off["relevance"] < body["relevance"]
    after = httpx.get(kb_server.url + "/metrics").text
    assert _metric(after, "hanlin_prompt_tokens_total") == _metric(before, "hanlin_prompt_tokens_total")  # declined: the model was not asked
    assert 'hanlin_requests_total{endpoint="/v1/kb/ask",status="200"}' in after


def _metric(text: str, name: str) -> float:
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def test_bad_kb_requests_get_openai_errors(kb_server):
    assert error_of(post(kb_server, "/v1/kb/search", {"query": "  "}), 400)["param"] == "query"
    assert error_of(post(kb_server, "/v1/kb/search", {"query": "resume", "k": 0}), 400)["param"] == "k"
    assert error_of(post(kb_server, "/v1/kb/search", {"query": "resume", "k": 51}), 400)["param"] == "k"
    assert error_of(post(kb_server, "/v1/kb/search", {"query": "resume", "mode": "fuzzy"}), 400)["param"] == "mode"
    assert error_of(post(kb_server, "/v1/kb/search", {"qeury": "resume"}), 400)["param"] in ("query", "qeury")
    assert error_of(post(kb_server, "/v1/kb/ask", {"question": ""}), 400)["param"] == "question"
    assert error_of(post(kb_server, "/v1/agents/runs", {"question": "hi", "agent": "magic"}), 400)["param"] == "agent"
    assert error_of(post(kb_server, "/v1/agents/runs", {"question": "hi", "max_steps": 0}), 400)["param"] == "max_steps"
    assert error_of(post(kb_server, "/v1/agents/runs", {"question": "hi", "tool_choice": "required"}), 400)["param"] == "tool_choice"
    assert kb_server.health()["status"] == "ok"


def test_planner_searches_the_kb(kb_server):
    r = post(kb_server, "/v1/agents/runs", {"question": "How do I resume a fine-tune?", "agent": "planner", "max_nodes": 1, "max_tokens": 16})
    assert r.status_code == 200, r.text
    events = r.json()["events"]
    kinds = [e["type"] for e in events]
    assert "plan" in kinds and kinds[-1] == "answer" and r.json()["answer"] == events[-1]["text"]
    done = [e for e in events if e["type"] == "node" and e["state"] == "done"]
    assert done and any(s["citation"].startswith("finetune.md") for s in done[0]["sources"])  # searched on the server's knowledge base
    assert events[-1]["sources"]


def test_an_ingest_while_serving_is_picked_up(kb_server, kb_dir, embedder):
    from hanlin.rag import KnowledgeBase

    assert post(kb_server, "/v1/kb/search", {"query": "quokka", "mode": "bm25"}).json()["data"] == []
    docs = os.path.join(os.path.dirname(kb_dir), "docs")
    with open(os.path.join(docs, "animals.md"), "w", encoding="utf-8") as f:
        f.write("# Mascot\nThe project's mascot is a quokka named Lin.")
    KnowledgeBase(kb_dir, embedder=embedder).ingest(docs)  # a new generation goes live while the server runs
    hits = post(kb_server, "/v1/kb/search", {"query": "quokka", "k": 1, "mode": "bm25"}).json()["data"]
    assert [h["path"] for h in hits] == ["animals.md"]
    assert post(kb_server, "/v1/kb/search", {"query": "what is the mascot of the project?", "k": 1}).json()["answerable"] is True


def test_the_kb_setting_and_a_folder_without_an_index(tmp_path, monkeypatch):
    from conftest import run_cli

    from hanlin.apps.server.settings import ServerSettings

    monkeypatch.setenv("HANLIN_SERVE_KB", "/srv/kb")
    assert ServerSettings().kb == "/srv/kb" and ServerSettings(kb="/other").kb == "/other"
    assert "HANLIN_SERVE_KB" in run_cli("serve", "--help").stdout
    out = run_cli("serve", "--engine", "gguf", "--kb", str(tmp_path / "nothing"), "--port", "0", timeout=120)
    assert out.returncode == 2 and "holds no knowledge base" in out.stderr and "hanlin kb ingest" in out.stderr


def test_no_kb_configured(plain_server):
    for path, body in (("/v1/kb/search", {"query": "resume"}), ("/v1/kb/ask", {"question": "resume?"})):
        assert error_of(post(plain_server, path, body, AUTH), 404)["code"] == "kb_not_found"
    err = error_of(post(plain_server, "/v1/agents/runs", {"question": "How do I resume?", "agent": "planner"}, AUTH), 400)
    assert err["param"] == "agent" and "--kb" in err["message"]


def test_new_routes_need_the_api_key(plain_server):
    for path in ("/v1/kb/search", "/v1/kb/ask", "/v1/agents/runs"):
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            assert error_of(post(plain_server, path, {"question": "hi", "query": "hi"}, headers), 401)["code"] == "invalid_api_key"


def test_agent_run_streams_events_in_order(plain_server):
    """The function agent made to call a tool first: a tool_call, its tool_result, then the
    answer, each one event as it happens, then [DONE]."""
    events = sse_events(plain_server, {"question": "What is 17 * 23?", "agent": "function", "tool_choice": "required", "max_steps": 1, "max_tokens": 64}, AUTH)
    assert events[-1] == "[DONE]"
    events = events[:-1]
    kinds = [e["type"] for e in events]
    assert kinds[-1] == "answer" and kinds.count("answer") == 1 and "tool_call" in kinds, kinds
    assert set(kinds) <= {"thought", "tool_call", "tool_result", "notice", "answer"}
    check_calls(events)
    assert events[-1]["stopped"] == "max_steps"  # one tool call allowed, then it had to answer


def test_agent_run_without_stream_returns_the_answer(plain_server):
    r = post(plain_server, "/v1/agents/runs", {"question": "What is 2 + 2?", "max_steps": 1, "max_tokens": 16}, AUTH)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["events"][-1]["type"] == "answer" and body["answer"] == body["events"][-1]["text"]
    check_calls(body["events"])
    assert plain_server.wait_idle()["running"] == 0


def test_a_client_that_hangs_up_stops_its_run(plain_server):
    """Asked for an essay, the function agent writes 400 tokens before its first event. A
    client that hangs up once it is generating, streaming or not, ends the run there."""
    body = {"question": "Write a long essay about the history of computing.", "agent": "function", "max_steps": 1, "max_tokens": 400}
    for stream in (True, False):
        payload = json.dumps(dict(body, stream=stream)).encode()
        start = _generated(plain_server)
        with socket.create_connection(("127.0.0.1", plain_server.port)) as sock:
            sock.sendall(b"POST /v1/agents/runs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)  # fmt: skip
            deadline = time.time() + 120
            while _generated(plain_server) == start:  # until it is generating
                assert time.time() < deadline, "the run never started generating"
                time.sleep(0.1)
        h = plain_server.wait_idle(timeout=60)
        assert (h["running"], h["waiting"]) == (0, 0), h
        assert _generated(plain_server) - start < 300, stream  # cut short: left alone it writes all 400


def _generated(server) -> float:
    return _metric(httpx.get(server.url + "/metrics").text, "hanlin_generation_tokens_total")
