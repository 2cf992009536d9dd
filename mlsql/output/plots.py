"""Charts beside a result: ROC curve, confusion matrix, bar charts, loss curves.

Rendered with matplotlib into PNG, shown through IPython display bundles
(``{'image/png': ..., 'text/plain': <summary>}``): a PNG is kept in the saved
notebook, so it shows in JupyterLab, in exported HTML, after nbconvert and in a
reopened notebook alike, with no front-end extension and no kernel; the text
summary is there wherever images are not. matplotlib is imported only when a
chart is drawn, and drawn on its own Agg canvas: the user's pyplot backend and
figures are never touched.

Each panel keeps the numbers it draws (``RocPanel.curves``, ``BarPanel.values``,
...), so tests and users can read them from ``result.plots``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np

from mlsql.ml.metrics import RocCurve

MAX_BARS = 20
PANEL_W, PANEL_H, DPI = 4.4, 3.4, 100


@dataclass
class RocPanel:
    """ROC curve(s) of a classifier, with their AUC."""

    curves: list[RocCurve]
    kind: str = "roc"

    def summary(self) -> str:
        parts = [(f"'{c.label}' " if c.label else "") + f"AUC {c.auc:.4f}" for c in self.curves]
        what = "ROC curve" if len(self.curves) == 1 else "ROC curves (one class vs the rest)"
        return f"{what}: " + ", ".join(parts)

    def draw(self, ax) -> None:
        for c in self.curves:
            ax.plot(c.false_positive_rate, c.true_positive_rate, lw=1.6,
                    label=f"{c.label} (AUC {c.auc:.3f})" if len(self.curves) > 1 else f"AUC {c.auc:.3f}")
        ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="#999")
        ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate", ylabel="true positive rate (recall)",
               title="ROC curve")
        ax.legend(loc="lower right", fontsize=8)


@dataclass
class ConfusionPanel:
    """Counts of expected (rows) by predicted (columns) class."""

    classes: list
    counts: np.ndarray
    kind: str = "confusion"

    def summary(self) -> str:
        from mlsql.output.formats import format_table

        names = [str(c) for c in self.classes]
        rows = [(n, *map(int, r)) for n, r in zip(names, self.counts)]
        return ("Confusion matrix (rows: expected, columns: predicted)\n"
                + format_table(["expected \\ predicted", *names], rows))

    def draw(self, ax) -> None:
        k = len(self.classes)
        ax.imshow(self.counts, cmap="Blues")
        names = [str(c) for c in self.classes]
        ax.set_xticks(range(k), names, rotation=30 if k > 3 else 0, ha="right" if k > 3 else "center", fontsize=8)
        ax.set_yticks(range(k), names, fontsize=8)
        ax.set(xlabel="predicted", ylabel="expected", title="Confusion matrix")
        if k <= 12:
            hi = self.counts.max() or 1
            for i in range(k):
                for j in range(k):
                    v = int(self.counts[i, j])
                    ax.text(j, i, f"{v:,}", ha="center", va="center", fontsize=8,
                            color="white" if v > hi * 0.6 else "black")


@dataclass
class BarPanel:
    """Horizontal bars, largest on top (feature importance, attributions)."""

    title: str
    names: list[str]
    values: np.ndarray
    xlabel: str = ""
    kind: str = "bars"

    def summary(self) -> str:
        from mlsql.output.formats import format_number

        shown = ", ".join(f"{n} {format_number(float(v))}" for n, v in zip(self.names[:10], self.values[:10]))
        more = f" (+{len(self.names) - 10} more)" if len(self.names) > 10 else ""
        return f"{self.title}: {shown}{more}"

    def draw(self, ax) -> None:
        n = min(len(self.names), MAX_BARS)
        vals = self.values[:n][::-1]
        colors = np.where(vals >= 0, "#4c78a8", "#e45756")
        ax.barh(np.arange(n), vals, color=colors)
        ax.set_yticks(np.arange(n), [str(x) for x in self.names[:n]][::-1], fontsize=8)
        ax.set_xlabel(self.xlabel)
        ax.set_title(self.title, fontsize=10)
        ax.axvline(0, color="#666", lw=0.6)

    def height(self) -> float:
        return max(PANEL_H, 0.24 * min(len(self.names), MAX_BARS) + 1.2)


@dataclass
class LossPanel:
    """Loss by iteration, one line per evaluation set (training rows, held-out rows)."""

    iterations: np.ndarray
    series: dict[str, np.ndarray] = field(default_factory=dict)
    title: str = "Loss by iteration"
    kind: str = "loss"

    def summary(self) -> str:
        from mlsql.output.formats import format_number

        if not len(self.iterations):
            return f"{self.title}: no iterations"
        parts = []
        for name, ys in self.series.items():
            ok = ys[np.isfinite(ys)]
            if len(ok):
                parts.append(f"{name} {format_number(float(ok[0]))} → {format_number(float(ok[-1]))}")
        return f"{self.title}: " + ", ".join(parts) + f" over {len(self.iterations)} iterations"

    def draw(self, ax) -> None:
        for name, ys in self.series.items():
            ok = np.isfinite(ys)
            if ok.any():
                ax.plot(self.iterations[ok], ys[ok], marker="o" if ok.sum() < 30 else None, ms=3, lw=1.5,
                        label=name)
        ax.set(xlabel="iteration", ylabel="loss", title=self.title)
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # iterations are whole
        if self.series:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)


@dataclass
class ScatterPanel:
    """A tuning's trials: the objective by trial (with the best so far), or one hyperparameter
    against the objective; the optimal trial marked."""

    xs: np.ndarray
    ys: np.ndarray
    optimal: int  # index of the optimal trial in xs/ys, -1 if none
    xlabel: str
    ylabel: str
    title: str
    best_so_far: np.ndarray | None = None
    log_x: bool = False
    kind: str = "scatter"

    def summary(self) -> str:
        from mlsql.output.formats import format_number

        ok = np.isfinite(self.ys)
        if not ok.any():
            return f"{self.title}: no finished trials"
        best = format_number(float(self.ys[self.optimal])) if self.optimal >= 0 else "—"
        return f"{self.title}: {int(ok.sum())} trials, optimal {self.ylabel} {best}"

    def draw(self, ax) -> None:
        ok = np.isfinite(self.ys)
        ax.scatter(self.xs[ok], self.ys[ok], s=18, alpha=0.8, label="trial")
        if self.best_so_far is not None:
            ax.step(self.xs, self.best_so_far, where="post", lw=1.2, label="best so far")
        if self.optimal >= 0:
            ax.scatter([self.xs[self.optimal]], [self.ys[self.optimal]], s=80, marker="*", color="#c62828",
                       label="optimal", zorder=3)
        if self.log_x:
            ax.set_xscale("log")
        ax.set(xlabel=self.xlabel, ylabel=self.ylabel, title=self.title)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)


Panel = RocPanel | ConfusionPanel | BarPanel | LossPanel | ScatterPanel


# -- building panels from what ML functions return ------------------------------------------------
def evaluation_panels(ev) -> list:
    """ROC curve(s) and confusion matrix of a classifier's :class:`~mlsql.ml.metrics.Evaluation`."""
    out: list = []
    if ev is None:
        return out
    if ev.roc:
        out.append(RocPanel(list(ev.roc)))
    if ev.confusion is not None:
        out.append(ConfusionPanel(list(ev.classes), np.asarray(ev.confusion)))
    return out


