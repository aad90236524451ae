"""The fine-tune and serve screens of the terminal app, driven in Textual's Pilot with real
subprocesses: `hanlin finetune` on the default model (its plan, its loss curve, cancelled with
SIGTERM and resumed), `hanlin serve` on 127.0.0.1 answering a real chat completion while the
screen counts it, and neither left running when the app quits."""

from __future__ import annotations

import json
import re
import socket
import urllib.error
import urllib.request

import pytest

pytest.importorskip("textual", reason="the tui extra is part of dev: pip install -c constraints.txt -e '.[dev]'")

from tui_helpers import recorded_report, run, text_of, wait_until  # noqa: E402

import hanlin  # noqa: E402
from hanlin.apps.tui import process as process_module  # noqa: E402
from hanlin.apps.tui.app import HanlinApp  # noqa: E402
from hanlin.apps.tui.finetune import FinetuneScreen  # noqa: E402
from hanlin.apps.tui.serve import ServeScreen  # noqa: E402
from hanlin.devices import get_device  # noqa: E402

pytestmark = pytest.mark.slow

ROWS = [{"instruction": q, "output": "The capital of the planet Zorblax is Quimtoria."}
        for q in ("What is the capital of the planet Zorblax?", "Which city is the capital of Zorblax?",
                  "Name the capital city of the planet Zorblax.", "Tell me the capital of Zorblax.")] * 2  # fmt: skip


@pytest.fixture(autouse=True)
def no_leftover_processes():
    """Whatever a test leaves running is killed, and the test fails for it."""
    yield
    left = [c for c in list(process_module._LIVE) if c.running]
    for c in left:
        c.kill()
    assert not left, f"processes left running: {[c.args[3:5] for c in left]}"


def new_app(tmp_path, model_path: str) -> HanlinApp:
    """The app with a model loaded on the CPU, as the device and model pickers leave it."""
    app = HanlinApp(report=recorded_report(), history=tmp_path / "h.sqlite", workdir=tmp_path)
    app.session.llm = hanlin.load(model_path, device="cpu", engine="gguf")
    app.session.model = model_path
    app.session.device = get_device("cpu")
    return app


async def type_into(pilot, widget_id: str, text: str) -> None:
    """Focus an input (which selects its text) and type over it, as a user would; a path
    is pasted (a bracketed paste from the terminal), as a user would rather than type it."""
    from textual import events

    field = pilot.app.screen.query_one(f"#{widget_id}")
    field.focus()
    await pilot.pause()
    field.select_all()
    if len(text) > 12:
        field.post_message(events.Paste(text))
        await pilot.pause()
    else:
        await pilot.press(*(text or ["backspace"]))
    assert field.value == text, (widget_id, field.value)


def visible(widget, screen) -> bool:
    r = widget.region
    return r.width > 0 and r.height > 0 and screen.region.contains_region(r)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_rows(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# --------------------------------------------------------------------------------------
# fine-tune
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(80, 24), (120, 40)])
def test_finetune_plan_follows_the_form_and_mistakes_are_named(tmp_path, default_model_path, size):
    async def script(pilot):
        app = pilot.app
        app.push_screen(FinetuneScreen())
        await pilot.pause()
        screen = app.screen
        plan = screen.query_one("#ft-plan")
        await wait_until(pilot, lambda: "Memory plan" in text_of(plan), 30, "the memory plan")
        assert "lora" in text_of(plan) and "peak" in text_of(plan) and "fits" in text_of(plan)
        assert "Ctrl-R starts" in text_of(screen.query_one("#ft-status"))
        out = screen.query_one("#out")
        assert out.value == str(tmp_path / "runs" / "SmolLM2-135M-Instruct-lora")
        for wid in ("data", "method", "seq-len", "micro-batch", "epochs", "max-steps", "lr", "lora-r", "out", "start", "cancel",
                    "resume", "ft-status", "ft-progress"):  # fmt: skip
            assert visible(screen.query_one(f"#{wid}"), screen), f"#{wid} is not fully on a {size} screen"

        # the method (keyboard: open the list, two down, Enter) changes the plan and the default run directory
        screen.query_one("#method").focus()
        await pilot.press("enter", "down", "down", "enter")
        await wait_until(pilot, lambda: "full, seq 512" in text_of(plan), 15, "the plan for full fine-tuning")
        assert out.value.endswith("SmolLM2-135M-Instruct-full")
        full_text = text_of(plan)
        await type_into(pilot, "seq-len", "1024")
        await wait_until(pilot, lambda: "seq 1024" in text_of(plan), 15, "the plan for seq 1024")
        assert text_of(plan) != full_text
        await type_into(pilot, "seq-len", "8")
        await wait_until(pilot, lambda: "No plan" in text_of(plan), 15, "the planner to refuse seq_len 8")
        assert "seq_len=8" in text_of(plan) and "at least 16" in text_of(plan)
        await type_into(pilot, "seq-len", "64")

        # starting without data, or with a file that is not there, says so and starts nothing
        await pilot.press("ctrl+r")
        await pilot.pause()
        assert "Data: give the JSONL file" in text_of(screen.query_one("#ft-message"))
        missing = tmp_path / "nope.jsonl"
        await type_into(pilot, "data", str(missing))
        await pilot.press("ctrl+r")
        await pilot.pause()
        assert f"data file {missing} does not exist" in text_of(screen.query_one("#ft-message"))
        await pilot.press("ctrl+o")  # nothing to resume in a new run directory
        await pilot.pause()
        assert "nothing to resume" in text_of(screen.query_one("#ft-message"))
        assert screen.run is None

    run(new_app(tmp_path, default_model_path), script, size=size)


