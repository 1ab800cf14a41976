"""The demo teacher's held-out loss on a quiet machine and on a loaded one: it must not depend on the load.

Usage: python tools/bench_demo_teacher.py [--steps N] [--load 0,2]

For each load level, trains the demo teacher from scratch (``recipes.pretrain.ensure_demo_teacher``,
the demo's own settings) in a fresh directory while ``load`` busy processes compete for the
cores, then scores it on the held-out split (``raydistill evaluate``'s scoring). A fixed step
count means the same weights at every load (on CPU, fp32, same threads); only the seconds
change. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import tempfile
import time
from pathlib import Path

from raydistill.config import CorpusConfig, DemoConfig
from raydistill.contracts.selection import selected_documents
from raydistill.recipes.pretrain import MARKER, ensure_demo_teacher
from raydistill.runtime.verbosity import set_verbosity
from raydistill.stages.evaluate.scores import evaluate_model


def _burn(stop) -> None:  # a busy core: what another tenant's job looks like to us
    x = 0
    while not stop.is_set():
        x = (x * 1103515245 + 12345) % 2**31


def run(steps: int, load: int) -> dict:
    stop = mp.Event()
    burners = [mp.Process(target=_burn, args=(stop,), daemon=True) for _ in range(load)]
    for b in burners:
        b.start()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-teacher-") as tmp:
            train = [d.text for d in selected_documents(CorpusConfig(split="train"))]
            t0 = time.perf_counter()
            teacher = ensure_demo_teacher(tmp, train, steps=steps, log=lambda _: None)
            seconds = time.perf_counter() - t0
            heldout = selected_documents(CorpusConfig(split="heldout"))
            scores = evaluate_model(teacher, heldout)
            marker = json.loads((Path(teacher) / MARKER).read_text())
    finally:
        stop.set()
        for b in burners:
            b.join()
    return {"load": load, "steps": marker["result"]["steps"], "train_seconds": round(seconds, 1),
            "heldout_loss": round(scores["loss"], 4), "final_train_loss": round(marker["result"]["final_loss"], 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=DemoConfig().teacher_steps)
    p.add_argument("--load", default="0,2", help="busy processes beside the training, comma-separated levels")
    args = p.parse_args()
    set_verbosity(False)  # the figures, not the libraries' logs
    rows = [run(args.steps, int(level)) for level in args.load.split(",")]
    print(f"{'load':>5} {'steps':>6} {'seconds':>8} {'held-out loss':>14} {'train loss':>11}")
    for r in rows:
        print(f"{r['load']:>5} {r['steps']:>6} {r['train_seconds']:>8} {r['heldout_loss']:>14} {r['final_train_loss']:>11}")
    losses = [r["heldout_loss"] for r in rows]
    print(json.dumps({"steps": args.steps, "runs": rows, "heldout_loss_spread": round(max(losses) - min(losses), 4)}))


if __name__ == "__main__":
    main()
