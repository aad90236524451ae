"""Fine-tune: a form, the memory plan, then the real `hanlin finetune` with a live loss curve.

Choices made here:
- The plan is hanlin.finetune.plan_for (what `hanlin finetune --plan` prints), recomputed in a
  worker thread 0.4 s after the form last changed, so typing a number does not stall the keys.
- The form is checked by FinetuneConfig.validate (the SDK's own rules and messages), plus what
  only a person can fix before starting: a data file that is not there, a run directory that
  already holds a run.
- The run is `python -m hanlin.apps.cli finetune ...` in a subprocess: the CLI's defaults,
  allocator re-exec and atomic checkpoints, and a crash that cannot take the app down. Its
  output goes to RUN/finetune.log, never to the terminal Textual draws on.
- Progress is read from RUN/log.jsonl (one row per optimizer step, with total_steps) on a
  timer. --resume rewrites that file (rows after the checkpoint dropped); the tail notices (a
  new inode, or a shorter file) and reads it again, so the curve continues where it resumed.
- Cancel sends SIGTERM: the fine-tuner ends its step, saves a checkpoint and exits 0, and
  Resume continues from it. A second Cancel kills it (SIGKILL). The run outlives this screen
  (Esc goes back; reopening Fine-tune shows it) but never the app.
"""

from __future__ import annotations

import json
import os
import sys
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import Button, ContentSwitcher, Footer, Header, Input, Label, ProgressBar, Select, Static
from textual.worker import get_current_worker

from .process import ChildProcess

METHODS = ("lora", "qlora", "full", "dpo")
PLAN_DELAY = 0.4  # seconds after the last edit before the plan is recomputed
TICK = 0.5  # seconds between reads of log.jsonl
RUN_LOG = "finetune.log"  # the subprocess's stdout and stderr, inside the run directory


class LogTail:
    """The rows of a run's log.jsonl, read incrementally; read again from the start when the
    trainer rewrote the file (--resume truncates it to the checkpoint's step)."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: list[dict[str, Any]] = []
        self._offset, self._inode, self._partial = 0, None, b""

    def read(self) -> bool:
        """Take in what was appended; True when something changed."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        changed = False
        if st.st_ino != self._inode or st.st_size < self._offset:
            self.rows, self._offset, self._inode, self._partial = [], 0, st.st_ino, b""
            changed = True
        if st.st_size == self._offset:
            return changed
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        self._offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        for line in lines:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and "step" in row:
                self.rows = [r for r in self.rows if r["step"] < row["step"]] + [row]
                changed = True
        return changed


@dataclass
class Run:
    """A fine-tuning subprocess and what it was started with (kept per app, so the screen
    can be left and reopened while it trains)."""

    child: ChildProcess
    run_dir: Path
    form: dict[str, str]
    tail: LogTail = field(init=False)

    def __post_init__(self) -> None:
        from hanlin.finetune.trainer import LOG_FILE

        self.tail = LogTail(self.run_dir / LOG_FILE)


_RUNS: "weakref.WeakKeyDictionary[Any, Run]" = weakref.WeakKeyDictionary()  # app -> its latest run


def run_state(run_dir: Path) -> tuple[str, str]:
    """What the run directory holds: ("new" | "stopped" | "done" | "other", a sentence)."""
    from hanlin.backends.torch.lora import RUN_FILE
    from hanlin.finetune.trainer import checkpoints

    if not (run_dir / RUN_FILE).is_file():
        if run_dir.exists() and not run_dir.is_dir():
            return "other", f"{run_dir} is a file, not a directory"
        return "new", "a new run"
    try:
        info = json.loads((run_dir / RUN_FILE).read_text())
    except (OSError, ValueError):
        info = {}
    if info.get("status") == "done":
        return "done", f"holds a finished run ({info.get('steps', '?')} steps): choose another directory"
    ckpts = checkpoints(str(run_dir))
    if ckpts:
        step = int(os.path.basename(ckpts[-1]).rsplit("-", 1)[-1])
        of = f" of {info['total_steps']}" if info.get("total_steps") else ""
        return "stopped", f"holds a stopped run at step {step}{of}: Resume continues it"
    return "other", "holds a run with no checkpoint to resume: choose another directory"