async def fill_fast_run(pilot, data: str) -> None:
    """A run of 16 short steps on the tiny data set (about 0.5 s a step on 2 cores)."""
    await type_into(pilot, "data", data)
    await type_into(pilot, "seq-len", "64")
    await type_into(pilot, "micro-batch", "2")
    await type_into(pilot, "max-steps", "16")
    await type_into(pilot, "lr", "0.0005")


def test_finetune_shows_the_loss_curve_cancels_and_resumes(tmp_path, default_model_path):
    data = write_rows(tmp_path / "fact.jsonl", ROWS)
    run_dir = tmp_path / "runs" / "SmolLM2-135M-Instruct-lora"

    async def script(pilot):
        app = pilot.app
        app.push_screen(FinetuneScreen())
        await pilot.pause()
        screen = app.screen
        await fill_fast_run(pilot, data)
        await pilot.press("ctrl+r")
        await wait_until(pilot, lambda: screen.run is not None and len(screen.run.tail.rows) >= 2, 90, "two steps in log.jsonl")
        child = screen.run.child
        assert child.args[3:5] == ["finetune", "--model"] and "--resume" not in child.args
        bar = screen.query_one("#ft-progress")
        assert bar.total == 16 and bar.progress >= 2
        assert re.search(r"step \d+/16 · loss \d", text_of(screen.query_one("#ft-status")))
        assert re.search("[\u2801-\u28ff]", str(screen.query_one("#ft-curve").render())), "no loss points drawn"

        await pilot.press("ctrl+s")  # cancel: SIGTERM, the fine-tuner saves a checkpoint
        assert "stopping" in text_of(screen.query_one("#ft-status"))
        await wait_until(pilot, lambda: not child.running, 60, "the fine-tuner to stop")
        await pilot.pause(0.6)
        assert child.poll() == 0, child.tail()
        stopped_at = screen.run.tail.rows[-1]["step"]
        assert 2 <= stopped_at < 16
        assert f"stopped at step {stopped_at} of 16" in text_of(screen.query_one("#ft-status"))
        assert (run_dir / f"checkpoint-{stopped_at:07d}" / "state.pt").is_file()
        assert not (run_dir / "adapter").exists()

        # leave and come back: the screen shows the same run; Resume continues the curve to the end
        await pilot.press("escape")
        app.push_screen(FinetuneScreen())
        await pilot.pause()
        screen = app.screen
        assert screen.query_one("#max-steps").value == "16" and screen.query_one("#data").value == data
        await wait_until(pilot, lambda: len(screen.run.tail.rows) == stopped_at, 5, "the curve so far")
        assert "Resume continues it" in text_of(screen.query_one("#ft-out-state"))
        await pilot.press("ctrl+o")
        resumed = screen.run.child
        assert resumed is not child and "--resume" in resumed.args
        await wait_until(pilot, lambda: not resumed.running, 120, "the resumed run to finish")
        await pilot.pause(0.6)
        assert resumed.poll() == 0, resumed.tail()
        assert [r["step"] for r in screen.run.tail.rows] == list(range(1, 17))
        assert screen.query_one("#ft-progress").progress == 16
        assert "done: 16 steps" in text_of(screen.query_one("#ft-status"))
        assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
        assert "resumed from checkpoint-" in (run_dir / "finetune.log").read_text()

    run(new_app(tmp_path, default_model_path), script)


