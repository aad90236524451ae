"""`hanlin` in a real terminal: tmux starts it, send-keys drives it, capture-pane reads it."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess

import pytest

pytest.importorskip("textual", reason="the tui extra is part of dev")

from conftest import hanlin_command  # noqa: E402
from test_chat_tmux import Pane  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (apt-get install tmux)")]


def pane_flag(pane: Pane, flag: str) -> str:
    out = subprocess.run(["tmux", "display-message", "-p", "-t", pane.name, f"#{{{flag}}}"], capture_output=True, text=True)
    return out.stdout.strip()


def words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z]{3,}", text)


def test_hanlin_opens_the_app_answers_a_question_and_ctrl_c_restores_the_terminal(tmp_path, default_model_path):
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    (home / "models" / default_model_path.rsplit("/", 1)[-1]).symlink_to(default_model_path)
    # `hanlin` alone, as a user types it, in a 100x30 terminal
    # (the shell stays after hanlin exits, so the terminal's state can be read then)
    hanlin = f"env HANLIN_HOME={shlex.quote(str(home))} TERM=xterm-256color " + " ".join(shlex.quote(c) for c in hanlin_command())
    pane = Pane("sh -c " + shlex.quote(f"{hanlin}; echo hanlin-exited=$?; sleep 60"))
    try:
        subprocess.run(["tmux", "resize-window", "-t", pane.name, "-x", "100", "-y", "30"], check=True)
        pane.wait_for(lambda s: "Pick a device" in s, 60)
        assert pane_flag(pane, "alternate_on") == "1"  # a full-screen app
        pane.send("Enter")
        pane.wait_for(lambda s: "Pick a model" in s, 30)
        pane.send("Enter")
        pane.wait_for(lambda s: "Task for smollm2-135m-instruct" in s, 60)
        pane.send("Enter")
        pane.wait_for(lambda s: "Message (Enter sends" in s, 30)
        pane.send("-l", "What is the capital of France?")
        pane.send("Enter")
        screen = pane.wait_for(lambda s: re.search(r"(stop|length) · \d+ tokens · [\d.]+ tok/s", s) is not None, 90)
        # the conversation the app saved is the one on the screen. The answer is sampled (the
        # app's default temperature, up to 512 tokens): a long one scrolls the question out of
        # the 30-row view, so its start is checked only when the whole exchange fits, its end always
        from hanlin.history import HistoryStore

        store = HistoryStore(home / "history.sqlite")
        (conv,) = store.list()
        messages = store.get(conv.id).messages
        assert messages[-2].content == "What is the capital of France?"
        answer = words(messages[-1].content)
        shown = words(screen)
        assert answer[-3:] and any(shown[i: i + 3] == answer[-3:] for i in range(len(shown))), (messages[-1].content, screen)
        if "What is the capital of France?" in screen:
            assert answer[:3] == words(screen.split("Assistant", 1)[1])[:3], (messages[-1].content, screen)
        else:
            assert len(messages[-1].content) > 400, "a short answer leaves the question on the screen"

        pane.send("C-c")
        after = pane.wait_for(lambda s: "hanlin-exited=" in s, 20)
        assert "hanlin-exited=0" in after
        assert pane_flag(pane, "alternate_on") == "0"  # back on the normal screen
        assert pane_flag(pane, "cursor_flag") == "1"  # with the cursor shown again
        assert "Traceback" not in pane.screen()
    finally:
        pane.kill()
