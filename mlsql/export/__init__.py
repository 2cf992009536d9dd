"""Export a trained model to one ONNX graph that takes the raw columns a device has: the graph
(``graph``, with TRANSFORM compiled by ``sqlexpr`` and trees by ``trees``), its quantization
(``quantize``), the export with its parity checks and report (``parity``) and the signed device
package (``package``). This module is their face: what the rest of MLSQL imports.

raw inputs (by name: double with NaN for NULL, string with '' for NULL, bool)
  → TRANSFORM, compiled from its fitted SQL          (stage "pre")
  → the automatic encoding (mean fill, LabelEncoder, one-hot)
  → the estimator: trees (TreeEnsemble or tensor form), linear, MLP   (stage "est")
  → outputs ``predicted_<label>`` and, for classifiers, ``predicted_<label>_probs`` [N, k]

Quantization (int8 dynamic, int8 static QDQ, fp16) touches only the estimator's
MatMuls; the TRANSFORM and encoding stay exact. Every export ends with a parity
report against the native model, and fails when fp32 parity breaks.
"""

from __future__ import annotations

from mlsql.export.graph import build_graph, feeds, input_kind
from mlsql.export.package import build_device_package
from mlsql.export.parity import PARITY_TOL, ExportResult, ParityReport, export_model, ort_session
from mlsql.export.quantize import TREE_EXACT, QuantSettings, quantization_candidates, quantize
from mlsql.language.options import options_of, validate

EXPORT_OPTIONS = tuple(o.name for o in options_of("EXPORT MODEL"))  # declared in mlsql.language.options

__all__ = ["EXPORT_OPTIONS", "PARITY_TOL", "TREE_EXACT", "ExportResult", "ParityReport", "QuantSettings",
           "build_device_package", "build_graph", "export_model", "feeds", "input_kind", "ort_session",
           "quantization_candidates", "quantize", "resolve_export_options"]


def resolve_export_options(raw: dict) -> dict:
    """EXPORT MODEL's options, checked by ``mlsql.language.options``' table, every default filled in."""
    return validate("EXPORT MODEL", raw, defaults=True)
