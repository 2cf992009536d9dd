"""The poll path's cost of package origins, deltas and group rules: one hub process's poll cycles/s
(GET desired + POST report, bench_device.py's hub_store section) at this revision against the revision
before them (the hub's default SQLite store on both), rounds interleaved in one run. The desired state
now carries each package's URL list and delta path, and its read also fetches the group rules (same
round trip).

    python bench/bench_desired_path.py [--base REV] [--rounds 3] [--seconds 4]

Writes bench/results/desired_path.json with the load average.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

BASE = "2583957"  # main before issue 30's origins, deltas and rollout rules


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default=BASE)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=4.0)
    args = ap.parse_args()
    from bench_device import bench_hub_stores

    from device_bridge.keys import load_or_create_keypair

    with tempfile.TemporaryDirectory() as tmp:
        hs = bench_hub_stores(Path(tmp), load_or_create_keypair(Path(tmp) / "keys"), args.rounds, args.seconds,
                              json_rev=args.base)
    out = {"base_rev": args.base, "rounds": args.rounds, "seconds": args.seconds, "clients": hs["clients"],
           "load_avg_start": hs["load_avg_start"], "load_avg_end": hs["load_avg"],
           "base_sqlite": hs["json"], "this_sqlite": hs["sqlite"], "this_postgresql": hs["postgresql"]}
    out["ratio_poll_cycles"] = out["this_sqlite"]["poll_cycles_per_s"] / out["base_sqlite"]["poll_cycles_per_s"]
    out["ratio_desired_get"] = out["this_sqlite"]["desired_get_per_s"] / out["base_sqlite"]["desired_get_per_s"]
    for k in ("base_sqlite", "this_sqlite", "this_postgresql"):
        r = out[k]
        print(f"{k:<16} poll cycles/s {r['poll_cycles_per_s']:>8.0f}   desired GET/s {r['desired_get_per_s']:>8.0f} "
              f"(p99 {r['desired_p99_ms']:.1f} ms)   report POST/s {r['report_post_per_s']:>8.0f}")
    print(f"this / base on SQLite: poll cycles {out['ratio_poll_cycles']:.2f}x, desired GETs "
          f"{out['ratio_desired_get']:.2f}x; load average {out['load_avg_start']} -> {out['load_avg_end']}")
    (HERE / "results" / "desired_path.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