class FinetuneScreen(Screen):
    BINDINGS = [Binding("ctrl+r", "start", "Start"), Binding("ctrl+s", "cancel", "Cancel"), Binding("ctrl+o", "resume", "Resume"),
                Binding("ctrl+l", "toggle_view", "Plan/curve"), Binding("escape", "back", "Tasks")]  # fmt: skip

    DEFAULT_CSS = """
    #ft-body { height: 1fr; }
    #ft-form { width: 40; padding: 0 1; }
    #ft-fields { grid-size: 2; grid-columns: 11 1fr; grid-rows: 1; grid-gutter: 0 1; height: auto; }
    #ft-fields Label { width: 100%; }
    #ft-fields Select { width: 100%; }
    #ft-out-state { height: auto; margin-top: 1; }
    #ft-buttons { height: auto; margin-top: 1; }
    #ft-buttons Button { margin-right: 1; min-width: 8; width: auto; }
    #ft-message { height: auto; margin-top: 1; }
    #ft-side { width: 1fr; padding: 0 1; }
    #ft-status { height: auto; max-height: 3; }
    #ft-progress { height: 1; width: 100%; }
    #ft-progress Bar { width: 1fr; }
    #ft-view { height: 1fr; }
    #ft-plan-box, #ft-log-box { height: 1fr; }
    #ft-curve { height: 1fr; min-height: 8; }
    """

    def __init__(self) -> None:
        super().__init__()
        self.run: Run | None = None
        self.plan: Any = None  # the latest hanlin.finetune Plan
        self._plan_timer: Any = None
        self._plan_seq = 0  # answers of older plan workers are dropped
        self._auto_out = ""  # the output directory last filled in by default (replaced when the method changes)
        self._finished_seen: Any = None  # the ChildProcess whose exit was reported

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="ft-body"):
            with VerticalScroll(id="ft-form"):
                with Grid(id="ft-fields"):
                    yield Label("Data")
                    yield Input(placeholder="train.jsonl", id="data", compact=True)
                    yield Label("Method")
                    yield Select([(m, m) for m in METHODS], value="lora", allow_blank=False, id="method", compact=True)
                    yield Label("Seq len")
                    yield Input("512", id="seq-len", type="integer", compact=True)
                    yield Label("Micro batch")
                    yield Input("4", id="micro-batch", type="integer", compact=True)
                    yield Label("Epochs")
                    yield Input("1", id="epochs", type="number", compact=True)
                    yield Label("Max steps")
                    yield Input(placeholder="from epochs", id="max-steps", type="integer", compact=True)
                    yield Label("Learn rate")
                    yield Input(placeholder="method's default", id="lr", type="number", compact=True)
                    yield Label("LoRA rank")
                    yield Input("8", id="lora-r", type="integer", compact=True)
                    yield Label("Output")
                    yield Input(id="out", compact=True)
                yield Static(id="ft-out-state", classes="hint", markup=False)
                with Horizontal(id="ft-buttons"):
                    yield Button("Start", id="start", variant="primary", compact=True)
                    yield Button("Cancel", id="cancel", variant="error", compact=True, disabled=True)
                    yield Button("Resume", id="resume", compact=True)
                yield Static(id="ft-message", classes="error", markup=False)
            with Vertical(id="ft-side"):
                yield Static("Fill in the form; the memory plan follows it.", id="ft-status", markup=False)
                yield ProgressBar(total=1, show_eta=True, id="ft-progress")
                with ContentSwitcher(initial="ft-plan-box", id="ft-view"):
                    with VerticalScroll(id="ft-plan-box"):
                        yield Static("computing the memory plan …", id="ft-plan", markup=False)
                    yield _loss_plot()
                    with VerticalScroll(id="ft-log-box"):
                        yield Static(id="ft-log", classes="error", markup=False)
        yield Footer()

    def on_mount(self) -> None:
        llm = self.app.session.llm  # type: ignore[attr-defined]
        self.sub_title = f"Fine-tune · {llm.name}" if llm is not None else "Fine-tune"
        run = _RUNS.get(self.app)
        if run is not None:  # reopened: show the latest run of this app
            self.run = run
            self._fill(run.form)
            self._auto_out = ""
            self.query_one("#ft-view", ContentSwitcher).current = "ft-curve"
        else:
            self._auto_out = str(self._default_out("lora"))
            self.query_one("#out", Input).value = self._auto_out
        self._set_buttons()
        self._describe_out()
        self._schedule_plan()
        self.set_interval(TICK, self._tick)
        self._tick()
        self.query_one("#data", Input).focus()

    # -- the form ------------------------------------------------------------------------

    def _model(self) -> str:
        s = self.app.session  # type: ignore[attr-defined]
        return str(s.model or s.llm.name)

    def _default_out(self, method: str) -> Path:
        """workdir/runs/<model>-<method>, or the first -2, -3 … that holds no run yet."""
        from hanlin.backends.torch.lora import RUN_FILE

        stem = os.path.basename(self._model().rstrip("/")).split(".")[0] or "model"
        base = Path(self.app.workdir) / "runs" / f"{stem}-{method}"  # type: ignore[attr-defined]
        out, n = base, 1
        while (out / RUN_FILE).exists():
            n += 1
            out = base.with_name(f"{base.name}-{n}")
        return out

    def _values(self) -> dict[str, str]:
        form = {name: self.query_one(f"#{name}", Input).value.strip() for name in ("data", "seq-len", "micro-batch", "epochs", "max-steps", "lr", "lora-r", "out")}
        form["method"] = str(self.query_one("#method", Select).value)
        return form

    def _fill(self, form: dict[str, str]) -> None:
        for name, value in form.items():
            if name == "method":
                self.query_one("#method", Select).value = value
            else:
                self.query_one(f"#{name}", Input).value = value

    def _settings(self, form: dict[str, str]) -> dict[str, Any]:
        """The form as FinetuneConfig fields, checked by FinetuneConfig.validate."""
        from hanlin.finetune import FinetuneConfig

        def number(name: str, label: str, kind: type, blank: Any = ...) -> Any:
            text = form[name]
            if not text and blank is not ...:
                return blank
            try:
                return kind(text)
            except ValueError:
                raise ValueError(f"{label}: {text!r} is not a {'whole number' if kind is int else 'number'}") from None

        cfg = FinetuneConfig(model=self._model(), data=form["data"], out=form["out"], method=form["method"],
                             seq_len=number("seq-len", "Seq len", int), micro_batch=number("micro-batch", "Micro batch", int),
                             epochs=number("epochs", "Epochs", float), max_steps=number("max-steps", "Max steps", int, None),
                             lr=number("lr", "Learn rate", float, None), lora_r=number("lora-r", "LoRA rank", int))  # fmt: skip
        cfg.validate()
        return {"method": cfg.method, "seq_len": cfg.seq_len, "micro_batch": cfg.micro_batch, "epochs": cfg.epochs,
                "max_steps": cfg.max_steps, "lr": cfg.lr, "lora_r": cfg.lora_r}  # fmt: skip

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "out":
            self._describe_out()
        elif event.input.id != "data":
            self._schedule_plan()

    def on_select_changed(self, event: Select.Changed) -> None:
        out = self.query_one("#out", Input)
        if out.value.strip() == self._auto_out:  # still the default: follow the method
            self._auto_out = str(self._default_out(str(event.value)))
            out.value = self._auto_out
        self._schedule_plan()

    def _describe_out(self) -> None:
        text = self.query_one("#out", Input).value.strip()
        if self._active() and Path(text).expanduser().absolute() == self.run.run_dir:  # type: ignore[union-attr]
            state = "the run in progress"
        else:
            state = run_state(Path(text).expanduser())[1] if text else "choose a run directory"
        self.query_one("#ft-out-state", Static).update(f"Output: {state}")

    # -- the memory plan (debounced, in a worker) -----------------------------------------

    def _schedule_plan(self) -> None:
        if self._plan_timer is not None:
            self._plan_timer.stop()
        self._plan_timer = self.set_timer(PLAN_DELAY, self._start_plan)

    def _start_plan(self) -> None:
        self._plan_seq += 1
        try:
            s = self._settings(self._values())
        except Exception as e:  # noqa: BLE001 - a form value the SDK refuses: say which
            self._show_plan(self._plan_seq, None, f"No plan: {e}")
            return
        self._plan(self._plan_seq, s)

    @work(thread=True, exclusive=True, group="plan")
    def _plan(self, seq: int, s: dict[str, Any]) -> None:
        from hanlin.finetune import plan_for

        device = self.app.session.device  # type: ignore[attr-defined]
        try:
            p = plan_for(self._model(), method=s["method"], seq_len=s["seq_len"], micro_batch=s["micro_batch"], lora_r=s["lora_r"],
                         device=device if device is not None else "auto")  # fmt: skip  (the chosen Device, not a re-probe)
            result, error = p, None
        except Exception as e:  # noqa: BLE001 - shown where the plan would be
            result, error = None, f"No plan: {e}"
        if not get_current_worker().is_cancelled:
            self.app.call_from_thread(self._show_plan, seq, result, error)

    def _show_plan(self, seq: int, plan: Any, error: str | None) -> None:
        if seq != self._plan_seq or not self.is_attached:
            return
        self.plan = plan
        self.query_one("#ft-plan", Static).update(error or plan.table())
        if self.run is None:  # once a run started here, the curve stays in view (Ctrl-L shows the plan)
            self.query_one("#ft-view", ContentSwitcher).current = "ft-plan-box"
            self._status(error or ("The plan fits: Ctrl-R starts." if plan.fits else "The plan does not fit this device's memory."))

    # -- start, cancel, resume -------------------------------------------------------------

    def on_button_pressed(self, event: Button.Pressed) -> None:
        {"start": self.action_start, "cancel": self.action_cancel, "resume": self.action_resume}[event.button.id or ""]()

    def action_start(self) -> None:
        self._launch(resume=False)

    def action_resume(self) -> None:
        self._launch(resume=True)

    def action_cancel(self) -> None:
        """First time: SIGTERM (a checkpoint is saved after the current step); again: kill."""
        run = self.run
        if run is None or not run.child.running:
            return
        if run.child.stop_asked:
            run.child.kill()
            self._status("killed; Resume continues from the last checkpoint saved, if any")
        else:
            run.child.terminate()
            self._status("stopping: the fine-tuner saves a checkpoint after the current step (Cancel again kills it)")
        self._set_buttons()

    def action_back(self) -> None:
        self.app.pop_screen()

    def action_toggle_view(self) -> None:
        view = self.query_one("#ft-view", ContentSwitcher)
        view.current = "ft-curve" if view.current == "ft-plan-box" else "ft-plan-box"

    def _active(self) -> bool:
        return self.run is not None and self.run.child.running

    def _launch(self, *, resume: bool) -> None:
        if self._active():
            self._message("a run is in progress: Cancel it first")
            return
        form = self._values()
        try:
            s = self._settings(form)
            if not form["out"]:
                raise ValueError("Output: give the run directory")
            run_dir = Path(form["out"]).expanduser().absolute()
            state, said = run_state(run_dir)
            if resume and state != "stopped":
                raise ValueError(f"nothing to resume: {run_dir} {said if state != 'new' else 'holds no run'}")
            if not resume and state == "stopped":
                raise ValueError(f"{run_dir} {said}, or choose another output directory to start anew")
            if not resume and state != "new":
                raise ValueError(f"{run_dir} {said}")
            data = Path(form["data"]).expanduser()
            if not form["data"]:
                raise ValueError("Data: give the JSONL file to train on")
            if not data.is_file():
                raise ValueError(f"data file {data} does not exist" if not data.exists() else f"data file {data} is not a file")
        except Exception as e:  # noqa: BLE001 - the form's mistake, shown beside it
            self._message(str(e))
            return
        device = self.app.session.device  # type: ignore[attr-defined]
        args = [sys.executable, "-m", "hanlin.apps.cli", "finetune", "--model", self._model(), "--data", str(data.absolute()),
                "--method", s["method"], "--out", str(run_dir), "--seq-len", str(s["seq_len"]), "--micro-batch", str(s["micro_batch"]),
                "--epochs", str(s["epochs"]), "--lora-r", str(s["lora_r"])]  # fmt: skip
        if device is not None:
            args += ["--device", device.spec()]
        if s["max_steps"] is not None:
            args += ["--max-steps", str(s["max_steps"])]
        if s["lr"] is not None:
            args += ["--lr", repr(s["lr"])]
        if resume:
            args.append("--resume")
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            child = ChildProcess(args, run_dir / RUN_LOG, append=True)
        except OSError as e:
            self._message(f"could not start `hanlin finetune`: {e}")
            return
        self.app.on_cleanup(lambda: child.stop(grace=3.0))  # type: ignore[attr-defined]
        self.run = _RUNS[self.app] = Run(child, run_dir, form)  # its tail reads log.jsonl from the start: the curve goes on
        self._message("")
        self.query_one("#ft-log", Static).update("")
        self.query_one("#ft-view", ContentSwitcher).current = "ft-curve"
        self._status(("resuming" if resume else "starting") + f" … (its output: {RUN_LOG} in the run directory)")
        self._set_buttons()
        self._describe_out()
        self._tick()

    # -- watching the run (a timer) ----------------------------------------------------------

    def _tick(self) -> None:
        run = self.run
        if run is None or self._finished_seen is run.child:
            return
        rc = run.child.poll()
        if run.tail.read():
            self._draw(run.tail.rows)
        if rc is not None:
            self._finished_seen = run.child
            self._finished(run, rc)
        elif run.tail.rows and not run.child.stop_asked:
            r = run.tail.rows[-1]
            val = f" · validation {r['val_loss']:.4f}" if r.get("val_loss") is not None else ""
            self._status(f"step {r['step']}/{r.get('total_steps', '?')} · loss {r['loss']:.4f}{val} · {r.get('tokens_per_s', 0):.0f} tokens/s")
        elif not run.child.stop_asked:
            last = run.child.tail(1)
            if last and not last.startswith("---"):
                self._status(f"starting: {last[:200]}")

    def _draw(self, rows: list[dict[str, Any]]) -> None:
        plot = self.query_one("#ft-curve")
        plt = plot.plt  # type: ignore[attr-defined]
        plt.clear_data()
        if rows:
            total = rows[-1].get("total_steps") or rows[-1]["step"]
            plt.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train", marker="braille")
            vals = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
            if vals:
                plt.scatter([s for s, _ in vals], [v for _, v in vals], label="validation")
            plt.xlim(1, max(2, total))
            bar = self.query_one("#ft-progress", ProgressBar)
            bar.update(total=total, progress=rows[-1]["step"])
        plot.refresh()

    def _finished(self, run: Run, rc: int) -> None:
        from hanlin.backends.torch.lora import RUN_FILE

        self._set_buttons()
        self._describe_out()
        try:
            info = json.loads((run.run_dir / RUN_FILE).read_text())
        except (OSError, ValueError):
            info = {}
        rows = run.tail.rows
        if rc == 0 and info.get("status") == "done":
            last = rows[-1] if rows else {}
            self._status(f"done: {info.get('steps')} steps, train loss {info.get('train_loss')}, validation loss "
                         f"{info.get('val_loss')}; saved in {run.run_dir} (chat with it: hanlin chat --model {run.run_dir})")  # fmt: skip
            if last:
                self.query_one("#ft-progress", ProgressBar).update(total=last.get("total_steps", last["step"]), progress=last["step"])
        elif rc == 0 and info.get("status") == "stopped":
            self._status(f"stopped at step {info.get('steps')} of {info.get('total_steps')} with a checkpoint: Resume (Ctrl-O) continues")
        elif run.child.stop_asked:
            self._status(f"killed (exit code {rc}): Resume continues from the last checkpoint, if one was saved")
        else:
            error = run.child.error_line()
            self._status(f"the fine-tune failed (exit code {rc})" + (f": {error}" if error else ""))
            self.query_one("#ft-log", Static).update(f"The end of {run.child.log_path}:\n\n{run.child.tail(15)}")
            self.query_one("#ft-view", ContentSwitcher).current = "ft-log-box"

    # -- small helpers -----------------------------------------------------------------------

    def _status(self, text: str) -> None:
        self.query_one("#ft-status", Static).update(text)

    def _message(self, text: str) -> None:
        self.query_one("#ft-message", Static).update(text)

    def _set_buttons(self) -> None:
        active = self._active()
        self.query_one("#start", Button).disabled = active
        self.query_one("#resume", Button).disabled = active
        self.query_one("#cancel", Button).disabled = not active
        self.query_one("#cancel", Button).label = "Kill" if active and self.run and self.run.child.stop_asked else "Cancel"


def _loss_plot():
    """The loss curve widget (textual-plotext), its axes labelled once."""
    from textual_plotext import PlotextPlot

    plot = PlotextPlot(id="ft-curve")
    plot.plt.title("loss")
    plot.plt.xlabel("step")
    return plot
