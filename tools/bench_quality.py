"""Quality benchmark: does one sparse capture teach students as well as the teacher would online?

Usage: python tools/bench_quality.py [--workdir raydistill-demo] [--steps 150] [--sizes micro,tiny,small,base]
                                    [--capture KEY=VALUE ...] [--train KEY=VALUE ...]

On the embedded default corpus: the demo teacher (trained and cached by `raydistill demo`, or
here), one capture of the train split with the demo's settings (sampled, 64 draws: the demo's
own shards are reused; `--capture mode=budget` measures the format's default instead), then
`raydistill sweep`: sparse offline KD at every
size, CE-only at every size, dense online KD at the smallest, two seeds at the smallest; every
model scored on the held-out split. Writes the sweep's results.md / results.csv / plots under
<workdir>/bench-quality and prints, as its last line, one JSON object: sizes, kd_loss, ce_loss,
online_kd_loss, seed_spread, kd_beats_ce_all_sizes, retention_vs_online_kd, teacher_passes.
About 15 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from raydistill.config import CorpusConfig, DemoConfig, SweepConfig
from raydistill.config import parse_override as config_override
from raydistill.io.corpus import read_documents
from raydistill.recipes.demo import capture_demo_shards, student_settings
from raydistill.recipes.pretrain import ensure_demo_teacher
from raydistill.recipes.sweep import run_sweep


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="raydistill-demo", help="the demo's work dir (teacher and shards are reused)")
    p.add_argument("--steps", type=int, default=150, help="optimizer steps per student (2 workers x 8 x 128 tokens)")
    p.add_argument("--sizes", default="micro,tiny,small,base", help="student sizes, comma-separated")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--capture", action="append", default=[], metavar="KEY=VALUE",
                   help="capture setting other than the default (e.g. mode=sampled); the shards then go to "
                   "<workdir>/bench-quality/shards-<settings> instead of the demo's")
    p.add_argument("--train", action="append", default=[], metavar="KEY=VALUE",
                   help="student training setting shared by every run (e.g. tail_target=prior)")
    p.add_argument("--output", default=None, help="sweep output (default <workdir>/bench-quality[-<settings>])")
    return p.parse_args()


def parse_override(item: str) -> tuple[str, object]:
    key, value = config_override(item)
    return ".".join(key), value


def main() -> None:
    args = parse_args()
    t0 = time.perf_counter()
    workdir = Path(args.workdir).resolve()
    train_corpus = CorpusConfig(split="train")
    demo = DemoConfig()  # the demo's teacher settings: its cached teacher is reused
    teacher = ensure_demo_teacher(str(workdir), [d.text for d in read_documents(train_corpus)],
                                  steps=demo.teacher_steps, log=print)
    overrides = dict(parse_override(item) for item in args.capture)
    capture = {"mode": demo.mode, "draws": demo.draws, "k": demo.k, "mean_ids": demo.mean_ids, **overrides}
    # the demo's capture goes to the demo's own shards (reused when present); any other to a directory of its own
    label = "-".join(f"{k}{v}" for k, v in overrides.items())
    shards = str(workdir / (f"shards-{label}" if overrides else "shards"))
    capture_demo_shards(shards, teacher, train_corpus, progress=False, **capture)
    train_overrides = dict(parse_override(i) for i in args.train)
    train = {**student_settings(args.steps, alpha=args.alpha), **train_overrides}
    label = "-".join([capture["mode"], *(f"{k}{v}" for k, v in {**overrides, **train_overrides}.items() if k != "mode")])
    out = Path(args.output) if args.output else workdir / f"bench-quality-{label}"
    cfg = SweepConfig(shards=shards, output=str(out), sizes=args.sizes.split(","), seeds=[0, 1], teacher=teacher,
                      train=train)
    result = run_sweep(cfg)
    print((out / "results.md").read_text())
    headline = {k: result["headline"][k] for k in ("sizes", "size_names", "kd_loss", "ce_loss", "online_kd_loss",
                                                    "seed_spread", "kd_beats_ce_all_sizes", "retention_vs_online_kd",
                                                    "retention_per_seed", "retention_seeds",
                                                    "teacher_passes") if k in result["headline"]}
    headline["capture"] = {k: v for k, v in capture.items() if v is not None}
    headline["train_overrides"] = args.train
    headline["teacher_cost"] = result["teacher_cost"]
    headline["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
