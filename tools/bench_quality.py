"""Quality benchmark: does one sparse capture teach students as well as the teacher would online?

Usage: python tools/bench_quality.py [--workdir raydistill-demo] [--steps 150] [--sizes micro,tiny,small,base]

On the embedded default corpus: the demo teacher (trained and cached by `raydistill demo`, or
here), one capture of the train split with the shipped capture defaults (reused when the
demo's shards have the same settings), then `raydistill sweep`: sparse offline KD at every
size, CE-only at every size, dense online KD at the smallest, two seeds at the smallest; every
model scored on the held-out split. Writes the sweep's results.md / results.csv / plots under
<workdir>/bench-quality and prints, as its last line, one JSON object: sizes, kd_loss, ce_loss,
online_kd_loss, seed_spread, kd_beats_ce_all_sizes, retention_vs_online_kd, teacher_passes.
About 15 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from raydistill.capture import run_capture
from raydistill.config import CaptureConfig, CorpusConfig, DemoConfig, SweepConfig
from raydistill.corpus import read_documents
from raydistill.errors import PlanMismatchError
from raydistill.pretrain import ensure_demo_teacher
from raydistill.sweep import run_sweep


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="raydistill-demo", help="the demo's work dir (teacher and shards are reused)")
    p.add_argument("--steps", type=int, default=150, help="optimizer steps per student (2 workers x 8 x 128 tokens)")
    p.add_argument("--sizes", default="micro,tiny,small,base", help="student sizes, comma-separated")
    p.add_argument("--alpha", type=float, default=0.5)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    t0 = time.perf_counter()
    workdir = Path(args.workdir).resolve()
    train_corpus = CorpusConfig(split="train")
    demo = DemoConfig()  # the demo's teacher settings: its cached teacher is reused
    teacher = ensure_demo_teacher(str(workdir), [d.text for d in read_documents(train_corpus)],
                                  minutes=demo.teacher_minutes, max_steps=demo.teacher_steps, log=print)
    shards = str(workdir / "shards")
    capture = CaptureConfig(teacher=teacher, output=shards, corpus=train_corpus, num_actors=2, max_length=256,
                            docs_per_unit=32)  # the demo's capture: its shards are reused when present
    try:
        run_capture(capture, progress=False)
    except PlanMismatchError:
        shutil.rmtree(shards)
        run_capture(capture, progress=False)
    out = workdir / "bench-quality"
    cfg = SweepConfig(shards=shards, output=str(out), sizes=args.sizes.split(","), seeds=[0, 1], teacher=teacher,
                      train={"alpha": args.alpha, "steps": args.steps, "seq_len": 128, "micro_batch_size": 8,
                             "num_workers": 2, "zero_stage": 2, "lr": 3e-3, "warmup_steps": max(1, args.steps // 10),
                             "log_every": 25})
    result = run_sweep(cfg)
    print((out / "results.md").read_text())
    headline = {k: result["headline"][k] for k in ("sizes", "size_names", "kd_loss", "ce_loss", "online_kd_loss",
                                                    "seed_spread", "kd_beats_ce_all_sizes", "retention_vs_online_kd",
                                                    "teacher_passes") if k in result["headline"]}
    headline["teacher_cost"] = result["teacher_cost"]
    headline["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
