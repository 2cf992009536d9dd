"""Delta updates: the size of a zstd delta (device_bridge/delta.py) against the full package, for the
updates a fleet sees, measured in one run.

    python bench/bench_delta.py [--quick]

- a boosted tree (MLSQL's boosted_tree_classifier, exported and signed by EXPORT MODEL ... package)
  retrained on the same rows with one more round, and with a new seed (subsample 0.8, so the trees
  differ from the first);
- an MLP (torch, 3 hidden layers) fine-tuned for a few more optimizer steps, exported to ONNX and
  signed as a package (device_bridge.package) before and after.

For each pair: full package bytes, delta bytes, delta / full, the hub's time to make the delta and the
agent's time to apply it, and whether the hub would send it (delta <= 50 % of the package,
hub/deltas.py). Also the zstd-compressed size of the new package alone (no base), which is what a
delta has to beat. Writes bench/results/delta.json with the load average.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def pair(name: str, old: bytes, new: bytes) -> dict:
    import zstandard

    from device_bridge import delta
    from device_bridge.hub.deltas import MAX_RATIO

    t0 = time.perf_counter()
    d = delta.make(old, new)
    make_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    back = delta.apply(old, d, len(new) + 1)
    apply_s = time.perf_counter() - t0
    assert hashlib.sha256(back).hexdigest() == hashlib.sha256(new).hexdigest()
    alone = len(zstandard.ZstdCompressor(level=delta.LEVEL).compress(new))
    r = {
        "pair": name,
        "old_bytes": len(old),
        "full_bytes": len(new),
        "delta_bytes": len(d),
        "delta_over_full": len(d) / len(new),
        "zstd_alone_bytes": alone,
        "zstd_alone_over_full": alone / len(new),
        "sent_as_delta": len(d) <= MAX_RATIO * len(new),
        "make_s": make_s,
        "apply_s": apply_s,
    }
    print(
        f"{name:<42}{len(new) / 1024:>10.1f}{len(d) / 1024:>11.1f}{r['delta_over_full']:>9.3f}"
        f"{r['zstd_alone_over_full']:>10.3f}{make_s:>9.2f}{apply_s * 1000:>10.1f}"
    )
    return r


def trees(tmp: Path, rows: int, rounds: int) -> list[dict]:
    import mlsql

    rng = np.random.default_rng(0)
    X = rng.normal(size=(rows, 12))
    y = (X[:, 0] + 0.5 * X[:, 1] * X[:, 2] - X[:, 3] ** 2 + rng.normal(scale=0.5, size=rows)) > 0
    import pyarrow as pa

    table = pa.table({**{f"f{i}": X[:, i] for i in range(12)}, "label": y})
    s = mlsql.connect(tmp / "ws")
    s.register("d", table)
    s.sql("CREATE TABLE train AS SELECT * FROM d")

    def build(n: int, seed: int) -> bytes:
        s.sql(f"""CREATE OR REPLACE MODEL trees OPTIONS (model_type = 'boosted_tree_classifier',
                  input_label_cols = ['label'], max_iterations = {n}, early_stop = FALSE, subsample = 0.8,
                  random_seed = {seed}) AS SELECT * FROM train""")
        res = s.export("trees", package=True).export
        return Path(res.package_path).read_bytes()

    base = build(rounds, 1)
    more = build(rounds + 1, 1)
    reseeded = build(rounds, 2)
    s.close()
    return [
        pair(f"boosted tree: {rounds} -> {rounds + 1} rounds", base, more),
        pair(f"boosted tree: {rounds} rounds, new seed", base, reseeded),
    ]


def mlp(tmp: Path, steps: int, more: int) -> list[dict]:
    import warnings

    import torch

    from device_bridge.keys import load_or_create_keypair
    from device_bridge.package import build_package

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(32, 512),
        torch.nn.ReLU(),
        torch.nn.Linear(512, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 128),
        torch.nn.ReLU(),
        torch.nn.Linear(128, 1),
    )
    X = torch.randn(8192, 32)
    y = (X[:, :4].sum(1, keepdim=True) > 0).float()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    kp = load_or_create_keypair(tmp / "keys")

    def train(n: int, opt=opt) -> None:
        for _ in range(n):
            idx = torch.randint(0, len(X), (256,))
            opt.zero_grad()
            torch.nn.functional.binary_cross_entropy_with_logits(net(X[idx]), y[idx]).backward()
            opt.step()

    def package(version: int) -> bytes:
        path = tmp / f"mlp{version}.onnx"
        warnings.filterwarnings(
            "ignore", category=DeprecationWarning
        )  # the TorchScript exporter: a plain MLP
        torch.onnx.export(
            net,
            (X[:2],),
            str(path),
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "n"}, "y": {0: "n"}},
            dynamo=False,
        )
        return build_package(
            path.read_bytes(),
            {
                "name": "mlp",
                "version": version,
                "providers": ["cpu"],
                "inputs": [{"name": "x", "type": "float32", "shape": [None, 32]}],
                "outputs": [{"name": "y", "type": "float32", "shape": [None, 1]}],
            },
            kp.private_key,
        )

    train(steps)
    v1 = package(1)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    train(more)
    v2 = package(2)
    net.load_state_dict(state)  # from v1 again: only the output layer fine-tuned (the rest frozen)
    train(more, torch.optim.Adam(net[-1].parameters(), lr=1e-3))
    v2_head = package(2)
    return [
        pair(f"MLP 32-512-256-128-1: +{more} Adam steps", v1, v2),
        pair(f"MLP: +{more} steps, output layer only", v1, v2_head),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer rows and rounds, for a smoke run")
    args = ap.parse_args()
    rows, rounds = (5_000, 20) if args.quick else (50_000, 100)
    load_before = os.getloadavg()
    print(
        f"{'pair':<42}{'full KiB':>10}{'delta KiB':>11}{'delta/full':>9}{'zstd/full':>10}{'make s':>9}{'apply ms':>10}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        results = trees(Path(tmp), rows, rounds) + mlp(Path(tmp), 200, 5)
    out = {
        "quick": args.quick,
        "rows": rows,
        "rounds": rounds,
        "pairs": results,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "cpus": os.cpu_count(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print(f"load average before {load_before}, after {out['loadavg_after']}")
    res_dir = HERE / "results"
    res_dir.mkdir(exist_ok=True)
    if not args.quick:
        (res_dir / "delta.json").write_text(json.dumps(out, indent=1))
        print(f"wrote {res_dir / 'delta.json'}")


if __name__ == "__main__":
    main()
