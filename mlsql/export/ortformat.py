"""``EXPORT MODEL m OPTIONS (format = 'ort')``: the exported graph in ONNX Runtime's ORT format, with
ONNX Runtime's graph optimizations applied offline (what its converter, ``convert_onnx_models_to_ort``,
does), so a runtime loads it without optimizing it again; and the load-time and size change measured
on this machine.

The optimization level is 'extended', not 'all': 'all' adds layout transformations (NCHWc) chosen
for this machine's CPU, which a device with another CPU or provider could not use."""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from mlsql.errors import ExportError

LOAD_REPEATS = 7  # session creations timed for each form; the median is reported


@dataclass
class OrtFormatReport:
    path: str
    size_bytes: int
    size_bytes_onnx: int
    load_ms: float
    load_ms_onnx: float

    def to_dict(self) -> dict:
        return asdict(self)


def _load_ms(data: bytes, optimize: bool) -> float:
    import onnxruntime as ort

    times = []
    for _ in range(LOAD_REPEATS):
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if not optimize:  # an ORT file is already optimized: what a runtime loading it does
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        t0 = time.perf_counter()
        ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
        times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times)


def to_ort_format(onnx_bytes: bytes, out_path: Path) -> OrtFormatReport:
    """Write ``onnx_bytes`` as an optimized ORT-format file at ``out_path``; measure both forms' load."""
    import onnxruntime as ort

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mlsql-ort-") as tmp:
        dst = Path(tmp) / "model.ort"
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(dst)
        so.add_session_config_entry("session.save_model_format", "ORT")
        try:
            ort.InferenceSession(onnx_bytes, so, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ExportError(f"ONNX Runtime could not write the ORT format: {str(exc).splitlines()[0]}") from None
        data = dst.read_bytes()
    tmp_out = out_path.with_suffix(out_path.suffix + ".tmp")
    tmp_out.write_bytes(data)
    tmp_out.replace(out_path)
    return OrtFormatReport(str(out_path), len(data), len(onnx_bytes), _load_ms(data, optimize=False),
                           _load_ms(onnx_bytes, optimize=True))
