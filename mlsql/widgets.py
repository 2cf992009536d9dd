"""Live device telemetry in the notebook: ``mlsql.widgets.monitor('device')``.

An ipywidgets HTML panel that follows the agent's metrics stream (SSE) from a
background thread: per model version, requests, rows/s, errors, p50/p95/p99
latency and where the model really runs. ``.stop()`` ends it.
"""

from __future__ import annotations

import html
import threading


def _render(device: str, snap: dict) -> str:
    rows = []
    for m in snap.get("models", []):
        lat = m.get("latency") or {}
        fmt = lambda v: "–" if v is None else f"{v:.3g}"  # noqa: E731
        provs = ", ".join(p.replace("ExecutionProvider", "").lower() for p in m.get("providers") or [])
        state = "active" if m.get("active") else ("suspended" if m.get("suspended") else "")
        rows.append(
            f"<tr><td>{html.escape(str(m.get('model')))}@{m.get('version')}</td><td>{state}</td>"
            f"<td>{m.get('requests', 0)}</td><td>{fmt(m.get('throughput_rows_per_s'))}</td>"
            f"<td>{m.get('error_count', 0)}</td><td>{fmt(lat.get('p50_ms'))}</td><td>{fmt(lat.get('p95_ms'))}</td>"
            f"<td>{fmt(lat.get('p99_ms'))}</td><td>{html.escape(provs)}</td></tr>")
    events = snap.get("events") or []
    last = "".join(f"<li>{html.escape(str(e.get('kind')))}: {html.escape(str(e.get('model', '')))}"
                   f" {html.escape(str(e.get('reason', '') or ''))}</li>" for e in events[-3:])
    head = ("<tr><th>model</th><th></th><th>requests</th><th>rows/s</th><th>errors</th><th>p50 ms</th>"
            "<th>p95 ms</th><th>p99 ms</th><th>providers</th></tr>")
    return (f"<b>device {html.escape(device)}</b><table>{head}{''.join(rows) or '<tr><td>no traffic yet</td></tr>'}"
            f"</table>{'<ul>' + last + '</ul>' if last else ''}")


class DeviceMonitor:
    def __init__(self, device, interval: float = 1.0):
        import ipywidgets

        from .deploy import client_for

        self.device = device
        self.widget = ipywidgets.HTML(value=f"<b>device {html.escape(device.name)}</b>: connecting…")
        self._client = client_for(device, timeout=max(10.0, interval * 5))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    def _run(self, interval: float) -> None:
        try:
            for snap in self._client.stream(interval=interval):
                if self._stop.is_set():
                    break
                self.widget.value = _render(self.device.name, snap)
        except Exception as exc:  # the device went away: say so in the panel
            if not self._stop.is_set():
                self.widget.value = f"<b>device {html.escape(self.device.name)}</b>: disconnected ({html.escape(str(exc))})"

    def stop(self) -> None:
        self._stop.set()
        self._client.close()

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)


def monitor(device: str, workspace=None, interval: float = 1.0) -> DeviceMonitor:
    """A live panel for ``device`` (a name from CREATE DEVICE in ``workspace``, default MLSQL_HOME)."""
    from .devices import DeviceStore
    from .workspace import Workspace

    return DeviceMonitor(DeviceStore(Workspace.open(workspace).devices_path).get(device), interval)
