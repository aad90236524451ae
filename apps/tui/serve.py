"""Serve: run `hanlin serve` on the loaded model as a subprocess and watch it.

Choices made here:
- The server is the real CLI (`python -m hanlin.apps.cli serve ...`), not an in-process
  uvicorn: its crash cannot take the app down, and what the user gets is what `hanlin serve`
  gives. Its output goes to a log file (workdir/logs/serve-PORT.log), never to the terminal.
- The API key travels in HANLIN_SERVE_API_KEYS (a ServerSettings variable), not on the
  command line, where `ps` would show it to every user of the machine.
- A port already in use is reported at once (a test bind, as uvicorn binds: SO_REUSEADDR),
  before seconds are spent loading the model; anything else that makes the server exit early
  is shown as the tail of its log.
- The server outlives this screen (Esc goes back, reopening Serve shows it again) but never
  the app: quitting stops it (SIGTERM, then SIGKILL after a few seconds).
- /health and /metrics are polled with urllib in a worker thread; requests are counted from
  the /v1 endpoints only, so the screen's own polling does not count.
"""

from __future__ import annotations

import os
import secrets
import socket
import sys
import time
import urllib.error
import urllib.request
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import Button, Footer, Header, Input, Label, Static
from textual.worker import get_current_worker

from .process import ChildProcess

# --------------------------------------------------------------------------------------
# the server and its metrics
# --------------------------------------------------------------------------------------


def port_in_use(host: str, port: int) -> str | None:
    """Why `hanlin serve` could not listen on host:port, or None. Binds the way uvicorn does
    (SO_REUSEADDR), so a port held only by connections in TIME_WAIT is not reported."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            return f"cannot listen on {host}:{port}: {e.strerror or e}"
    return None


def parse_metrics(text: str) -> dict[str, Any]:
    """The server's Prometheus text (apps/server/metrics.py) -> the figures the screen shows."""
    out: dict[str, Any] = {"requests": 0, "errors": 0, "prompt_tokens": 0, "generation_tokens": 0, "queue_depth": 0,
                           "running": 0, "ttft_sum": 0.0, "ttft_count": 0}  # fmt: skip
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name, _, labels = name_labels.partition("{")
        try:
            v = float(value)
        except ValueError:
            continue
        if name == "hanlin_requests_total":
            lab = dict(part.split("=", 1) for part in labels.rstrip("}").split(",") if "=" in part)
            if lab.get("endpoint", "").strip('"').startswith("/v1"):
                out["requests"] += int(v)
                if int(lab.get("status", '"0"').strip('"') or 0) >= 400:
                    out["errors"] += int(v)
        elif name == "hanlin_prompt_tokens_total":
            out["prompt_tokens"] = int(v)
        elif name == "hanlin_generation_tokens_total":
            out["generation_tokens"] = int(v)
        elif name == "hanlin_queue_depth":
            out["queue_depth"] = int(v)
        elif name == "hanlin_running_requests":
            out["running"] = int(v)
        elif name == "hanlin_time_to_first_token_seconds_sum":
            out["ttft_sum"] = v
        elif name == "hanlin_time_to_first_token_seconds_count":
            out["ttft_count"] = int(v)
    return out


def _url_host(host: str) -> str:
    """Where this machine reaches a server listening on host (all interfaces: loopback)."""
    local = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"[{local}]" if ":" in local else local


@dataclass
class Server:
    """A running (or exited) `hanlin serve` and what the user asked for."""

    child: ChildProcess
    host: str
    port: int
    key: str
    up: bool = False
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def base(self) -> str:
        return f"http://{_url_host(self.host)}:{self.port}"

    @property
    def url(self) -> str:
        shown = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{shown}:{self.port}/v1"


_SERVERS: "weakref.WeakKeyDictionary[Any, Server]" = weakref.WeakKeyDictionary()  # app -> its server


def _get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")


