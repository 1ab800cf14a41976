"""Corpus-scale benchmark: plan a multi-GB corpus from metadata, capture a sample of its units, and show
that the driver's memory, time and reads do not grow with the corpus.

1. Generates (once, reused while its marker matches) a synthetic corpus of ``--gb`` GB and ``--docs``
   documents on local disk: half Parquet (row groups of 8,192 rows), half JSON lines, deterministic
   text (words of the embedded corpus, document i starts with its number, so every id is unique).
2. A fresh *driver process* plans it with ``prepare_capture`` (the capture's own planning: one listing,
   Parquet footers, byte ranges, the vocabulary table counted by Ray tasks) and captures a fixed,
   evenly spaced sample of its units with the demo teacher on the actor pool, twice. It reports its own
   peak RSS (``resource.getrusage``), the bytes of document text it read (``io.slices.text_bytes_read``,
   counted wherever a reader touches document bytes), every byte it read at all (``/proc/self/io``
   ``rchar``: imports and footers included), and the bytes it sent to the actors.
3. The same units' documents are written as a small corpus (one file per unit) and a second driver
   captures them the same way: tokens/s of the same work, from a small corpus, in the same run.

Last line: one JSON object with ``corpus_bytes`` (bytes of document text; ``corpus_disk_bytes``: the files,
Parquet compressed), ``documents``, ``plan_seconds``, ``driver_peak_rss_mib``,
``driver_text_bytes_read``, ``capture_tokens_per_s``, ``capture_tokens_per_s_small_corpus`` and more.

    python tools/bench_scale.py                       # 4 GB, 2M documents (≈ 10 minutes on 2 cores)
    python tools/bench_scale.py --gb 0.05 --docs 20000  # a quick look
"""

from __future__ import annotations

import argparse
import json
import pickle
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

MARKER = "corpus.json"
PARQUET_ROW_GROUP = 8192


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gb", type=float, default=4.0, help="corpus size in GB (10^9 bytes), half Parquet, half jsonl")
    p.add_argument("--docs", type=int, default=2_000_000, help="documents in the corpus")
    p.add_argument("--files", type=int, default=16, help="files per half")
    p.add_argument("--dir", default="/tmp/raydistill-scale", help="where the corpus and outputs go")
    p.add_argument("--teacher", default="raydistill-demo/teacher",
                   help="teacher directory (default: the demo's; trained here first if missing)")
    p.add_argument("--unit-bytes", type=int, default=4 << 20, help="corpus bytes per unit")
    p.add_argument("--sample-units", type=int, default=6, help="units of the plan captured (evenly spaced)")
    p.add_argument("--sample-unit-bytes", type=int, default=256 << 10,
                   help="each sampled unit is cut to this many bytes of documents, so the sample fits the machine")
    p.add_argument("--actors", type=int, default=1, help="teacher actors")
    p.add_argument("--driver", choices=["big", "small"], help=argparse.SUPPRESS)  # the measured driver process
    return p.parse_args(argv)


# --- the synthetic corpus ------------------------------------------------------------------------------


def _words() -> np.ndarray:
    from raydistill.io.documents import default_documents

    seen: dict[str, None] = {}
    for doc in default_documents():
        for word in doc.text.split():
            if word.isalpha() and len(seen) < 20_000:
                seen[word] = None
    return np.array(list(seen), dtype=object)