def importance_panel(table) -> BarPanel | None:
    """Bars of ``ML.FEATURE_IMPORTANCE``'s importance_gain, largest first."""
    if "importance_gain" not in table.column_names or table.num_rows == 0:
        return None
    vals = table.column("importance_gain").to_numpy(zero_copy_only=False).astype(np.float64)
    names = table.column("feature").to_pylist()
    order = np.argsort(-vals, kind="stable")
    return BarPanel("Feature importance (total gain)", [names[i] for i in order], vals[order], "importance_gain")


def attribution_panel(table) -> BarPanel | None:
    """``ML.EXPLAIN_PREDICT``: one row's signed attributions, or the mean |attribution| over many rows."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if "top_feature_attributions" not in table.column_names or table.num_rows == 0:
        return None
    col = table.column("top_feature_attributions").combine_chunks()
    flat = pc.list_flatten(col)
    if len(flat) == 0:
        return None
    feat, attr = pc.struct_field(flat, "feature"), pc.struct_field(flat, "attribution")
    if table.num_rows == 1:
        vals = attr.to_numpy(zero_copy_only=False).astype(np.float64)
        order = np.argsort(-np.abs(vals), kind="stable")
        return BarPanel("Attributions of this row", [feat.to_pylist()[i] for i in order], vals[order],
                        "attribution")
    g = pa.table({"feature": feat, "a": pc.abs(attr)}).group_by("feature").aggregate([("a", "mean")])
    vals = g.column("a_mean").to_numpy(zero_copy_only=False).astype(np.float64)
    names = g.column("feature").to_pylist()
    order = np.argsort(-vals, kind="stable")
    return BarPanel(f"Mean |attribution| over {table.num_rows:,} rows",
                    [names[i] for i in order], vals[order], "mean |attribution|")


def roc_table_panel(table) -> RocPanel | None:
    """``ML.ROC_CURVE``'s points (false_positive_rate, recall at score quantiles), area by trapezoids."""
    if not {"false_positive_rate", "recall", "threshold"} <= set(table.column_names) or table.num_rows == 0:
        return None
    fpr = np.r_[0.0, table.column("false_positive_rate").to_numpy(zero_copy_only=False).astype(np.float64), 1.0]
    tpr = np.r_[0.0, table.column("recall").to_numpy(zero_copy_only=False).astype(np.float64), 1.0]
    thr = np.r_[np.inf, table.column("threshold").to_numpy(zero_copy_only=False).astype(np.float64), -np.inf]
    order = np.lexsort((tpr, fpr))
    fpr, tpr, thr = fpr[order], tpr[order], thr[order]
    return RocPanel([RocCurve("", fpr, tpr, thr, float(np.trapezoid(tpr, fpr)))])


