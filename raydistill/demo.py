"""``raydistill demo``: the whole pipeline on the embedded corpus, on a laptop, in minutes.

1. train a byte-level BPE tokenizer and a small Llama teacher on the corpus's train split
   (cached in the work dir, so a second run skips it);
2. capture sparse top-k targets with a pool of Ray actors (one teacher pass);
3. train several student sizes from those shards with DeepSpeed ZeRO under Ray Train,
   plus CE-only baselines with the same size, data order and token budget;
4. score everything on the held-out split and print a table; write results.csv and a plot.

Every stage is the real one (``precompute``, ``train``, ``eval``) with small settings, and
each is resumable: re-running the demo reuses finished stages.
"""

from __future__ import annotations

import csv
import json
import shutil
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from raydistill.capture import run_capture
from raydistill.config import CaptureConfig, CorpusConfig, DemoConfig, TrainConfig
from raydistill.corpus import read_documents
from raydistill.errors import PlanMismatchError
from raydistill.evaluate import evaluate_model
from raydistill.pretrain import MARKER, ensure_demo_teacher
from raydistill.train import finished_summary, run_training

console = Console()


def _student_run(cfg: DemoConfig, workdir: Path, shards: str, size: str, loss: str, address: str | None) -> dict:
    """Train (or reuse) one student; returns its summary including wall time."""
    out = workdir / "students" / f"{size}-{'kd' if loss == 'forward_kl' else 'ce'}"
    train_cfg = TrainConfig(shards=shards, output=str(out), student={"size": size}, loss=loss, alpha=0.5,
                            steps=cfg.steps, seq_len=128, micro_batch_size=8, num_workers=2, zero_stage=2,
                            warmup_steps=max(1, cfg.steps // 10), lr=3e-3, log_every=25)
    summary = finished_summary(train_cfg)
    if summary is not None:
        return {**summary, "dir": str(out)}  # finished earlier with the same settings and shards
    if (out / "summary.json").exists():
        shutil.rmtree(out)  # finished with other settings or shards: start this student over
    return {**run_training(train_cfg, address=address), "dir": str(out)}


def run_demo(cfg: DemoConfig, *, address: str | None = None) -> list[dict]:
    t_demo = time.perf_counter()
    workdir = Path(cfg.workdir).expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    train_corpus = CorpusConfig(split="train", max_documents=cfg.max_documents)
    train_docs = read_documents(train_corpus)
    heldout_docs = read_documents(CorpusConfig(split="heldout", max_documents=cfg.max_documents))
    console.rule("[bold]raydistill demo")
    console.print(f"work dir {workdir}; corpus: {len(train_docs)} train / {len(heldout_docs)} held-out documents")

    t0 = time.perf_counter()
    console.print(f"[bold]1/4 teacher[/] (tokenizer + Llama, {cfg.teacher_steps} steps, cached)")
    teacher = ensure_demo_teacher(str(workdir), [d.text for d in train_docs], minutes=cfg.teacher_minutes,
                                  max_steps=cfg.teacher_steps, log=console.print)
    teacher_s = time.perf_counter() - t0
    marker = Path(teacher) / MARKER
    if marker.exists():  # the teacher's own training time, also when it was reused from an earlier run
        teacher_s = json.loads(marker.read_text()).get("result", {}).get("seconds", teacher_s)

    t0 = time.perf_counter()
    console.print("[bold]2/4 capture[/] (Ray actors run the teacher once over the train split)")
    shards = str(workdir / "shards")
    capture_cfg = CaptureConfig(teacher=teacher, output=shards, corpus=train_corpus, k=cfg.k, mean_ids=cfg.mean_ids,
                                num_actors=2, max_length=256, docs_per_unit=32)
    try:
        manifest = run_capture(capture_cfg, address=address)
    except PlanMismatchError:  # the demo's own shards from other settings (or an older raydistill): redo them
        console.print("   the shards there came from other settings; capturing again")
        shutil.rmtree(shards)
        manifest = run_capture(capture_cfg, address=address)
    capture_s = time.perf_counter() - t0
    console.print(f"   {manifest.total_tokens:,} tokens, {manifest.plan.num_units} shards, "
                  f"{manifest.total_bytes / manifest.total_tokens:.1f} bytes/token, {capture_s:.0f} s")

    console.print("[bold]3/4 students[/] (DeepSpeed ZeRO-2, 2 Ray Train workers; the teacher is not loaded)")
    runs = [(size, "forward_kl") for size in cfg.student_sizes] + [(size, "ce") for size in cfg.ce_baseline_sizes]
    results = []
    for size, loss in runs:
        console.print(f"   training {size} ({'sparse KD + CE' if loss == 'forward_kl' else 'CE only'}) ...")
        summary = _student_run(cfg, workdir, shards, size, loss, address)
        results.append({"model": f"{size} {'KD' if loss == 'forward_kl' else 'CE'}", "size": size,
                        "kind": "kd" if loss == "forward_kl" else "ce", "tokens": summary["tokens"],
                        "wall_s": summary["wall_seconds"], "dir": str(Path(summary["dir"]) / "model")})

    console.print("[bold]4/4 eval[/] (held-out split, same windows for every model)")
    for row in [{"model": "teacher", "size": "teacher", "kind": "teacher", "tokens": None,
                 "wall_s": round(teacher_s, 1), "dir": teacher}, *results]:
        scores = evaluate_model(row["dir"], heldout_docs, max_length=256)
        row.update(params=scores["params"], loss=round(scores["loss"], 4), perplexity=round(scores["perplexity"], 2))
        if row["kind"] == "teacher":
            results.insert(0, row)

    _write_outputs(workdir, results)
    _print_table(results)
    total = time.perf_counter() - t_demo
    console.print(f"demo finished in {total / 60:.1f} min (teacher {teacher_s:.0f} s, capture {capture_s:.0f} s); "
                  f"results: {workdir / 'results.csv'}, plot: {workdir / 'results.png'}")
    return results


def _print_table(results: list[dict]) -> None:
    table = Table(title="held-out results (lower loss is better)")
    for col in ("model", "params", "tokens", "held-out loss", "perplexity", "wall s"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in results:
        table.add_row(r["model"], f"{r['params']:,}", f"{r['tokens']:,}" if r["tokens"] else "-",
                      f"{r['loss']:.4f}", f"{r['perplexity']:.1f}", f"{r['wall_s']:.0f}")
    console.print(table)
    by_size = {}
    for r in results:
        by_size.setdefault(r["size"], {})[r["kind"]] = r["loss"]
    for size, losses in by_size.items():
        if "kd" in losses and "ce" in losses:
            gap = losses["ce"] - losses["kd"]
            verdict = "KD ahead" if gap > 0 else "CE ahead"
            console.print(f"   {size}: CE {losses['ce']:.4f} vs KD {losses['kd']:.4f} -> {verdict} by {abs(gap):.4f}")


def _write_outputs(workdir: Path, results: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fields = ["model", "kind", "size", "params", "tokens", "loss", "perplexity", "wall_s", "dir"]
    with open(workdir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows({k: r[k] for k in fields} for r in results)

    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, style, label in (("kd", "o-", "sparse offline KD"), ("ce", "s--", "CE only")):
        rows = sorted((r for r in results if r["kind"] == kind), key=lambda r: r["params"])
        if rows:
            ax.plot([r["params"] for r in rows], [r["loss"] for r in rows], style, label=label)
    teacher = next((r for r in results if r["kind"] == "teacher"), None)
    if teacher:
        ax.axhline(teacher["loss"], color="gray", linestyle=":", label=f"teacher ({teacher['params']:,} params)")
    ax.set_xscale("log")
    ax.set_xlabel("student parameters")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title("raydistill demo: one capture, many students")
    ax.legend()
    fig.tight_layout()
    fig.savefig(workdir / "results.png", dpi=120)
    plt.close(fig)
