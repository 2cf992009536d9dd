"""This agent against an earlier revision's agent, measured in one run on the same machine.

    python bench/bench_agent_baseline.py [--baseline 5b60b45] [--rounds 4] [--seconds 3]

The baseline revision is checked out into a temporary git worktree; each round starts one agent
of each revision (interleaved, so both see the same machine load), installs the same signed
xgboost classifier (100 trees, 20 features) and drives it with bench/loadgen.py (16 keep-alive
connections, a pre-encoded request) at batch 1 (JSON) and batch 256 (binary columns), after a
single-row round trip from one client (500 calls; the overhead over in-process ONNX Runtime).
Reported per revision, medians over the rounds: the round trip, requests/s and the agent
process's CPU time per request (user + system, from /proc), the figure least disturbed by other
load. The default baseline is the last revision before the
security hardening. Writes bench/results/agent_baseline.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# Runs inside a child interpreter whose sys.path starts with one revision's tree.
CHILD = r"""
import json, os, sys, tempfile
from pathlib import Path
tree, seconds = sys.argv[1], float(sys.argv[2])
sys.path[:0] = [tree, tree + "/bench"]
import bench_device as B
from device_bridge.client import DeviceClient
from device_bridge.keys import load_or_create_keypair, public_key_to_pem
from device_bridge.package import build_package

def cpu(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")

out = {}
with tempfile.TemporaryDirectory() as d:
    tmp = Path(d)
    kp = load_or_create_keypair(tmp / "keys")
    pub = tmp / "ws.pub"
    pub.write_bytes(public_key_to_pem(kp.public_key))
    agent = B.Agent(["serve", "--name", "bench", "--port", "0", "--store", str(tmp / "agent"), "--token", B.TOKEN,
                     "--trust", str(pub)], tmp / "agent.json")
    try:
        DeviceClient(agent.url, B.TOKEN).install(
            build_package(B.xgb_onnx(100), {"name": "xgb", "version": 1, "providers": ["cpu"]}, kp.private_key))
        rt = B.bench_round_trip(agent.url, B.xgb_onnx(100), 500)
        out["round_trip"] = {"agent_p50_ms": rt["agent_round_trip_ms"]["p50"],
                             "overhead_p50_ms": rt["overhead_ms"]["p50"], "overhead_p99_ms": rt["overhead_ms"]["p99"]}
        for batch in (1, 256):
            c0 = cpu(agent.p.pid)
            r = B.bench_throughput(agent.url, batch, seconds, model="xgb", tmp=tmp)
            used = cpu(agent.p.pid) - c0
            out[str(batch)] = {"requests_per_s": r["requests_per_s"],
                               "cpu_us_per_request": used / (r["requests_per_s"] * seconds) * 1e6}
    finally:
        agent.stop()
print(json.dumps(out))
"""


def run_tree(tree: Path, seconds: float) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    p = subprocess.run([sys.executable, "-c", CHILD, str(tree), str(seconds)], env=env, cwd=tempfile.gettempdir(),
                       capture_output=True, text=True, check=False)
    if p.returncode:
        raise RuntimeError(f"agent run from {tree} failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", default="5b60b45", help="git revision of the agent to compare with")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args(argv)
    base_rev = subprocess.run(["git", "rev-parse", "--short", args.baseline], cwd=ROOT, check=True,
                              capture_output=True, text=True).stdout.strip()
    head_rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, check=True,
                              capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="agent-baseline-") as d:
        base_tree = Path(d) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", str(base_tree), base_rev], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            runs = {"baseline": [], "current": []}
            for _ in range(args.rounds):
                runs["baseline"].append(run_tree(base_tree, args.seconds))
                runs["current"].append(run_tree(ROOT, args.seconds))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base_tree)], cwd=ROOT, check=False,
                           capture_output=True)
    summary = {}
    for batch in ("1", "256"):
        row = {}
        for which in ("baseline", "current"):
            row[which] = {k: statistics.median(r[batch][k] for r in runs[which])
                          for k in ("requests_per_s", "cpu_us_per_request")}
        row["throughput_ratio"] = row["current"]["requests_per_s"] / row["baseline"]["requests_per_s"]
        row["cpu_ratio"] = row["current"]["cpu_us_per_request"] / row["baseline"]["cpu_us_per_request"]
        summary[batch] = row
    result = {"baseline": base_rev, "current": head_rev, "rounds": args.rounds, "seconds": args.seconds,
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "load_avg_at_end": os.getloadavg()},
              "summary": summary, "runs": runs}
    out = HERE / "results" / "agent_baseline.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    rt = {which: {k: statistics.median(r["round_trip"][k] for r in runs[which])
                  for k in ("agent_p50_ms", "overhead_p50_ms", "overhead_p99_ms")} for which in ("baseline", "current")}
    summary["round_trip"] = {**rt, "overhead_p50_ratio": rt["current"]["overhead_p50_ms"] / rt["baseline"]["overhead_p50_ms"]}
    print(f"single-row round trip (one client), overhead over in-process ORT p50: {base_rev} "
          f"{rt['baseline']['overhead_p50_ms']:.3f} ms | {head_rev} {rt['current']['overhead_p50_ms']:.3f} ms "
          f"(x{summary['round_trip']['overhead_p50_ratio']:.2f}); p99 {rt['baseline']['overhead_p99_ms']:.3f} | "
          f"{rt['current']['overhead_p99_ms']:.3f} ms")
    for batch in ("1", "256"):
        row = summary[batch]
        print(f"batch {batch:>3}: {base_rev} {row['baseline']['requests_per_s']:8.0f} req/s "
              f"{row['baseline']['cpu_us_per_request']:7.0f} us CPU/req | {head_rev} "
              f"{row['current']['requests_per_s']:8.0f} req/s {row['current']['cpu_us_per_request']:7.0f} us CPU/req"
              f" | throughput x{row['throughput_ratio']:.2f}, CPU per request x{row['cpu_ratio']:.2f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