def confusion_table_panel(table) -> ConfusionPanel | None:
    """``ML.CONFUSION_MATRIX``: expected_label, then one count column per predicted class."""
    if "expected_label" not in table.column_names or table.num_rows == 0:
        return None
    classes = table.column("expected_label").to_pylist()
    counts = np.column_stack([table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names[1:]])
    return ConfusionPanel(classes, counts.astype(np.int64))


def loss_panel(training_info, title: str = "Loss by iteration") -> LossPanel | None:
    """``ML.TRAINING_INFO`` (iteration, loss, eval_loss) as a curve per evaluation set."""
    cols = training_info.column_names
    if "iteration" not in cols or "loss" not in cols or training_info.num_rows == 0:
        return None
    it = training_info.column("iteration").to_numpy(zero_copy_only=False).astype(np.float64)
    series = {}
    for name, label in (("loss", "training rows"), ("eval_loss", "evaluation rows")):
        if name in cols:
            ys = training_info.column(name).cast("float64").to_numpy(zero_copy_only=False)
            if np.isfinite(ys).any():
                series[label] = ys
    return LossPanel(it, series, title)


def trials_panels(data: dict) -> list:
    """A tuning's trials ({'trials': rows as ML.TRIAL_INFO, 'objective': name}): the objective by
    trial, then each numeric hyperparameter against the objective (at most 3 charts of them)."""
    trials, objective = data["trials"], data["objective"]
    if not trials:
        return []
    ys = np.array([(r.get("hparam_tuning_evaluation_metrics") or {}).get(objective) for r in trials], float)
    ids = np.array([r["trial_id"] for r in trials], float)
    optimal = next((i for i, r in enumerate(trials) if r.get("is_optimal")), -1)
    minimize = objective in ("mean_absolute_error", "mean_squared_error", "mean_squared_log_error",
                             "median_absolute_error", "log_loss")
    filled = np.where(np.isfinite(ys), ys, np.inf if minimize else -np.inf)
    best = np.minimum.accumulate(filled) if minimize else np.maximum.accumulate(filled)
    best = np.where(np.isfinite(best), best, np.nan)
    out: list = [ScatterPanel(ids, ys, optimal, "trial", objective, f"{objective} by trial", best)]
    names = sorted({k for r in trials for k, v in (r.get("hyperparameters") or {}).items()
                    if isinstance(v, int | float) and not isinstance(v, bool)})
    for name in names[:3]:
        xs = np.array([(r.get("hyperparameters") or {}).get(name, np.nan) for r in trials], float)
        pos = xs[np.isfinite(xs)]
        log = bool(len(pos)) and pos.min() > 0 and pos.max() / pos.min() > 100
        out.append(ScatterPanel(xs, ys, optimal, name, objective, f"{objective} against {name}", log_x=log))
    return out