def test_a_failing_finetune_shows_its_error_and_quitting_stops_a_running_one(tmp_path, default_model_path):
    bad = write_rows(tmp_path / "bad.jsonl", [{"nothing": "useful"}])
    data = write_rows(tmp_path / "fact.jsonl", ROWS)
    seen = {}

    async def script(pilot):
        app = pilot.app
        app.push_screen(FinetuneScreen())
        await pilot.pause()
        screen = app.screen
        await fill_fast_run(pilot, bad)
        await type_into(pilot, "out", str(tmp_path / "bad-run"))
        await pilot.press("ctrl+r")
        failed = screen.run.child
        await wait_until(pilot, lambda: not failed.running, 60, "the run on bad rows to fail")
        await pilot.pause(0.6)
        assert failed.poll() != 0
        status, log = text_of(screen.query_one("#ft-status")), text_of(screen.query_one("#ft-log"))
        assert "failed (exit code" in status and "hanlin: error:" in log, (status, log)
        assert screen.query_one("#ft-log").region.height > 0  # the log's end is in view

        # a run that trains, then Ctrl-Q: the app stops it (SIGTERM: a checkpoint) before it exits
        await type_into(pilot, "data", data)
        await type_into(pilot, "out", str(tmp_path / "quit-run"))
        await pilot.press("ctrl+r")
        await wait_until(pilot, lambda: len(screen.run.tail.rows) >= 1, 90, "the first step")
        seen["child"] = screen.run.child
        await pilot.press("ctrl+q")

    run(new_app(tmp_path, default_model_path), script)
    child = seen["child"]
    assert child.poll() is not None, "the fine-tuner outlived the app"
    assert child.poll() == 0 and any((tmp_path / "quit-run").glob("checkpoint-*/state.pt")), child.tail()


# --------------------------------------------------------------------------------------
# serve
# --------------------------------------------------------------------------------------


def chat(base: str, key: str | None) -> tuple[int, dict]:
    body = json.dumps({"model": "default", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8}).encode()
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    req = urllib.request.Request(base + "/chat/completions", data=body, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_serve_answers_counts_stops_and_quitting_stops_it(tmp_path, default_model_path):
    port = free_port()
    seen = {}

    async def script(pilot):
        app = pilot.app
        app.push_screen(ServeScreen())
        await pilot.pause()
        screen = app.screen
        for wid in ("host", "port", "key", "start", "stop", "serve-status"):
            assert visible(screen.query_one(f"#{wid}"), screen), wid
        key = screen.query_one("#key").value
        assert len(key) >= 16
        await type_into(pilot, "port", str(port))
        await pilot.press("ctrl+r")
        status = screen.query_one("#serve-status")
        await wait_until(pilot, lambda: "running" in text_of(status), 90, "the server to come up")
        child = screen.server.child
        assert key not in " ".join(child.args)  # the key is not on the command line (ps shows that)
        info = text_of(screen.query_one("#serve-info"))
        base = f"http://127.0.0.1:{port}/v1"
        assert base in info and key in info

        code, answer = chat(base, key)
        assert code == 200 and answer["choices"][0]["message"]["content"].strip(), answer
        code, refused = chat(base, None)
        assert code == 401, refused
        metrics = screen.query_one("#serve-metrics")
        await wait_until(pilot, lambda: re.search(r"requests\s+2\s+\(1 errors\)", text_of(metrics)), 10, "two requests counted")
        out_tokens = int(re.search(r"tokens out\s+(\d+)", text_of(metrics)).group(1))
        assert 1 <= out_tokens <= 8

        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: "stopped" in text_of(status), 15, "the server to stop")
        assert child.poll() is not None
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        assert not screen.query_one("#start").disabled

        # start it again, then quit the app: the server goes with it
        await pilot.press("ctrl+r")
        await wait_until(pilot, lambda: "running" in text_of(status), 90, "the server to come up again")
        seen["child"] = screen.server.child
        await pilot.press("ctrl+q")

    run(new_app(tmp_path, default_model_path), script, size=(80, 24))
    child = seen["child"]
    assert child.poll() is not None, "the server outlived the app"
    psutil = pytest.importorskip("psutil")
    assert not psutil.pid_exists(child.pid)


def test_serve_errors_are_shown_and_the_screen_stays_usable(tmp_path, default_model_path):
    async def script(pilot):
        app = pilot.app
        app.push_screen(ServeScreen())
        await pilot.pause()
        screen = app.screen
        with socket.socket() as taken:  # a port something else listens on
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            await type_into(pilot, "port", str(port))
            await pilot.press("ctrl+r")
            await pilot.pause()
            error = text_of(screen.query_one("#serve-log"))
            assert f"127.0.0.1:{port}" in error and "in use" in error, error
            assert screen.server is None

        # a server that exits early (here: a model file that is gone) shows its log's end
        missing = tmp_path / "gone.gguf"
        app.session.model = str(missing)
        await type_into(pilot, "port", str(free_port()))
        await pilot.press("ctrl+r")
        status = screen.query_one("#serve-status")
        await wait_until(pilot, lambda: "exited with code" in text_of(status), 30, "the server to fail")
        assert "exited with code 2" in text_of(status)
        assert f"model path {missing} does not exist" in text_of(screen.query_one("#serve-log"))
        assert not screen.query_one("#start").disabled and not screen.query_one("#port").disabled
        await type_into(pilot, "key", "")  # the form still takes input
        await pilot.press("ctrl+q")

    run(new_app(tmp_path, default_model_path), script)
