"""Interactive `hanlin chat` in a real terminal: tmux runs it, send-keys types, capture-pane reads."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import time
import uuid

import pytest

from conftest import hanlin_command

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (apt-get install tmux)")


class Pane:
    def __init__(self, command: str):
        self.name = f"hanlin-test-{uuid.uuid4().hex[:8]}"
        # the previous test's kill-session can leave the tmux server exiting as this connects
        # ("server exited unexpectedly"): a new server starts on the next try
        for attempt in range(3):
            p = subprocess.run(["tmux", "new-session", "-d", "-s", self.name, "-x", "160", "-y", "50", command], capture_output=True, text=True)
            if p.returncode == 0:
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"tmux new-session failed 3 times: {p.stderr.strip()}")
        subprocess.run(["tmux", "set-option", "-t", self.name, "remain-on-exit", "on"], check=True)

    def screen(self) -> str:
        out = subprocess.run(["tmux", "capture-pane", "-p", "-J", "-S", "-500", "-t", self.name], capture_output=True, text=True)
        return out.stdout

    def send(self, *keys: str) -> None:
        subprocess.run(["tmux", "send-keys", "-t", self.name, *keys], check=True)

    def type_line(self, text: str) -> None:
        self.send("-l", text)
        self.send("Enter")

    def wait_for(self, predicate, timeout: float = 60.0) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            s = self.screen()
            if predicate(s):
                return s
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting; screen was:\n{self.screen()}")

    def prompts(self) -> int:
        return sum(1 for line in self.screen().splitlines() if line.startswith(">>> "))

    def wait_prompt(self, count: int, timeout: float = 60.0) -> str:
        return self.wait_for(lambda s: sum(1 for l in s.splitlines() if l.startswith(">>>")) >= count, timeout)

    def dead(self) -> bool:
        out = subprocess.run(["tmux", "display-message", "-p", "-t", self.name, "#{pane_dead}"], capture_output=True, text=True)
        return out.stdout.strip() == "1"

    def kill(self) -> None:
        subprocess.run(["tmux", "kill-session", "-t", self.name], capture_output=True)


@pytest.fixture
def chat(default_model_path):
    cmd = " ".join(shlex.quote(c) for c in hanlin_command()) + f" chat -m {shlex.quote(default_model_path)} --temperature 0 --max-tokens 400"
    pane = Pane(cmd)
    pane.wait_prompt(1)
    yield pane
    pane.kill()


def test_streams_an_answer_keeps_history_and_commands_work(chat):
    screen = chat.screen()
    assert "hanlin · SmolLM2-135M-Instruct.Q4_1.gguf · gguf on cpu" in screen
    chat.type_line("What is the capital of France?")
    screen = chat.wait_prompt(2)
    answer = screen.split("What is the capital of France?", 1)[1].split(">>>", 1)[0]
    assert answer.strip(), screen
    chat.type_line("/system You are a pirate.")
    chat.wait_for(lambda s: "(system prompt set)" in s)
    chat.type_line("/system")
    chat.wait_for(lambda s: "(system prompt: 'You are a pirate.')" in s)
    chat.type_line("/reset")
    chat.wait_for(lambda s: "(conversation reset)" in s)
    chat.type_line("/help")
    chat.wait_for(lambda s: "Multi-line input" in s)
    chat.type_line("/frobnicate")
    chat.wait_for(lambda s: "unknown command /frobnicate" in s)
    chat.type_line("/exit")
    chat.wait_for(lambda s: chat.dead(), timeout=20)


def test_multi_line_input(chat):
    chat.type_line('"""')
    chat.wait_for(lambda s: s.rstrip().endswith("..."))
    chat.type_line("Line one of my question.")
    chat.type_line('Line two: what is 2+2?"""')
    screen = chat.wait_prompt(2)
    after = screen.split('what is 2+2?"""', 1)[1]
    assert after.split(">>>", 1)[0].strip()  # an answer came back for the whole block


def test_ctrl_c_stops_the_answer_not_the_program(chat):
    chat.type_line("Write a very long essay about the history of the ocean, with many details.")
    chat.wait_for(lambda s: len(s.split("many details.", 1)[-1].strip()) > 20, timeout=60)
    chat.send("C-c")
    screen = chat.wait_for(lambda s: "[stopped]" in s, timeout=30)
    chat.wait_prompt(2)
    assert not chat.dead()
    chat.type_line("Say OK.")
    screen = chat.wait_prompt(3)
    assert "Traceback" not in screen
    chat.send("C-d")
    chat.wait_for(lambda s: chat.dead(), timeout=20)


def test_ctrl_c_at_the_prompt_clears_the_line(chat):
    chat.send("-l", "half a thought")
    chat.send("C-c")
    chat.wait_for(lambda s: "(Ctrl-C: line cleared; /exit or Ctrl-D quits)" in s)
    chat.wait_prompt(2)
    assert not chat.dead()
    chat.type_line("/exit")
    chat.wait_for(lambda s: chat.dead(), timeout=20)


def test_a_message_too_long_for_the_context_is_refused_and_the_chat_goes_on(default_model_path):
    cmd = " ".join(shlex.quote(c) for c in hanlin_command()) + f" chat -m {shlex.quote(default_model_path)} --ctx-size 64 --temperature 0 --max-tokens 8"
    pane = Pane(cmd)
    try:
        pane.wait_prompt(1)
        pane.type_line("word " * 100)
        pane.wait_for(lambda s: "error: the prompt is" in s and "context window is 64 tokens" in s)
        pane.wait_for(lambda s: "/reset starts a new one" in s)
        pane.type_line("Hi")
        pane.wait_prompt(3)
        assert not pane.dead()
    finally:
        pane.kill()