class ServeScreen(Screen):
    BINDINGS = [Binding("ctrl+r", "start", "Start"), Binding("ctrl+s", "stop", "Stop"), Binding("ctrl+n", "new_key", "New key"),
                Binding("escape", "back", "Tasks")]  # fmt: skip

    DEFAULT_CSS = """
    #serve-body { height: 1fr; }
    #serve-form { width: 40; height: auto; padding: 0 1; }
    #serve-fields { grid-size: 2; grid-columns: 9 1fr; grid-rows: 1; grid-gutter: 1 1; height: auto; margin-bottom: 1; }
    #serve-fields Label { width: 100%; }
    #serve-buttons { height: auto; }
    #serve-buttons Button { margin-right: 1; min-width: 8; width: auto; }
    #serve-side { width: 1fr; padding: 0 1; }
    #serve-status { height: auto; text-style: bold; }
    #serve-info, #serve-metrics { height: auto; margin-top: 1; }
    #serve-log-box { height: 1fr; margin-top: 1; }
    """

    def __init__(self) -> None:
        super().__init__()
        self.server: Server | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="serve-body"):
            with Vertical(id="serve-form"):
                with Grid(id="serve-fields"):
                    yield Label("Host")
                    yield Input("127.0.0.1", id="host", compact=True)
                    yield Label("Port")
                    yield Input("8000", id="port", type="integer", compact=True)
                    yield Label("API key")
                    yield Input(secrets.token_urlsafe(16), id="key", compact=True)
                with Horizontal(id="serve-buttons"):
                    yield Button("Start", id="start", variant="primary", compact=True)
                    yield Button("Stop", id="stop", variant="error", compact=True, disabled=True)
                    yield Button("New key", id="new-key", compact=True)
                yield Static("Clear the key to serve without one (anyone who can reach the port may use it).\n"
                             "Ctrl-R starts · Ctrl-S stops · Esc goes back (the server keeps running)", classes="hint")  # fmt: skip
            with Vertical(id="serve-side"):
                yield Static("stopped", id="serve-status", markup=False)
                yield Static(id="serve-info", markup=False)
                yield Static(id="serve-metrics", markup=False)
                with VerticalScroll(id="serve-log-box"):
                    yield Static(id="serve-log", classes="error", markup=False)
        yield Footer()

    def on_mount(self) -> None:
        llm = self.app.session.llm  # type: ignore[attr-defined]
        self.sub_title = f"Serve · {llm.name}" if llm is not None else "Serve"
        server = _SERVERS.get(self.app)
        if server is not None:  # reopened: show this app's server, running or how it ended
            self.server = server
            self.query_one("#host", Input).value = server.host
            self.query_one("#port", Input).value = str(server.port)
            self.query_one("#key", Input).value = server.key
            if not server.child.running:
                self._exited(server, server.child.poll())  # type: ignore[arg-type]
            else:
                self._set_running(True)
                if server.up:
                    self._show_up()
                else:
                    self._status(f"starting: loading {self._model_name()} …")
                self._watch(server)
        self.query_one("#start", Button).focus()

    # -- actions -----------------------------------------------------------------------

    def on_button_pressed(self, event: Button.Pressed) -> None:
        {"start": self.action_start, "stop": self.action_stop, "new-key": self.action_new_key}[event.button.id or ""]()

    def action_new_key(self) -> None:
        if self.server is None or not self.server.child.running:
            self.query_one("#key", Input).value = secrets.token_urlsafe(16)

    def action_start(self) -> None:
        if self.server is not None and self.server.child.running:
            return
        try:
            host, port, key = self._form()
        except ValueError as e:
            self._error(str(e))
            return
        session = self.app.session  # type: ignore[attr-defined]
        args = [sys.executable, "-m", "hanlin.apps.cli", "serve", "--model", self._model(), "--host", host, "--port", str(port)]
        if session.device is not None:
            args += ["--device", session.device.spec()]
        if session.engine and session.engine != "auto":
            args += ["--engine", session.engine]
        log = Path(self.app.workdir) / "logs" / f"serve-{port}.log"  # type: ignore[attr-defined]
        try:
            child = ChildProcess(args, log, env={"HANLIN_SERVE_API_KEYS": key})
        except OSError as e:
            self._error(f"could not start `hanlin serve`: {e}")
            return
        self.app.on_cleanup(lambda: child.stop(grace=3.0))  # type: ignore[attr-defined]
        self.server = _SERVERS[self.app] = Server(child, host, port, key)
        self.query_one("#serve-log", Static).update("")
        self.query_one("#serve-info", Static).update(f"log: {log}")
        self.query_one("#serve-metrics", Static).update("")
        self._status(f"starting: loading {self._model_name()} … (pid {child.pid})")
        self._set_running(True)
        self._watch(self.server)

    def action_stop(self) -> None:
        server = self.server
        if server is None or not server.child.running:
            return
        self._status("stopping …")
        self._stop(server)

    def action_back(self) -> None:
        self.app.pop_screen()

    # -- the form ------------------------------------------------------------------------

    def _model(self) -> str:
        s = self.app.session  # type: ignore[attr-defined]
        return str(s.model or s.llm.name)

    def _model_name(self) -> str:
        return os.path.basename(self._model().rstrip("/")) or self._model()

    def _form(self) -> tuple[str, int, str]:
        host = self.query_one("#host", Input).value.strip()
        port_text = self.query_one("#port", Input).value.strip()
        key = self.query_one("#key", Input).value.strip()
        if not host:
            raise ValueError("host is empty: 127.0.0.1 serves this machine only, 0.0.0.0 every network interface")
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise ValueError(f"port must be a number from 1 to 65535, not {port_text!r}")
        if "," in key:
            raise ValueError("the API key may not contain a comma (the server reads a comma-separated list)")
        why = port_in_use(host, int(port_text))
        if why:
            raise ValueError(f"{why}; choose another port or stop what uses it")
        return host, int(port_text), key

    # -- watching the process (a worker thread) -------------------------------------------

    @work(thread=True, exclusive=True, group="watch")
    def _watch(self, server: Server) -> None:
        """Until the server exits: wait for /health, then read /metrics every second."""
        worker = get_current_worker()
        while not worker.is_cancelled:
            rc = server.child.poll()
            if rc is not None:
                self._later(self._exited, server, rc)
                return
            try:
                if not server.up:
                    status, _ = _get(server.base + "/health", timeout=1.0)
                    if status == 200:
                        server.up = True
                        self._later(self._show_up)
                else:
                    _, text = _get(server.base + "/metrics")
                    server.metrics = parse_metrics(text)
                    self._later(self._show_metrics, server.metrics)
            except (OSError, ValueError):
                pass  # not listening yet (loading the model), or a moment's hiccup
            time.sleep(1.0 if server.up else 0.25)

    @work(thread=True, group="stop")
    def _stop(self, server: Server) -> None:
        rc = server.child.stop(grace=5.0)
        self._later(self._exited, server, rc)

    def _later(self, fn, *args) -> None:
        """Run fn on the UI thread, if this screen is still shown by then."""

        def guarded() -> None:
            if self.is_attached:
                fn(*args)

        try:
            self.app.call_from_thread(guarded)
        except RuntimeError:  # the app is closing
            pass

    # -- what the screen shows -----------------------------------------------------------

    def _status(self, text: str) -> None:
        self.query_one("#serve-status", Static).update(text)

    def _error(self, text: str) -> None:
        self._status("not running")
        self.query_one("#serve-log", Static).update(text)

    def _set_running(self, running: bool) -> None:
        self.query_one("#start", Button).disabled = running
        self.query_one("#stop", Button).disabled = not running
        self.query_one("#new-key", Button).disabled = running
        for name in ("host", "port", "key"):
            self.query_one(f"#{name}", Input).disabled = running

    def _show_up(self) -> None:
        s = self.server
        if s is None:
            return
        self._status(f"running · pid {s.child.pid}")
        if s.key:
            key = f"API key: {s.key}\n  header: Authorization: Bearer {s.key}"
        elif s.host in ("127.0.0.1", "localhost", "::1"):
            key = "API key: none (no authentication; this machine only)"
        else:
            key = f"API key: none: anyone who can reach {s.host}:{s.port} may use it"
        self.query_one("#serve-info", Static).update(
            f"URL: {s.url}\n{key}\nmodel: default (or the name /v1/models lists)\nlog: {s.child.log_path}"
        )
        if s.metrics:
            self._show_metrics(s.metrics)

    def _show_metrics(self, m: dict[str, Any]) -> None:
        ttft = f"{m['ttft_sum'] / m['ttft_count']:.2f} s" if m.get("ttft_count") else "-"
        self.query_one("#serve-metrics", Static).update(
            f"requests        {m['requests']}  ({m['errors']} errors)\n"
            f"tokens in       {m['prompt_tokens']}\n"
            f"tokens out      {m['generation_tokens']}\n"
            f"queue depth     {m['queue_depth']}\n"
            f"running batch   {m['running']}\n"
            f"first token     {ttft} (mean)"
        )

    def _exited(self, server: Server, rc: int) -> None:
        if server is not self.server:
            return
        self._set_running(False)
        self.query_one("#serve-info", Static).update(f"log: {server.child.log_path}")
        if server.child.stop_asked:
            self._status(f"stopped (it ran {time.monotonic() - server.child.started:.0f} s)")
            return
        error = server.child.error_line()
        self._status(f"the server exited with code {rc}" + (f": {error}" if error else ""))
        self.query_one("#serve-log", Static).update(f"`hanlin serve` exited (code {rc}); the end of {server.child.log_path}:\n\n{server.child.tail()}")
