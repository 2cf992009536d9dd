"""xgboost boosters as ONNX: ai.onnx.ml TreeEnsemble ops, or plain tensor ops (Hummingbird's strategies).

``traversal`` (tree_format 'tensor') walks the trees in tensor ops: one GatherElements step per level.
``tensor`` (tree_format 'gemm') is the GEMM compilation: for every tree,
``A`` picks each internal node's feature, ``B`` holds the thresholds, ``C`` says
for each leaf which internal nodes lie on its path and on which side, ``D`` how
many left turns reach it, ``E`` its value. Then

    T = (X @ A) < B            one bit per internal node (X @ A done as a Gather of columns)
    L = (T @ C) == D           one-hot of the leaf each row reaches
    y = L @ E                  summed over trees

which runs as MatMul / Less / Equal on any execution provider and can be
quantized, where TreeEnsemble ops cannot.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
from onnx import TensorProto, helper

from mlsql.export.builder import Graph


@dataclass
class Tree:
    cls: int  # output column it adds to
    node_ids: list[int]
    feature: dict[int, int]  # internal node -> feature index
    threshold: dict[int, float]
    yes: dict[int, int]
    no: dict[int, int]
    leaf: dict[int, float]  # leaf node -> value


def tree_classes(booster, n_trees: int, n_out: int) -> list[int]:
    """The output column each tree adds to: xgboost's ``tree_info``. With several trees a round
    (``num_parallel_tree``, a random forest) a multiclass round holds each class's trees together
    ([0, 0, 1, 1, 2, 2] for 3 classes × 2), so the tree's index modulo the classes is not its class."""
    try:
        gb = json.loads(booster.save_raw("json"))["learner"]["gradient_booster"]
        info = (gb["model"] if "model" in gb else gb["gbtree"]["model"])["tree_info"]  # dart wraps a gbtree
        if len(info) == n_trees:
            return [int(c) for c in info]
    except (KeyError, TypeError, ValueError):  # another booster (dart keeps it elsewhere): the layout instead
        pass
    per_round = 1
    try:
        per_round = int(json.loads(booster.save_config())["learner"]["gradient_booster"]["gbtree_model_param"]
                        ["num_parallel_tree"])
    except (KeyError, TypeError, ValueError):
        pass
    return [(i // per_round) % n_out for i in range(n_trees)]


def parse_booster(booster, n_out: int) -> list[Tree]:
    trees = []
    dump = booster.get_dump(dump_format="json")
    classes = tree_classes(booster, len(dump), n_out)
    for i, text in enumerate(dump):
        root = json.loads(text)
        t = Tree(cls=classes[i], node_ids=[], feature={}, threshold={}, yes={}, no={}, leaf={})
        stack = [root]
        while stack:
            n = stack.pop()
            nid = n["nodeid"]
            t.node_ids.append(nid)
            if "leaf" in n:
                t.leaf[nid] = float(n["leaf"])
                continue
            t.feature[nid] = int(str(n["split"]).lstrip("f"))
            t.threshold[nid] = float(np.float32(n["split_condition"]))
            t.yes[nid], t.no[nid] = n["yes"], n["no"]
            stack.extend(n.get("children", []))
        trees.append(t)
    return trees


def margin_base(booster, trees: list[Tree], n_out: int, x_row: np.ndarray) -> np.ndarray:
    """The constant xgboost adds to the summed leaves (its base score, as a margin)."""
    import xgboost as xgb

    m = booster.predict(xgb.DMatrix(x_row[None, :].astype(np.float32)), output_margin=True)
    m = np.asarray(m, dtype=np.float64).reshape(-1)[:n_out]
    leaves = np.zeros(n_out)
    for t in trees:
        nid = 0
        while nid not in t.leaf:
            nid = t.yes[nid] if np.float32(x_row[t.feature[nid]]) < np.float32(t.threshold[nid]) else t.no[nid]
        leaves[t.cls] += np.float32(t.leaf[nid])
    return m - leaves


def ensemble(g: Graph, X: str, trees: list[Tree], n_out: int, base: np.ndarray) -> str:
    """TreeEnsembleRegressor (ai.onnx.ml) over float32 X → margins [N, n_out]."""
    a = {k: [] for k in ("treeids", "nodeids", "featureids", "values", "modes", "true", "false", "missing")}
    tw = {k: [] for k in ("treeids", "nodeids", "ids", "weights")}
    for ti, t in enumerate(trees):
        for nid in sorted(t.node_ids):
            a["treeids"].append(ti)
            a["nodeids"].append(nid)
            if nid in t.leaf:
                a["featureids"].append(0)
                a["values"].append(0.0)
                a["modes"].append("LEAF")
                a["true"].append(0)
                a["false"].append(0)
                a["missing"].append(0)
                tw["treeids"].append(ti)
                tw["nodeids"].append(nid)
                tw["ids"].append(t.cls)
                tw["weights"].append(t.leaf[nid])
            else:
                a["featureids"].append(t.feature[nid])
                a["values"].append(t.threshold[nid])
                a["modes"].append("BRANCH_LT")
                a["true"].append(t.yes[nid])
                a["false"].append(t.no[nid])
                a["missing"].append(0)
    return g.op(
        "TreeEnsembleRegressor", [X], domain="ai.onnx.ml", hint="trees",
        n_targets=n_out, aggregate_function="SUM", base_values=[float(b) for b in base],
        nodes_treeids=a["treeids"], nodes_nodeids=a["nodeids"], nodes_featureids=a["featureids"],
        nodes_values=a["values"], nodes_modes=a["modes"], nodes_truenodeids=a["true"],
        nodes_falsenodeids=a["false"], nodes_missing_value_tracks_true=a["missing"],
        target_treeids=tw["treeids"], target_nodeids=tw["nodeids"], target_ids=tw["ids"],
        target_weights=tw["weights"], post_transform="NONE",
    )


def tensor(g: Graph, X: str, trees: list[Tree], n_out: int, n_features: int, base: np.ndarray) -> str:
    """The GEMM form over float32 X → margins [N, n_out]."""
    n_trees = len(trees)
    max_int = max(1, max(len(t.feature) for t in trees))
    max_leaf = max(len(t.leaf) for t in trees)
    A = np.zeros((n_features, n_trees * max_int), np.float32)
    B = np.full((n_trees * max_int,), np.inf, np.float32)  # padding: x < inf is always true
    C = np.zeros((n_trees, max_int, max_leaf), np.float32)
    D = np.full((n_trees, 1, max_leaf), -1.0, np.float32)  # padding leaves are never reached
    E = np.zeros((n_trees, max_leaf, n_out), np.float32)
    for ti, t in enumerate(trees):
        internal = sorted(t.feature)
        pos = {nid: j for j, nid in enumerate(internal)}
        for nid in internal:
            A[t.feature[nid], ti * max_int + pos[nid]] = 1.0
            B[ti * max_int + pos[nid]] = t.threshold[nid]
        # walk paths: for each leaf, the internal nodes above it and the side taken
        parent: dict[int, tuple[int, bool]] = {}
        for nid in internal:
            parent[t.yes[nid]] = (nid, True)
            parent[t.no[nid]] = (nid, False)
        for li, leaf in enumerate(sorted(t.leaf)):
            lefts = 0
            node = leaf
            while node in parent:
                p, is_yes = parent[node]
                C[ti, pos[p], li] = 1.0 if is_yes else -1.0
                lefts += 1 if is_yes else 0
                node = p
            D[ti, 0, li] = lefts
            E[ti, li, t.cls] = t.leaf[leaf]
    # T[n, k] = x[feature_k] < threshold_k  (as 1.0 / 0.0); A is one-hot per column, so X @ A is a Gather
    picked = g.op("Gather", [X, g.const(A.argmax(axis=0).astype(np.int64), hint="tree_features")], axis=1)
    bits = g.op("Cast", [g.op("Less", [picked, g.const(B, hint="tree_B")])], to=1)
    # [N, trees*max_int] -> [trees, N, max_int]
    bits3 = g.op("Transpose", [g.op("Reshape", [bits, g.const(np.array([-1, n_trees, max_int], np.int64))])],
                 perm=[1, 0, 2])
    # a bit counts +1 on a yes-edge when set, and -1 on a no-edge when set: path score = #yes taken - #no wrongly taken
    score = g.op("MatMul", [bits3, g.const(C, hint="tree_C")])  # [trees, N, max_leaf]
    # |score - D| < 0.5 rather than equality: a quantized MatMul returns 0.99999994 for 1
    off = g.op("Abs", [g.op("Sub", [score, g.const(D, hint="tree_D")])])
    reached = g.op("Cast", [g.op("Less", [off, g.const(np.float32(0.5))])], to=1)
    per_tree = g.op("MatMul", [reached, g.const(E, hint="tree_E")])  # [trees, N, n_out]
    summed = g.op("ReduceSum", [per_tree, g.const(np.array([0], np.int64))], keepdims=0)
    return g.op("Add", [summed, g.const(base.astype(np.float32), hint="base")])


def tree_depth(t: Tree) -> int:
    depth = {0: 0}
    order = [0]
    for nid in order:
        if nid in t.feature:
            for c in (t.yes[nid], t.no[nid]):
                depth[c] = depth[nid] + 1
                order.append(c)
    return max(depth[n] for n in t.leaf)


def traversal(g: Graph, X: str, trees: list[Tree], n_out: int, base: np.ndarray) -> str:
    """Tree traversal in tensor ops (after Hummingbird's): one step per level, D = the deepest tree.

    All trees' nodes sit in one table, each node's yes-child right before its no-child, so a
    step is ``h = no_child[h] - (x[feature[h]] < threshold[h])``. A leaf's threshold is NaN
    (nothing is less than NaN) and its no_child is itself, so a row that reaches a shallow
    leaf stays there. The node index h of every (row, tree) is kept flat, [1, N*T], and
    looked up with GatherElements: ORT's Gather over a 1-D table costs about five times as
    much per element. A NaN feature takes the no branch, as the TreeEnsemble form does.
    """
    # the leaves are summed per class from a [N, trees / n_out, n_out] view: tree i must add to class
    # i % n_out, so the trees are dealt class by class (a forest's round holds each class's trees together)
    by_cls = [[t for t in trees if t.cls == c] for c in range(n_out)]
    if len({len(b) for b in by_cls}) != 1:
        raise ValueError("tree_format = 'tensor' needs the same number of trees for every class")
    trees = [by_cls[c][i] for i in range(len(by_cls[0])) for c in range(n_out)]
    D = max(1, max(tree_depth(t) for t in trees))
    feat, thr, no_child, leaf_val, roots = [], [], [], [], []

    def new_node() -> int:
        for table, blank in ((feat, 0), (thr, 0.0), (no_child, 0), (leaf_val, 0.0)):
            table.append(blank)
        return len(feat) - 1

    for t in trees:
        pos = {0: new_node()}
        queue = [0]
        for nid in queue:  # breadth first; the queue grows as children are placed
            p = pos[nid]
            if nid in t.leaf:
                thr[p], no_child[p], leaf_val[p] = np.nan, p, t.leaf[nid]
                continue
            pos[t.yes[nid]], pos[t.no[nid]] = new_node(), new_node()
            queue += [t.yes[nid], t.no[nid]]
            feat[p], thr[p], no_child[p] = t.feature[nid], t.threshold[nid], pos[t.no[nid]]
        roots.append(pos[0])
    table = {k: g.const(np.asarray(v, dt).reshape(1, -1), hint=f"trav_{k}") for k, v, dt in
             (("feature", feat, np.int32), ("threshold", thr, np.float32), ("no_child", no_child, np.int32),
              ("leaf", leaf_val, np.float32))}
    n_trees = len(trees)
    n_rows = g.op("Slice", [g.op("Shape", [X]), g.const(np.array([0], np.int64)), g.const(np.array([1], np.int64))])
    rows_by_trees = g.op("Concat", [n_rows, g.const(np.array([n_trees], np.int64))], axis=0)
    flat = g.const(np.array([1, -1], np.int64))
    zero = g.op("ConstantOfShape", [rows_by_trees], value=helper.make_tensor("zero", TensorProto.INT32, [1], [0]))
    h = g.op("Reshape", [g.op("Add", [zero, g.const(np.asarray(roots, np.int32), hint="trav_roots")]), flat])
    for _ in range(D):
        f = g.op("Reshape", [g.op("GatherElements", [table["feature"], h], axis=1), rows_by_trees], allowzero=1)
        v = g.op("Reshape", [g.op("GatherElements", [X, f], axis=1), flat])
        yes = g.op("Cast", [g.op("Less", [v, g.op("GatherElements", [table["threshold"], h], axis=1)])],
                   to=TensorProto.INT32)
        h = g.op("Sub", [g.op("GatherElements", [table["no_child"], h], axis=1), yes])
    # dealt above so that tree i adds to class i % n_out
    by_class = g.op("Concat", [n_rows, g.const(np.array([n_trees // n_out, n_out], np.int64))], axis=0)
    leaves = g.op("GatherElements", [table["leaf"], h], axis=1)
    vals = g.op("Reshape", [leaves, by_class], allowzero=1)  # [N, rounds, n_out]
    summed = g.op("ReduceSum", [vals, g.const(np.array([1], np.int64))], keepdims=0)
    return g.op("Add", [summed, g.const(base.astype(np.float32), hint="base")])
