"""Quality benchmark: does one sparse capture teach students as well as the teacher would online?

Usage: python tools/bench_quality.py [--teacher DIR [--gguf-file F]] [--workdir raydistill-demo]
                                    [--steps 150 | --epochs 1]
                                    [--sizes micro,tiny,small,base | --sizes JSON] [--max-documents N]
                                    [--capture KEY=VALUE ...] [--train KEY=VALUE ...]

On the embedded default corpus: a teacher (default: the demo teacher, trained and cached by
`raydistill demo` or here; `--teacher` any HF directory, or a GGUF file in one with
`--gguf-file`, exported once to an HF directory so online KD and scoring load it like any
model), one capture of the train split with the demo's capture settings (sampled, 32 draws,
unless `--capture` says otherwise), then `raydistill sweep`: sparse offline KD at every size,
CE-only at every size, dense online KD at the smallest, two seeds at the smallest; every model
scored on the held-out split. `--sizes` takes named sizes or a JSON list of students of any shape
(`[{"name": "h64", "family": "llama", "hidden": 64, ...}, ...]`); with `--teacher` the default is
REAL_TEACHER_LADDER, four Llama students at the teacher's vocabulary spanning 12x in parameters.
Writes results.md / results.csv / plots under <workdir>/bench-quality-<label> and prints, as its
last line (Ray is shut down first, so no worker line can follow it), one JSON object: sizes, kd_loss,
ce_loss, online_kd_loss, seed_spread (CE, KD and online KD at the smallest size), kd_beats_ce_all_sizes,
retention_vs_online_kd (and per seed), online_kd_gain and online_gain_over_3x_spread,
teacher, bytes_per_token, mode, capture, teacher_passes. About 15 minutes on 2 CPU cores with the
demo teacher.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from raydistill.config import CorpusConfig, DemoConfig, SweepConfig
from raydistill.config import parse_override as config_override
from raydistill.recipes.demo import capture_demo_shards, student_settings

# Students for a real teacher (its vocabulary, tied embeddings): 1.6M, 3.3M, 6.7M and 19.4M parameters at
# SmolLM2's 49,152 ids (12x). At that vocabulary the output layer is most of every student's compute, so the
# ladder stays narrow for the 12 runs to fit about an hour on 2 CPU cores.
REAL_TEACHER_LADDER = [
    {"name": "h32", "family": "llama", "hidden": 32, "layers": 1, "heads": 2},
    {"name": "h64", "family": "llama", "hidden": 64, "layers": 2, "heads": 2},
    {"name": "h128", "family": "llama", "hidden": 128, "layers": 2, "heads": 4},
    {"name": "h320", "family": "llama", "hidden": 320, "layers": 3, "heads": 5},
]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", default=None, help="teacher directory (default: the demo teacher, cached)")
    p.add_argument("--gguf-file", default=None, help="a GGUF file inside --teacher")
    p.add_argument("--workdir", default="raydistill-demo", help="work dir (teachers and shards are reused)")
    p.add_argument("--steps", type=int, default=150, help="optimizer steps per student")
    p.add_argument("--epochs", type=float, default=None, help="train this many passes over the capture instead "
                   "of --steps (whole epochs give every seed the same tokens: docs/results.md, seed noise)")
    p.add_argument("--sizes", default=None, help="named sizes, comma-separated, or a JSON list of students")
    p.add_argument("--max-documents", type=int, default=None, help="cap on the train documents captured")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--capture", action="append", default=[], metavar="KEY=VALUE",
                   help="capture setting other than the demo's (e.g. mode=budget); the shards then go to a "
                   "directory named by the settings")
    p.add_argument("--train", action="append", default=[], metavar="KEY=VALUE",
                   help="student training setting shared by every run (e.g. seq_len=64)")
    p.add_argument("--output", default=None, help="sweep output (default <workdir>/bench-quality-<label>)")
    return p.parse_args()


def parse_override(item: str) -> tuple[str, object]:
    key, value = config_override(item)
    return ".".join(key), value


def shards_dir(workdir: Path, teacher_label: str, settings: dict, max_documents: int | None) -> str:
    """Where a capture of these settings is cached: every study that names its shards this way reuses them."""
    return str(workdir / "-".join(["shards", teacher_label, *(f"{k}{v}" for k, v in settings.items()),
                                   *([f"docs{max_documents}"] if max_documents else [])]))


def steps_for_epochs(epochs: float, capture_tokens: int, train: dict) -> int:
    """Optimizer steps that read ``epochs`` passes over the capture: the reader packs every step full
    (workers x micro-batch x seq_len tokens, times gradient accumulation)."""
    per_step = train["num_workers"] * train["micro_batch_size"] * train["seq_len"] * train.get("grad_accum", 1)
    return max(1, round(epochs * capture_tokens / per_step))


def ladder(sizes: str | None, real_teacher: bool) -> list:
    if sizes is None:
        return REAL_TEACHER_LADDER if real_teacher else ["micro", "tiny", "small", "base"]
    return json.loads(sizes) if sizes.lstrip().startswith("[") else sizes.split(",")


def prepare_teacher(args: argparse.Namespace, workdir: Path) -> tuple[str, str]:
    """(teacher directory, its label): the demo teacher (trained on the whole train split, whatever part of it
    is captured, so it stays the one `raydistill demo` caches), an HF directory, or a GGUF file exported once."""
    if args.teacher is None:
        from raydistill.contracts.selection import selected_documents
        from raydistill.recipes.pretrain import ensure_demo_teacher

        texts = [d.text for d in selected_documents(CorpusConfig(split="train"))]
        return ensure_demo_teacher(str(workdir), texts, steps=DemoConfig().teacher_steps, log=print), "demo"
    if args.gguf_file is None:
        return str(Path(args.teacher).resolve()), Path(args.teacher).name
    from raydistill.models.gguf_export import export_gguf

    stem = Path(args.gguf_file).stem
    print(f"teacher {args.teacher}/{args.gguf_file}: exporting to an HF directory (once)", flush=True)
    return export_gguf(args.teacher, args.gguf_file, str(workdir / "teachers" / stem)), stem


def main() -> None:
    args = parse_args()
    t0 = time.perf_counter()
    workdir = Path(args.workdir).resolve()
    train_corpus = CorpusConfig(split="train", max_documents=args.max_documents)
    teacher, teacher_label = prepare_teacher(args, workdir)
    demo = DemoConfig()
    overrides = dict(parse_override(item) for item in args.capture)
    capture = {"mode": demo.mode, "draws": demo.draws, "k": demo.k, "mean_ids": demo.mean_ids, **overrides}
    demo_capture = args.teacher is None and not overrides and args.max_documents is None
    # the demo's capture goes to the demo's own shards (reused when present); any other to a directory of its own
    shards = str(workdir / "shards") if demo_capture else shards_dir(workdir, teacher_label, overrides,
                                                                     args.max_documents)
    t_capture = time.perf_counter()
    manifest = capture_demo_shards(shards, teacher, train_corpus, progress=False, **capture)
    print(f"capture: {manifest.total_tokens:,} tokens, {manifest.total_bytes / manifest.total_tokens:.1f} B/token "
          f"({time.perf_counter() - t_capture:.0f} s)", flush=True)
    train_overrides = dict(parse_override(i) for i in args.train)
    steps = args.steps
    if args.epochs is not None:
        steps = steps_for_epochs(args.epochs, manifest.total_tokens, {**student_settings(1), **train_overrides})
    train = {**student_settings(steps, alpha=args.alpha), **train_overrides}
    label = "-".join([teacher_label, capture["mode"], f"steps{steps}",  # a sweep per budget: none overwrites another
                      *(f"{k}{v}" for k, v in {**overrides, **train_overrides}.items() if k != "mode")])
    out = Path(args.output) if args.output else workdir / f"bench-quality-{label}"
    cfg = SweepConfig(shards=shards, output=str(out), sizes=ladder(args.sizes, args.teacher is not None),
                      seeds=[0, 1], teacher=teacher, heldout=CorpusConfig(split="heldout"), train=train)
    from raydistill.recipes.sweep import run_sweep

    result = run_sweep(cfg)
    print((out / "results.md").read_text())
    headline = {k: result["headline"][k] for k in ("sizes", "size_names", "kd_loss", "ce_loss", "online_kd_loss",
                                                    "seed_spread", "kd_beats_ce_all_sizes", "retention_vs_online_kd",
                                                    "retention_per_seed", "retention_seeds",
                                                    "online_kd_gain", "online_gain_over_3x_spread",
                                                    "teacher_passes") if k in result["headline"]}
    headline["teacher"] = teacher if args.gguf_file is None else f"{args.teacher}/{args.gguf_file}"
    headline["bytes_per_token"] = round(manifest.total_bytes / manifest.total_tokens, 2)
    headline["mode"] = manifest.sparsify.mode
    headline["capture"] = {k: v for k, v in capture.items() if v is not None}
    headline["capture_tokens"] = manifest.total_tokens
    headline["train_overrides"] = args.train
    headline["teacher_cost"] = result["teacher_cost"]
    headline["seconds"] = round(time.perf_counter() - t0, 1)
    import ray

    ray.shutdown()  # no worker log line can be printed after the JSON
    sys.stdout.flush()
    print(json.dumps(headline), flush=True)


if __name__ == "__main__":
    main()
