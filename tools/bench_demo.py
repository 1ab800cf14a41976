"""Time `raydistill demo` end to end and report whether the distilled students beat CE.

Usage: python tools/bench_demo.py [--workdir DIR] [--keep]
Runs the demo in a fresh work dir (nothing cached), prints the demo's own table, then as its last
line one JSON object: total seconds, per-model held-out losses, and CE − KD per size.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time

from raydistill.config import DemoConfig
from raydistill.recipes.demo import run_demo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default=None, help="default: a new temporary directory")
    parser.add_argument("--keep", action="store_true", help="keep the work dir afterwards")
    args = parser.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="raydistill-bench-demo-")
    t0 = time.perf_counter()
    results = run_demo(DemoConfig(workdir=workdir))
    total = time.perf_counter() - t0
    losses = {r["model"]: r["loss"] for r in results}
    by_size: dict[str, dict[str, float]] = {}
    for r in results:
        by_size.setdefault(r["size"], {})[r["kind"]] = r["loss"]
    gaps = {size: round(v["ce"] - v["kd"], 4) for size, v in by_size.items() if "ce" in v and "kd" in v}
    if not args.keep and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps({"demo_seconds": round(total, 1), "within_10_minutes": total <= 600,
                      "heldout_loss": losses, "ce_minus_kd": gaps,
                      "kd_ahead_all_sizes": bool(gaps) and all(g > 0 for g in gaps.values())}))


if __name__ == "__main__":
    main()
