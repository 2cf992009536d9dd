"""What a notebook shows while a model trains: a progress bar with a live loss curve beside it.

``session.progress`` is a factory ``(title, total) -> reporter``; trainers call
``reporter.update(iteration, total, row)`` after each iteration (``row``: the
TRAINING_INFO row, plus ``stopped`` = the reason on the last call of an early
stop) and the session calls ``reporter.close()`` when training ends, normally or
not. In a notebook's kernel the bar and the curve are ipywidgets, redrawn at most
a few times a second; when training ends they are closed and replaced, through
their display handle, by one plain line (text and HTML) saying how it ended, so
a saved notebook holds no widget that could show "model not found" when reopened.
Elsewhere (a terminal, the CLI) it is a text bar and no live chart; the final
curve comes with the CREATE MODEL result in every front end.
"""

from __future__ import annotations

import html
import sys
import time

BAR_EVERY_S = 0.1  # redraw the bar at most this often
CURVE_EVERY_S = 0.5  # and the loss curve (a PNG) at most this often,
CURVE_SHARE = 0.1  # and so that drawing it takes at most this share of the training's time
CURVE_AFTER_S = 0.8  # a training that ends sooner never needs a live chart


def in_kernel() -> bool:
    """Whether we run in a Jupyter kernel (a front end that can show widgets and images)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    return type(get_ipython()).__name__ == "ZMQInteractiveShell"


class TrainingProgress:
    """A reporter for one training run (see the module docstring)."""

    def __init__(self, title: str, total: int = 0, *, live_plot: bool = True):
        self.title = title
        self.total = total
        self.live_plot = live_plot
        self.iteration = 0
        self.rows: list[dict] = []
        self.stopped: str | None = None
        self.t0 = time.perf_counter()
        self._last_bar = self._last_curve = 0.0
        self._curve_s = 0.0
        self._view = None  # _WidgetView or _TextView, made on the first update

    def update(self, iteration: int, total: int, metrics: dict | None = None) -> None:
        self.iteration, self.total = iteration, total or self.total
        row = dict(metrics or {})
        if row.get("stopped"):
            reason = str(row.pop("stopped"))
            if not total or iteration < total:  # a stop on the last iteration is no early stop
                self.stopped = reason
        elif row:
            self.rows.append(row)
        if self._view is None:
            self._view = _WidgetView(self) if in_kernel() and _has_widgets() else _TextView(self)
        now = time.perf_counter()
        last = bool(self.total) and iteration >= self.total or self.stopped is not None
        if last or now - self._last_bar >= BAR_EVERY_S:
            self._last_bar = now
            self._view.bar()
        wait = max(CURVE_EVERY_S, self._curve_s / CURVE_SHARE)
        if self.live_plot and now - self.t0 >= CURVE_AFTER_S and now - self._last_curve >= wait and len(self.rows) >= 2:
            self._view.curve()
            self._last_curve = time.perf_counter()
            self._curve_s = self._last_curve - now  # what one drawing costs here

    def close(self) -> None:
        """End the display: one line saying how training ended (an exception in flight means it failed)."""
        failed = sys.exc_info()[0]
        if self._view is not None:
            self._view.finish(self.outcome(failed), failed is None)

    def outcome(self, failed=None) -> str:
        secs = time.perf_counter() - self.t0
        name = self.title.removeprefix("Training ")
        where = f"{self.iteration}/{self.total}" if self.total else str(self.iteration)
        if failed is not None:
            why = "interrupted" if issubclass(failed, KeyboardInterrupt) else "failed"
            return (f"Training {name} {why} at iteration {where} after {secs:.1f} s; "
                    "nothing was registered")
        losses = ""
        if self.rows:
            last = self.rows[-1]
            shown = [f"{k} {last[k]:.4g}" for k in ("loss", "eval_loss", "best") if isinstance(last.get(k), (int, float))]
            losses = f" · {', '.join(shown)}" if shown else ""
        if self.stopped:
            unit = "epoch" if self.stopped.endswith("epoch") else "iteration"
            return f"Trained {name}: stopped early at {unit} {where}: {self.stopped} ({secs:.1f} s){losses}"
        return f"Trained {name}: {where} iterations in {secs:.1f} s{losses}"


def _has_widgets() -> bool:
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    return True


class _TextView:
    """tqdm's text bar on stderr (terminals, the CLI): no chart."""

    def __init__(self, p: TrainingProgress):
        from tqdm.std import tqdm

        self.p = p
        self.bar_ = tqdm(total=p.total or None, desc=p.title, unit="iter", leave=True, file=sys.stderr)

    def bar(self) -> None:
        self.bar_.n = self.p.iteration
        if self.p.total and self.bar_.total != self.p.total:
            self.bar_.total = self.p.total
        if self.p.rows:
            self.bar_.set_postfix({k: f"{v:.4g}" for k, v in self.p.rows[-1].items()
                                   if k in ("loss", "eval_loss", "best") and isinstance(v, (int, float))}, refresh=False)
        self.bar_.refresh()

    def curve(self) -> None:
        pass

    def finish(self, line: str, ok: bool) -> None:
        if ok:  # an early stop is a finished run: the bar ends full, not short of its total
            self.bar_.total = self.bar_.n = self.p.iteration
        self.bar_.close()
        print(line, file=sys.stderr, flush=True)