def compare_panels(data: dict) -> list:
    """``ML.COMPARE_MODELS`` ({'table': its rows, best first; 'metrics': the metrics to chart;
    'roc': (model, Evaluation) pairs}): one bar chart per metric, a bar per model, and the ROC curves
    of binary classifiers in one chart."""
    table, out = data["table"], []
    models = [str(m) for m in table.column("model").to_pylist()]
    for metric in data["metrics"]:
        if metric in table.column_names:
            vals = table.column(metric).to_numpy(zero_copy_only=False).astype(np.float64)
            out.append(BarPanel(f"{metric} by model", models, vals, metric))
    curves = [RocCurve(name, ev.roc[0].false_positive_rate, ev.roc[0].true_positive_rate, ev.roc[0].thresholds,
                       ev.roc[0].auc) for name, ev in data.get("roc") or [] if ev is not None and len(ev.roc) == 1]
    if len(curves) > 1:
        out.append(RocPanel(curves))
    return out


def panels(kind: str, data) -> list:
    """The charts of one kind of ML output: 'evaluation' (an Evaluation), 'importance',
    'attribution', 'loss', 'roc_table' or 'confusion_table' (the function's Arrow table)."""
    if kind == "evaluation":
        return evaluation_panels(data)
    if kind == "trials":
        return trials_panels(data)
    if kind == "compare":
        return compare_panels(data)
    made = {"importance": importance_panel, "attribution": attribution_panel, "loss": loss_panel,
            "roc_table": roc_table_panel, "confusion_table": confusion_table_panel}[kind](data)
    return [made] if made is not None else []


# -- rendering -------------------------------------------------------------------------------------
def render_png(panels: list) -> bytes:
    """The panels side by side in one PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(panels)
    h = max([PANEL_H] + [p.height() for p in panels if hasattr(p, "height")])
    fig = Figure(figsize=(PANEL_W * n + (1.2 if any(p.kind == "bars" for p in panels) else 0), h), dpi=DPI,
                 layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, n, squeeze=False)[0]
    for p, ax in zip(panels, axes):
        p.draw(ax)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def summary(panels: list) -> str:
    return "\n".join(p.summary() for p in panels)


def bundle(panels: list) -> dict:
    """The display bundle: the PNG and its text summary (shown where images are not)."""
    return {"image/png": render_png(panels), "text/plain": summary(panels)}


@dataclass
class Charts:
    """Panels shown on their own (``mlsql.plot_trials``): the PNG in a notebook, the summary elsewhere."""

    panels: list

    def _repr_mimebundle_(self, include=None, exclude=None) -> dict:
        return bundle(self.panels) if self.panels else {"text/plain": "(no charts)"}

    def __repr__(self) -> str:
        return summary(self.panels) or "(no charts)"
