"""An experiment in the notebook: ``mlsql.experiment_monitor('e')`` (``ExperimentMonitor``, an anywidget).

A background thread reads the experiment's readout (``ML.EXPERIMENT_RESULTS``' rows, computed by
:func:`mlsql.runtime.steps.experiments.results_table`, which reads the devices or the hub, not the
SQL engine, so the kernel's own statements are not disturbed) every ``interval`` seconds and sets
the traits in one batch. The front end (``static/experiment.js``, inline SVG, no network) shows the
arms side by side (each metric's value, interval, difference to the control, p-value, samples
still needed), the primary metric over time with its confidence band per arm, the sample-ratio
flag, and a Promote button per arm. The button sends ``{"promote": "m@v"}``; the kernel runs
``STOP EXPERIMENT e PROMOTE 'm@v'`` through the session (the same statement a cell or a job would
run) and shows its message or its error in ``promote_result``.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import anywidget
import traitlets

STATIC = Path(__file__).parent.parent / "static"


class ExperimentMonitor(anywidget.AnyWidget):
    _esm = STATIC / "experiment.js"
    _css = STATIC / "monitor.css"

    experiment = traitlets.Unicode("").tag(sync=True)
    status = traitlets.Unicode("connecting").tag(sync=True)  # connecting | running | stopped | error
    error = traitlets.Unicode("").tag(sync=True)
    primary_metric = traitlets.Unicode("").tag(sync=True)
    arms = traitlets.List().tag(sync=True)  # [{arm, model, metrics: {metric: {...readout row...}}}]
    history = traitlets.List().tag(sync=True)  # [[t, arm, value, ci_low, ci_high, n]] of the primary metric
    trustworthy = traitlets.Bool(True).tag(sync=True)
    srm_p_value = traitlets.Float(None, allow_none=True).tag(sync=True)
    updated = traitlets.Float(0.0).tag(sync=True)
    promote_result = traitlets.Unicode("").tag(sync=True)

    def __init__(self, session, experiment: str, interval: float = 5.0, history: int = 500):
        from mlsql.errors import MLSQLError

        if not (isinstance(interval, int | float) and 0.25 <= interval <= 3600):
            raise MLSQLError(
                f"experiment monitor interval must be between 0.25 and 3600 seconds, got {interval!r}"
            )
        from mlsql.deploy.experiments import store_of

        store_of(session.workspace).get(experiment)  # an unknown name fails here, with the known ones
        super().__init__(experiment=experiment)
        self.session = session
        self.interval = float(interval)
        self._max_history = int(history)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.on_msg(self._on_message)
        self._thread = threading.Thread(target=self._run, name=f"mlsql-experiment-{experiment}", daemon=True)
        self._thread.start()

    def refresh(self) -> None:
        """Read the readout now and update the view."""
        from mlsql.runtime.steps.experiments import results_table
        from mlsql.runtime.steps.ml_functions import load_model

        rows = results_table(self.session, self.experiment, load_model).to_pylist()
        with self._lock:
            self._apply(rows, time.time())

    def _apply(self, rows: list[dict], t: float) -> None:
        arms: dict[str, dict] = {}
        primary = ""
        for r in rows:
            a = arms.setdefault(r["arm"], {"arm": r["arm"], "model": r["model"], "metrics": {}})
            a["metrics"][r["metric"]] = {
                k: r[k]
                for k in (
                    "test",
                    "n",
                    "value",
                    "ci_low",
                    "ci_high",
                    "delta_vs_control",
                    "delta_ci_low",
                    "delta_ci_high",
                    "relative_delta",
                    "p_value",
                    "significant",
                    "better",
                    "samples_needed",
                    "assigned",
                )
            }
            if r["is_primary"]:
                primary = r["metric"]
        points = [
            [t, r["arm"], r["value"], r["ci_low"], r["ci_high"], r["n"]] for r in rows if r["is_primary"]
        ]
        status = rows[0]["status"] if rows else "running"
        history = list(self.history)
        if status == "running" or not history:  # a stopped experiment's readout does not move
            history = (history + points)[-self._max_history :]
        with self.hold_sync():
            self.arms = list(arms.values())
            self.primary_metric = primary
            self.history = history
            self.trustworthy = bool(rows[0]["trustworthy"]) if rows else True
            self.srm_p_value = rows[0]["srm_p_value"] if rows else None
            self.status = status
            self.error = ""
            self.updated = t

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh()
            except Exception as exc:  # noqa: BLE001 - shown in the panel; the next poll tries again
                self.error = (getattr(exc, "message", None) or str(exc) or type(exc).__name__)[:500]
            if self.status == "stopped":
                break
            self._stop.wait(self.interval)

    def _on_message(self, _widget, content, _buffers) -> None:
        model = content.get("promote") if isinstance(content, dict) else None
        if not isinstance(model, str):
            return
        self.promote(model)

    def promote(self, model: str) -> str:
        """``STOP EXPERIMENT e PROMOTE 'model'``, as the button runs it; its message (or error) is shown."""
        ref = model.replace("'", "''")
        try:
            r = self.session.sql(f"STOP EXPERIMENT {self.experiment} PROMOTE '{ref}'")
            self.promote_result = r.message or f"Promoted {model}"
        except Exception as exc:  # noqa: BLE001 - the panel shows why
            self.promote_result = f"Promote {model} failed: {getattr(exc, 'message', None) or exc}"
        try:
            self.refresh()
        except Exception:  # noqa: BLE001
            pass
        return self.promote_result

    def stop(self) -> None:
        self._stop.set()


def experiment_monitor(experiment: str, session=None, interval: float = 5.0) -> ExperimentMonitor:
    """A live panel for experiment ``experiment``: ``session`` (default: a new one on MLSQL_HOME)
    reads it and runs the Promote button's statement."""
    if session is None:
        import mlsql

        session = mlsql.connect()
    return ExperimentMonitor(session, experiment, interval=interval)