class _WidgetView:
    """ipywidgets: bar, status line and live loss curve; replaced by one static line at the end."""

    def __init__(self, p: TrainingProgress):
        import ipywidgets as W
        from IPython.display import display

        self.p = p
        self.progress = W.IntProgress(value=0, min=0, max=max(p.total, 1), layout=W.Layout(width="260px"))
        self.label = W.HTML(f"<b>{html.escape(p.title)}</b>")
        self.status = W.HTML("")
        self.image = W.Image(format="png", layout=W.Layout(width="360px", display="none"))
        left = W.VBox([self.label, W.HBox([self.progress, self.status])])
        self.box = W.HBox([left, self.image], layout=W.Layout(align_items="center", grid_gap="16px"))
        self.handle = display(self.box, display_id=True)

    def bar(self) -> None:
        p = self.p
        with self.box.hold_sync():
            if p.total and self.progress.max != p.total:
                self.progress.max = p.total
            self.progress.value = p.iteration
            last = p.rows[-1] if p.rows else {}
            shown = " ".join(f"{k} {last[k]:.4g}" for k in ("loss", "eval_loss", "best")
                             if isinstance(last.get(k), (int, float)))
            where = f"{p.iteration}/{p.total}" if p.total else str(p.iteration)
            self.status.value = f"<span style='font-size:90%'>{where} · {html.escape(shown)}</span>"

    def curve(self) -> None:
        import numpy as np

        from mlsql.output import plots

        rows = self.p.rows
        series = {}
        for key, label in (("loss", "training rows"), ("eval_loss", "evaluation rows"), ("best", "best trial so far")):
            ys = np.array([r.get(key) if isinstance(r.get(key), (int, float)) else np.nan for r in rows], float)
            if np.isfinite(ys).any():
                series[label] = ys
        panel = plots.LossPanel(np.arange(1, len(rows) + 1, dtype=float), series, self.p.title)
        self.image.value = plots.render_png([panel])
        self.image.layout.display = ""

    def finish(self, line: str, ok: bool) -> None:
        color = "#2e7d32" if ok else "#c62828"
        mark = "✔" if ok else "✖"
        bundle = {"text/plain": f"{mark} {line}",
                  "text/html": f"<div style='color:{color}'>{mark} {html.escape(line)}</div>"}
        # the display now holds this line, not the widget: nothing to find when the notebook is reopened
        self.handle.update(bundle, raw=True)
        _close(self.box)


def _close(widget) -> None:
    for child in getattr(widget, "children", ()):
        _close(child)
    widget.close()
