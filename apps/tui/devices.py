"""The device picker: what the device layer found, and which engines can run on each."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Static


def memory_text(dev) -> str:
    if dev.memory_total is None:
        return "unknown"
    free = f"{dev.memory_free / 2**30:.1f}" if dev.memory_free is not None else "?"
    return f"{free}/{dev.memory_total / 2**30:.1f} GiB"


class DeviceScreen(Screen):
    """Enter picks the highlighted device; the panel below says what runs there and why not."""

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("Pick a device (↑/↓, Enter)", classes="where")
        yield DataTable(id="devices", cursor_type="row", zebra_stripes=True)
        yield Static(id="detail", classes="detail")
        yield Static(id="notes", classes="hint")
        yield Footer()

    def on_mount(self) -> None:
        from hanlin.backends.base import engines_for

        self.sub_title = "Device"
        report = self.app.report  # type: ignore[attr-defined]
        self.devices = {dev.spec(): (dev, engines_for(dev)) for dev in report.devices}
        table = self.query_one(DataTable)
        # dtypes, features and why an engine cannot run are in the panel below (80 columns)
        table.add_columns("device", "name", "free / total", "engines that run here")
        for spec, (dev, runs) in self.devices.items():
            ok = [name for name, why in runs.items() if why == "ok"]
            table.add_row(spec, _short(dev.name or dev.kind, 22), memory_text(dev), " ".join(ok) or "none", key=spec)
        notes = [f"{kind}: none ({why})" for kind, why in report.notes.items()]
        self.query_one("#notes", Static).update("\n".join(notes))
        table.focus()
        if self.devices:
            self._show(next(iter(self.devices)))

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.row_key.value in self.devices:
            self._show(event.row_key.value)

    def _show(self, spec: str) -> None:
        dev, runs = self.devices[spec]
        lines = [dev.label(), "dtypes: " + ", ".join(dev.dtypes)]
        if dev.features:
            lines.append("features: " + " ".join(dev.features))
        for name, why in runs.items():
            lines.append(f"  {name:<9} {'can run here' if why == 'ok' else why}")
        self.query_one("#detail", Static).update("\n".join(lines))

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        self.app.session.device = self.devices[event.row_key.value][0]  # type: ignore[attr-defined]
        self.app.goto_models()  # type: ignore[attr-defined]


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"
