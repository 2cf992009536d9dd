"""Quantization of an exported graph (int8 dynamic, int8 static QDQ, fp16) with ONNX Runtime's
quantizer: only the estimator's MatMuls; the TRANSFORM, the encoding and the trees' thresholds stay
exact. ``quantization_candidates`` lists the settings tried in turn, most compact first."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlsql.errors import ExportError

log = logging.getLogger(__name__)

# Initializers that decide which branch a row takes (split thresholds) or what a tree adds
# (leaf values, the base score): kept in float32 by every quantize mode. A threshold in
# fp16 or int8 sends rows down the other branch; the structure matrices around them
# (0/±1 path matrices, integer counts) are exact in any precision and are what gets smaller.
TREE_EXACT = ("tree_B", "tree_E", "trav_threshold", "trav_leaf", "base")



# -- quantization ------------------------------------------------------------------------
@dataclass(frozen=True)
class QuantSettings:
    """One way to run onnxruntime.quantization. ``reduce_range`` stores weights in 7 bits: x86-64
    CPUs without AVX-512 VNNI multiply u8 × s8 pairs into saturating int16 (255·127·2 > 32767),
    which 7-bit weights cannot overflow."""

    reduce_range: bool = False

    def describe(self, mode: str) -> str:
        if mode == "fp16":
            return "fp16 weights"
        return f"{mode}, {'7-bit' if self.reduce_range else '8-bit'} weights"


def quantization_candidates(mode: str, model_proto) -> list[QuantSettings]:
    """The settings the parity step tries, in order of preference; it keeps the first one whose
    metric holds on the CPU at hand. Tree models go straight to 7-bit weights: their quantized
    weights are the ±1 path matrix, exact in 7 bits, so nothing is lost and no CPU saturates."""
    if mode not in ("int8", "int8_static"):
        return [QuantSettings()]
    if any("tree_C" in i.name for i in model_proto.graph.initializer):
        return [QuantSettings(reduce_range=True)]
    return [QuantSettings(), QuantSettings(reduce_range=True)]


def _quantizable(model_proto) -> list[str]:
    """The estimator's MatMul/Gemm nodes whose weight may be quantized (never a tree's leaves)."""
    return [n.name for n in model_proto.graph.node
            if n.op_type in ("MatMul", "Gemm") and n.name.startswith("est/")
            and not any(k in n.input[1] for k in TREE_EXACT)]


def quantize(model_proto, mode: str, calibration_feeds: list[dict] | None = None,
             settings: QuantSettings = QuantSettings()):
    """A quantized copy of the model; only the estimator's MatMul/Gemm (stage 'est') change,
    and of a tree model only its structure, never thresholds or leaf values (TREE_EXACT)."""
    import onnx

    if mode == "none":
        return model_proto
    if mode == "fp16":
        return _fp16_weights(model_proto)
    est_matmuls = _quantizable(model_proto)
    if not est_matmuls:  # nothing to quantize (e.g. a TreeEnsemble op): same graph
        return model_proto
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "q.onnx"
        extra = {"MatMulConstBOnly": True}
        # per-channel scales for 2-D weights; batched 3-D weights (tensor-form trees) take one scale
        dims = {i.name: len(i.dims) for i in model_proto.graph.initializer}
        per_channel = all(dims.get(n.input[1], 2) == 2 for n in model_proto.graph.node if n.name in est_matmuls)
        quiet = _QuietQuantizer()
        if mode == "int8":
            onnx.save(model_proto, src)
            with quiet:
                quantize_dynamic(src, dst, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"],
                                 nodes_to_quantize=est_matmuls, per_channel=per_channel,
                                 reduce_range=settings.reduce_range, extra_options=extra)
        else:
            if not calibration_feeds:
                raise ExportError("quantize = 'int8_static' needs calibration rows")

            class Reader(CalibrationDataReader):
                def __init__(self):
                    self.it = iter(calibration_feeds)

                def get_next(self):
                    return next(self.it, None)

            # a dense layer as one Gemm (bias inside) and its Relu quantized too: ORT then runs
            # the layer as one QGemm with no float Add or Quantize/Dequantize pair between layers
            fused = _bias_into_gemm(model_proto)
            onnx.save(fused, src)
            est_nodes = [n.name for n in fused.graph.node if n.name.startswith("est/")
                         and (n.name in est_matmuls or n.op_type == "Relu")]
            with quiet:
                quantize_static(src, dst, Reader(), quant_format=QuantFormat.QDQ,
                                op_types_to_quantize=["MatMul", "Gemm", "Relu"], nodes_to_quantize=est_nodes,
                                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                                per_channel=per_channel, reduce_range=settings.reduce_range, extra_options=extra)
        return onnx.load(dst)


class _QuietQuantizer(logging.Filter):
    """onnxruntime.quantization warns through the root logger ('Please consider pre-processing
    before quantization'), which a notebook shows as an error box; those go to our debug log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "onnxruntime" in record.pathname and "quantization" in record.pathname:
            log.debug("onnxruntime.quantization: %s", record.getMessage())
            return False
        return True

    def __enter__(self):
        root = logging.getLogger()
        # with no handler, logging.warning() would install a stderr one for good (basicConfig)
        self._null = logging.NullHandler() if not root.handlers else None
        if self._null:
            root.addHandler(self._null)
        root.addFilter(self)
        return self

    def __exit__(self, *exc):
        root = logging.getLogger()
        root.removeFilter(self)
        if self._null:
            root.removeHandler(self._null)


def _bias_into_gemm(model_proto):
    """The estimator's MatMul(x, W) + b (W a 2-D initializer, b a 1-D one, the sum's only use)
    as one Gemm(x, W, b). Our estimators only multiply [N, k] activations by 2-D weights."""
    import onnx
    from onnx import helper

    m = onnx.ModelProto()
    m.CopyFrom(model_proto)
    g = m.graph
    dims = {i.name: list(i.dims) for i in g.initializer}
    users: dict[str, list] = {}
    for n in g.node:
        for x in n.input:
            users.setdefault(x, []).append(n)
    graph_outputs = {o.name for o in g.output}
    nodes, merged = [], set()
    for n in g.node:
        if id(n) in merged:
            continue
        w = (dims.get(n.input[1]) if n.op_type == "MatMul" and n.name.startswith("est/")
             and n.output[0] not in graph_outputs else None)
        add = users.get(n.output[0], [])
        if w is not None and len(w) == 2 and len(add) == 1 and add[0].op_type == "Add":
            bias = [x for x in add[0].input if x != n.output[0]]
            if len(bias) == 1 and dims.get(bias[0]) == [w[1]]:
                nodes.append(helper.make_node("Gemm", [n.input[0], n.input[1], bias[0]], list(add[0].output),
                                              name=n.name))
                merged.add(id(add[0]))
                continue
        nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    return m


def _fp16_weights(model_proto):
    """Store the estimator's float32 weights in half precision, upcast by a Cast node at load.

    Halves the file; CPU providers fold the Casts and compute in fp32, accelerators
    that prefer fp16 can run the weights as they are.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(model_proto)
    users = {}
    for n in m.graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    new_inits, casts = [], []
    for init in m.graph.initializer:
        if (init.data_type == TensorProto.FLOAT and init.name.startswith("est/")
                and not any(k in init.name for k in TREE_EXACT)):
            arr = numpy_helper.to_array(init)
            if arr.size > 16:
                half = numpy_helper.from_array(arr.astype(np.float16), init.name + "_fp16")
                new_inits.append(half)
                casts.append(helper.make_node("Cast", [half.name], [init.name], name=init.name + "_upcast",
                                              to=TensorProto.FLOAT))
                continue
        new_inits.append(init)
    del m.graph.initializer[:]
    m.graph.initializer.extend(new_inits)
    nodes = list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend(casts + nodes)
    return m