def generate(root: Path, gb: float, docs: int, files: int) -> dict:
    """Write the corpus unless ``root/corpus.json`` says it is already there with these settings."""
    want = {"gb": gb, "docs": docs, "files": files, "row_group": PARQUET_ROW_GROUP, "version": 1}
    marker = root / MARKER
    if marker.exists() and json.loads(marker.read_text()).get("settings") == want:
        return json.loads(marker.read_text())
    import pyarrow as pa
    import pyarrow.parquet as pq

    shutil.rmtree(root / "corpus", ignore_errors=True)
    (root / "corpus").mkdir(parents=True)
    words = _words()
    mean_len = float(np.mean([len(w) for w in words])) + 1
    words_per_doc = max(8, int(gb * 1e9 / docs / mean_len))
    rng = np.random.default_rng(0)
    t0, written, index = time.perf_counter(), 0, 0
    per_file = docs // (2 * files)
    for half in ("parquet", "jsonl"):
        for f in range(files):
            n = per_file if (half, f) != ("jsonl", files - 1) else docs - index
            lengths = rng.integers(words_per_doc // 2, words_per_doc * 3 // 2 + 1, size=n)
            picks = rng.integers(0, len(words), size=int(lengths.sum()))
            texts, at = [], 0
            for i, length in enumerate(lengths):
                texts.append(f"Document {index + i}. " + " ".join(words[picks[at : at + length]]))
                at += length
            path = root / "corpus" / f"{half}-{f:03d}.{half}"
            if half == "parquet":
                pq.write_table(pa.table({"text": texts}), path, row_group_size=PARQUET_ROW_GROUP, compression="zstd")
            else:
                with open(path, "w") as out:
                    out.writelines(json.dumps({"text": t}) + "\n" for t in texts)
            written += sum(len(t.encode()) for t in texts)
            index += n
            print(f"  wrote {path.name}: {n:,} documents ({time.perf_counter() - t0:.0f} s)", flush=True)
    info = {"settings": want, "documents": index, "text_bytes": written,
            "disk_bytes": sum(p.stat().st_size for p in (root / "corpus").iterdir()),
            "generate_seconds": round(time.perf_counter() - t0, 1)}
    marker.write_text(json.dumps(info))
    return info


# --- the measured driver -------------------------------------------------------------------------------


def _rchar() -> int:
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("rchar:"):
                return int(line.split()[1])
    except OSError:
        pass
    return -1


def _cut(piece, max_bytes: int):
    """A sampled slice cut to ``max_bytes`` (byte ranges and row ranges alike), so the sample fits 2 cores."""
    from raydistill.io.slices import Slice

    if piece.span == "bytes":
        return Slice(**{**piece.as_dict(), "stop": min(piece.stop, piece.start + max_bytes),
                        "bytes": min(piece.bytes, max_bytes)})
    rows = max(1, int((piece.stop - piece.start) * max_bytes / max(piece.bytes, 1)))
    return Slice(**{**piece.as_dict(), "stop": min(piece.stop, piece.start + rows), "bytes": min(piece.bytes, max_bytes)})


def drive(args: argparse.Namespace) -> dict:
    """One driver: plan, then capture the sample twice; prints its own figures as one JSON line."""
    from raydistill.config import CaptureConfig
    from raydistill.contracts.plan import Plan, WorkUnit
    from raydistill.io import slices
    from raydistill.runtime.units import PlannedUnits, run_units
    from raydistill.stages.capture.run import prepare_capture
    from raydistill.stages.capture.vocab_count import evenly_spaced
    from raydistill.stages.capture.worker import TeacherWorker

    root = Path(args.dir)
    source = str(root / ("corpus" if args.driver == "big" else "small"))
    rates, tokens, sent = [], 0, 0
    plan_seconds, units_planned, plan_bytes = [], 0, 0
    for attempt in range(2):
        out = root / f"out-{args.driver}-{attempt}"
        shutil.rmtree(out, ignore_errors=True)
        cfg = CaptureConfig(teacher=args.teacher, output=str(out), corpus={"source": source, "split": "all"},
                            unit_bytes=args.unit_bytes if args.driver == "big" else 1 << 40, num_actors=args.actors,
                            max_length=256, batch_tokens=4096, vocab_sample_tokens=200_000, mode="budget", k=96)
        t0 = time.perf_counter()
        prepared = prepare_capture(cfg)
        plan_seconds.append(time.perf_counter() - t0)
        plan = prepared.planned.plan
        units_planned, plan_bytes = len(plan.units), plan.bytes
        if args.driver == "big":
            picked = [WorkUnit.of(i, _cut(u.slice, args.sample_unit_bytes))
                      for i, u in enumerate(evenly_spaced(plan.units, args.sample_units))]
        else:
            picked = [WorkUnit.of(i, u.slice) for i, u in enumerate(plan.units)]
        sample = Plan.of_units(picked, corpus=plan.corpus, settings=plan.settings)
        sent += sum(len(pickle.dumps(u.slice)) for u in sample.units)  # what drive_units ships per call
        planned = PlannedUnits(plan=sample, todo=sample.units, resumed=False, stale_temporaries=0, set_aside=[])
        result = run_units(TeacherWorker, prepared.settings, planned, cfg, output=str(out), subdirs=("shards",),
                           address=None, progress=False, what="capture")
        tokens = sum(a.tokens for a in result.actors)
        busy = sum(a.busy_seconds for a in result.actors) / max(len(result.actors), 1)
        rates.append(tokens / busy)
    from ray._private import internal_api

    store = internal_api.memory_summary(stats_only=True)
    return {"plan_seconds": round(min(plan_seconds), 2), "plan_seconds_runs": [round(x, 2) for x in plan_seconds],
            "units_planned": units_planned, "plan_bytes": plan_bytes, "sample_tokens": tokens,
            "tokens_per_s": round(max(rates), 1), "tokens_per_s_runs": [round(r, 1) for r in rates],
            "driver_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "driver_text_bytes_read": slices.text_bytes_read(), "driver_read_chars": _rchar(),
            "driver_sent_to_actors_bytes": sent, "object_store": " ".join(store.split())[:300]}


def run_driver(args: argparse.Namespace, which: str) -> dict:
    argv = [sys.executable, __file__, "--driver", which, "--dir", args.dir, "--teacher", args.teacher,
            "--unit-bytes", str(args.unit_bytes), "--sample-units", str(args.sample_units),
            "--sample-unit-bytes", str(args.sample_unit_bytes), "--actors", str(args.actors)]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the {which} driver failed:\n{done.stderr[-3000:]}")
    for line in reversed(done.stdout.splitlines()):  # Ray may print worker lines after the driver's own
        if line.startswith("{"):
            return json.loads(line)
    raise SystemExit(f"the {which} driver printed no JSON line:\n{done.stdout[-3000:]}")


def write_small_corpus(args: argparse.Namespace) -> int:
    """The big driver's sampled units, each written as one small jsonl file: the same documents."""
    from raydistill.config import CorpusConfig
    from raydistill.contracts.plan import read_plan
    from raydistill.io.slices import read_slice
    from raydistill.stages.capture.vocab_count import evenly_spaced

    small = Path(args.dir) / "small"
    shutil.rmtree(small, ignore_errors=True)
    small.mkdir(parents=True)
    plan = read_plan(str(Path(args.dir) / "out-big-0"))
    count = 0
    for i, unit in enumerate(evenly_spaced(plan.units, args.sample_units)):
        docs, _ = read_slice(_cut(unit.slice, args.sample_unit_bytes), CorpusConfig(split="all"))
        with open(small / f"unit-{i:03d}.jsonl", "w") as f:
            f.writelines(json.dumps({"text": d.text}) + "\n" for d in docs)
        count += len(docs)
    return count


def ensure_teacher(args: argparse.Namespace) -> None:
    if Path(args.teacher, "config.json").exists():
        return
    from raydistill.config import CorpusConfig
    from raydistill.io.corpus import read_documents
    from raydistill.recipes.pretrain import ensure_demo_teacher

    print(f"no teacher at {args.teacher}: training the demo teacher there first", flush=True)
    workdir = str(Path(args.teacher).parent)
    ensure_demo_teacher(workdir, [d.text for d in read_documents(CorpusConfig(split="train"))], steps=300)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.driver:
        print(json.dumps(drive(args)), flush=True)
        return
    ensure_teacher(args)
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    print(f"corpus: {args.gb:g} GB, {args.docs:,} documents in {root / 'corpus'}", flush=True)
    corpus = generate(root, args.gb, args.docs, args.files)
    print("driver 1: plan the big corpus, capture a sample of its units (twice)", flush=True)
    big = run_driver(args, "big")
    sample_docs = write_small_corpus(args)
    print(f"driver 2: the same {args.sample_units} units' {sample_docs:,} documents as a small corpus (twice)",
          flush=True)
    small = run_driver(args, "small")
    ratio = big["tokens_per_s"] / small["tokens_per_s"]
    rows = [("corpus", f"{corpus['text_bytes'] / 1e9:.2f} GB of text ({corpus['disk_bytes'] / 1e9:.2f} GB on disk), "
                       f"{corpus['documents']:,} documents"),
            ("plan (listing, footers, ranges, vocab tasks)", f"{big['plan_seconds']} s, {big['units_planned']} units"),
            ("driver peak RSS", f"{big['driver_peak_rss_mib']} MiB (small corpus: {small['driver_peak_rss_mib']})"),
            ("driver document bytes read", f"{big['driver_text_bytes_read']:,}"),
            ("driver bytes read in all", f"{big['driver_read_chars']:,} (imports, tokenizer, footers)"),
            ("driver bytes sent per run", f"{big['driver_sent_to_actors_bytes']:,} for {args.sample_units} units"),
            ("capture tok/s, big corpus", f"{big['tokens_per_s']:,.0f}"),
            ("capture tok/s, small corpus", f"{small['tokens_per_s']:,.0f} (ratio {ratio:.3f})")]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    print(json.dumps({
        "corpus_bytes": corpus["text_bytes"], "corpus_disk_bytes": corpus["disk_bytes"],
        "documents": corpus["documents"],
        "generate_seconds": corpus["generate_seconds"], "units_planned": big["units_planned"],
        "plan_seconds": big["plan_seconds"], "plan_seconds_runs": big["plan_seconds_runs"],
        "driver_peak_rss_mib": big["driver_peak_rss_mib"],
        "driver_peak_rss_mib_small_corpus": small["driver_peak_rss_mib"],
        "driver_text_bytes_read": big["driver_text_bytes_read"], "driver_read_chars": big["driver_read_chars"],
        "driver_sent_to_actors_bytes": big["driver_sent_to_actors_bytes"],
        "object_store_after_run": big["object_store"],
        "sample_units": args.sample_units, "sample_tokens": big["sample_tokens"],
        "capture_tokens_per_s": big["tokens_per_s"], "capture_tokens_per_s_small_corpus": small["tokens_per_s"],
        "capture_tokens_per_s_runs": big["tokens_per_s_runs"],
        "capture_tokens_per_s_small_corpus_runs": small["tokens_per_s_runs"],
        "capture_ratio": round(ratio, 4),
        "targets_met": bool(big["driver_peak_rss_mib"] <= 1024 and big["plan_seconds"] <= 60
                            and big["driver_text_bytes_read"] == 0 and abs(ratio - 1) <= 0.05
                            and corpus["text_bytes"] >= 4e9 and corpus["documents"] >= 2_000_000),
    }))


if __name__ == "__main__":
    main()
