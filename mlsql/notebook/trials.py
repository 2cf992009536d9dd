"""``mlsql.plot_trials('m')``: a tuned model's charts again (the objective by trial, and each numeric
hyperparameter against the objective), as ``CREATE MODEL ... num_trials`` drew them."""

from __future__ import annotations

import re

from mlsql.errors import MLSQLError

_REF = re.compile(r"^[A-Za-z_][\w.]*(@\w+)?$")


def plot_trials(model: str, workspace: str | None = None, session=None):
    """The trials charts of tuned model ``model`` ('m', 'm@3' or 'm@alias'), read with ML.TRIAL_INFO
    in ``session``, else the notebook's %%mlsql session for ``workspace``, else a new session on it."""
    if not isinstance(model, str) or not _REF.match(model.strip()):
        raise MLSQLError(f"plot_trials: {model!r} is not a model name",
                         hint="Give a name, name@version or name@alias: mlsql.plot_trials('churn').")
    s = session or _notebook_session(workspace)
    if s is None:
        import mlsql

        s = mlsql.connect(workspace)
    r = s.sql(f"SELECT * FROM ML.TRIAL_INFO(MODEL {model.strip()})")
    from mlsql.output.plots import Charts

    return Charts(list(r.plots))


def _notebook_session(workspace):
    """The %%mlsql magic's session for ``workspace`` in this IPython, if the magic is loaded."""
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython is a dependency
        return None
    ip = get_ipython()
    magic = ip.magics_manager.registry.get("MLSQLMagic") if ip is not None else None
    return magic.session(workspace) if magic is not None else None
