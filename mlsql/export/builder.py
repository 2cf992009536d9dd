"""A small ONNX graph builder: unique names, constants, nodes, grouped by stage."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
ML_OPSET = 3


class Graph:
    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._n = 0
        self._consts: dict = {}
        self.stage = "pre"  # node-name prefix: 'pre' (TRANSFORM + encoding), 'est' (the model), 'post'

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{self.stage}/{hint}_{self._n}"

    def const(self, value, dtype=None, hint: str = "c") -> str:
        arr = np.asarray(value, dtype=dtype)
        if arr.dtype.kind in "OUS":
            arr = arr.astype(object)
            key = ("s", arr.shape, tuple(arr.ravel().tolist()))
        else:
            key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key in self._consts and arr.size <= 64:
            return self._consts[key]
        name = self.name(hint)
        if arr.dtype == object:
            t = helper.make_tensor(name, TensorProto.STRING, arr.shape, [str(v).encode() for v in arr.ravel()])
        else:
            t = numpy_helper.from_array(arr, name)
        self.initializers.append(t)
        if arr.size <= 64:
            self._consts[key] = name
        return name

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str = "", hint: str | None = None, **attrs):
        outs = [self.name(hint or op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.name(op_type), domain=domain, **attrs))
        return outs[0] if n_out == 1 else outs

    def add_input(self, name: str, elem_type: int, shape) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def add_output(self, source: str, name: str, elem_type: int, shape) -> None:
        self.nodes.append(helper.make_node("Identity", [source], [name], name=self.name("out")))
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))

    def model(self, doc: str = "") -> onnx.ModelProto:
        used = {i for n in self.nodes for i in n.input}
        inits = [t for t in self.initializers if t.name in used]
        g = helper.make_graph(self.nodes, "mlsql", self.inputs, self.outputs, inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("ai.onnx.ml", ML_OPSET)],
                              producer_name="mlsql", doc_string=doc)
        m.ir_version = 8
        return m
