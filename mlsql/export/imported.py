"""The export graph of an imported ONNX graph (or torch program): the graph itself as the estimator
stage, its nodes and weights renamed under ``est/`` (so quantization and fp16 treat it as they treat
MLSQL's own estimators), and a ``post/`` stage that gives the outputs ML.PREDICT's names and types:
``predicted_<label>`` (the class label, or a regressor's double) and ``predicted_<label>_probs``
(float [N, k]: the graph's probabilities, or the softmax of its logits). Any other output passes
through under its column name. Inputs keep the graph's names, element types and shapes."""

from __future__ import annotations

import numpy as np

_ELEM_NAMES = {1: "float32", 11: "float64", 7: "int64", 6: "int32", 9: "bool", 8: "string", 10: "float16",
               2: "uint8", 3: "int8", 5: "int16", 12: "uint32", 13: "uint64"}


def imported_graph(model):
    """(ModelProto, inputs, outputs) for ``model``, an ``mlsql.ml.imported.ImportedModel``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    src = onnx.load_from_string(model.onnx_bytes)
    g = src.graph
    spec = model.spec
    inputs_names = {i["name"] for i in spec["inputs"]}
    rename: dict[str, str] = {}

    def new(name: str) -> str:
        if not name or name in inputs_names:
            return name
        return rename.setdefault(name, f"est/{name}")

    for init in g.initializer:
        init.name = new(init.name)
    for i, n in enumerate(g.node):
        n.name = f"est/{n.name or n.op_type + '_' + str(i)}"
        n.input[:] = [new(x) for x in n.input]
        n.output[:] = [new(x) for x in n.output]
    for vi in g.value_info:
        vi.name = new(vi.name)
    label = model.label
    post, outputs, out_vis = [], [], []
    by_role = {o["role"]: o for o in spec["outputs"]}
    k = spec.get("n_classes")
    if "probs" in by_role:
        z = new(by_role["probs"]["name"])
        probs = z
        flat = "post/probs_2d"
        post.append(helper.make_node("Flatten", [z], [flat], name="post/Flatten", axis=1))
        z = flat
        if by_role["probs"].get("logits"):
            post.append(helper.make_node("Softmax", [z], ["post/softmax"], name="post/Softmax", axis=1))
            z = "post/softmax"
        if by_role["probs"]["elem"] != TensorProto.FLOAT:
            post.append(helper.make_node("Cast", [z], ["post/probs_f32"], name="post/CastProbs", to=TensorProto.FLOAT))
            z = "post/probs_f32"
        probs = z
        post.append(helper.make_node("ArgMax", [probs], ["post/code"], name="post/ArgMax", axis=1, keepdims=0))
        classes = model.classes
        if model.label_type == "string":
            table = numpy_helper.from_array(np.array([str(c) for c in classes], dtype=object), "post/classes")
            ctype, cname = TensorProto.STRING, "string"
        else:
            table = numpy_helper.from_array(np.array(classes, dtype=np.int64), "post/classes")
            ctype, cname = TensorProto.INT64, "int64"
        g.initializer.append(table)
        post.append(helper.make_node("Gather", ["post/classes", "post/code"], [f"predicted_{label}"],
                                     name="post/Label", axis=0))
        post.append(helper.make_node("Identity", [probs], [f"predicted_{label}_probs"], name="post/Probs"))
        out_vis += [helper.make_tensor_value_info(f"predicted_{label}", ctype, ["N"]),
                    helper.make_tensor_value_info(f"predicted_{label}_probs", TensorProto.FLOAT, ["N", k])]
        outputs += [{"name": f"predicted_{label}", "type": cname, "shape": [None]},
                    {"name": f"predicted_{label}_probs", "type": "float32", "shape": [None, k]}]
    elif "value" in by_role:
        z = new(by_role["value"]["name"])
        post.append(helper.make_node("Cast", [z], ["post/value64"], name="post/Cast", to=TensorProto.DOUBLE))
        post.append(helper.make_node("Reshape", ["post/value64", "post/flat_shape"], [f"predicted_{label}"],
                                     name="post/Reshape"))
        g.initializer.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), "post/flat_shape"))
        out_vis.append(helper.make_tensor_value_info(f"predicted_{label}", TensorProto.DOUBLE, ["N"]))
        outputs.append({"name": f"predicted_{label}", "type": "float64", "shape": [None]})
    for o in spec["outputs"]:
        if o["role"] in ("probs", "value") or (o["role"] == "label" and "probs" in by_role):
            continue
        post.append(helper.make_node("Identity", [new(o["name"])], [o["column"]], name=f"post/{o['column']}"))
        shape = ["N", *[d for d in o["shape"][1:]]] if o["shape"] else None
        out_vis.append(helper.make_tensor_value_info(o["column"], o["elem"], shape))
        outputs.append({"name": o["column"], "type": _ELEM_NAMES.get(o["elem"], "float32"),
                        "shape": [None, *o["shape"][1:]] if o["shape"] else [None]})
    g.node.extend(post)
    del g.output[:]
    g.output.extend(out_vis)
    inputs = [{"name": i["name"], "type": _ELEM_NAMES.get(i["elem"], "float32"),
               "shape": [None, *i["shape"][1:]] if i["shape"] else [None], "nullable": False}
              for i in spec["inputs"]]
    src.doc_string = f"MLSQL import ({model.model_type}) predicting {label}"
    onnx.checker.check_model(src)
    return src, inputs, outputs


_ELEM_CODES = {v: k for k, v in _ELEM_NAMES.items()}


def tensor_feed(col, spec: dict) -> np.ndarray:
    """One column as the tensor input ``spec`` (``{"name", "type", "shape"}``) takes."""
    from mlsql.ml.imported import column_feed

    return column_feed(col, {"name": spec["name"], "elem": _ELEM_CODES.get(spec["type"], 1), "shape": spec["shape"]},
                       spec["name"], "export")
