"""``raydistill demo``: the whole pipeline on the embedded corpus, on a laptop, in minutes.

1. train a byte-level BPE tokenizer and a small Llama teacher on the corpus's train split
   (cached in the work dir, so a second run skips it);
2. capture sparse targets with a pool of Ray actors (one teacher pass);
3. a short ``raydistill sweep``: several student sizes trained from those shards with DeepSpeed
   ZeRO under Ray Train, beside CE-only baselines (same size, data order and token budget) and
   dense online KD at the smallest size;
4. score everything on the held-out split and print a table; write results.csv/.md and plots;
5. ``raydistill select`` (MiniPLM difference sampling): a small reference model trained briefly
   with the teacher's tokenizer, both models score the train split, and the top documents by
   (reference − teacher) loss per token become a refined corpus that students of any tokenizer
   can train on with CE.

Every stage is the real one (``capture``, ``sweep``, ``train``, ``evaluate``, ``select``) with small
settings, and each is resumable: re-running the demo reuses finished stages.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from raydistill.config import CaptureConfig, CorpusConfig, DemoConfig, SelectConfig, SweepConfig
from raydistill.contracts.selection import selected_documents
from raydistill.contracts.shards.manifest import Manifest
from raydistill.errors import PlanMismatchError
from raydistill.recipes.pretrain import MARKER, ensure_demo_reference, ensure_demo_teacher
from raydistill.recipes.sweep import run_sweep
from raydistill.stages.capture.run import run_capture
from raydistill.stages.select.run import run_select

console = Console()
SHORT_LABELS = {"kd": "KD", "ce": "CE", "online_kd": "online KD"}


def capture_demo_shards(shards: str, teacher: str, corpus: CorpusConfig, *, address: str | None = None,
                        progress: bool = True, **settings) -> Manifest:
    """The demo's capture (2 actors, 32 documents per unit); shards left by other settings are redone."""
    cfg = CaptureConfig(teacher=teacher, output=shards, corpus=corpus, num_actors=2, max_length=256, unit_bytes=192 << 10,
                        **settings)
    return redo_if_stale(lambda: run_capture(cfg, address=address, progress=progress), shards, "shards")


def redo_if_stale(stage, output: str, what: str):
    """Run a resumable stage; if ``output`` holds the demo's own output from other settings (or an older
    raydistill), which the stage refuses by its plan hash, delete it and run the stage again."""
    try:
        return stage()
    except PlanMismatchError:
        console.print(f"   the {what} there came from other settings; starting them again")
        shutil.rmtree(output)
        return stage()


def student_settings(steps: int, alpha: float = 0.5) -> dict:
    """The demo's student training: 2 workers × 8 × 128 tokens per step, ZeRO-2, warmup + cosine."""
    return {"alpha": alpha, "steps": steps, "seq_len": 128, "micro_batch_size": 8, "num_workers": 2,
            "zero_stage": 2, "warmup_steps": max(1, steps // 10), "lr": 3e-3, "log_every": 25}


def run_demo(cfg: DemoConfig, *, address: str | None = None) -> list[dict]:
    t_demo = time.perf_counter()
    workdir = Path(cfg.workdir).expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    train_corpus = CorpusConfig(split="train", max_documents=cfg.max_documents)
    train_docs = selected_documents(train_corpus)
    heldout_docs = selected_documents(CorpusConfig(split="heldout", max_documents=cfg.max_documents))
    console.rule("[bold]raydistill demo")
    console.print(f"work dir {workdir}; corpus: {len(train_docs)} train / {len(heldout_docs)} held-out documents")

    t0 = time.perf_counter()
    console.print(f"[bold]1/5 teacher[/] (tokenizer + Llama, {cfg.teacher_steps} steps, cached)")
    teacher = ensure_demo_teacher(str(workdir), [d.text for d in train_docs], steps=cfg.teacher_steps,
                                  log=console.print)
    teacher_s = time.perf_counter() - t0
    marker = Path(teacher) / MARKER
    if marker.exists():  # the teacher's own training time, also when it was reused from an earlier run
        teacher_s = json.loads(marker.read_text()).get("result", {}).get("seconds", teacher_s)

    t0 = time.perf_counter()
    console.print(f"[bold]2/5 capture[/] (Ray actors run the teacher once over the train split; {cfg.mode} targets)")
    shards = str(workdir / "shards")
    manifest = capture_demo_shards(shards, teacher, train_corpus, mode=cfg.mode, draws=cfg.draws, k=cfg.k,
                                   mean_ids=cfg.mean_ids, address=address)
    capture_s = time.perf_counter() - t0
    console.print(f"   {manifest.total_tokens:,} tokens, {manifest.plan.num_units} shards, "
                  f"{manifest.total_bytes / manifest.total_tokens:.1f} bytes/token, {capture_s:.0f} s")

    console.print("[bold]3/5 students + 4/5 eval[/] (`raydistill sweep`: DeepSpeed ZeRO-2, 2 Ray Train workers; "
                  "only online KD loads the teacher)")
    sweep = SweepConfig(
        shards=shards, output=str(workdir), sizes=cfg.student_sizes, ce_baseline=cfg.ce_baseline,
        online_kd_sizes=cfg.online_kd_sizes, seeds=[0], teacher=teacher,
        heldout=CorpusConfig(split="heldout", max_documents=cfg.max_documents),
        train=student_settings(cfg.steps))
    result = run_sweep(sweep, address=address, log=console.print)
    rows = result["rows"]
    teacher_row = next(r for r in rows if r["kind"] == "teacher")
    teacher_row["wall_s"] = round(teacher_s, 1)
    _print_table(rows)
    if cfg.select:
        select_stage(cfg, workdir, teacher, [d.text for d in train_docs], train_corpus, address=address)
    total = time.perf_counter() - t_demo
    console.print(f"demo finished in {total / 60:.1f} min (teacher {teacher_s:.0f} s, capture {capture_s:.0f} s); "
                  f"results: {workdir / 'results.md'}, plots: {workdir / 'loss_vs_params.png'}, "
                  f"{workdir / 'training_curves.png'}")
    return rows


def select_stage(cfg: DemoConfig, workdir: Path, teacher: str, train_texts: list[str], corpus: CorpusConfig, *,
                 address: str | None) -> dict:
    """MiniPLM's difference sampling over the train split, with a reference trained here (cached)."""
    console.print(f"[bold]5/5 select[/] (MiniPLM: a small reference model, {cfg.reference_steps} steps, then "
                  "teacher and reference score every train document)")
    reference = ensure_demo_reference(str(workdir), teacher, train_texts, steps=cfg.reference_steps,
                                      log=console.print)
    select = SelectConfig(teacher=teacher, reference=reference, output=str(workdir / "select"), corpus=corpus,
                          fraction=cfg.select_fraction, num_actors=2, unit_bytes=192 << 10)
    report = redo_if_stale(lambda: run_select(select, address=address), select.output, "scores")
    console.print(f"   kept {report['kept_documents']:,} of {report['documents']:,} documents, "
                  f"{report['kept_tokens']:,} of {report['tokens']:,} tokens; mean score {report['score_mean']} "
                  f"nats/token; refined corpus {report['refined']}, report {workdir / 'select' / 'report.md'}")
    return report


def _print_table(rows: list[dict]) -> None:
    table = Table(title="held-out results (loss: lower is better; agree: top-1 agreement with the teacher)")
    for col in ("model", "params", "tokens", "loss", "ppl", "agree", "ECE", "wall s"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        table.add_row(f"{r['size']} {SHORT_LABELS[r['kind']]}" if r["kind"] != "teacher" else "teacher",
                      f"{r['params']:,}", f"{r['tokens']:,}" if r["tokens"] else "-", f"{r['loss']:.4f}",
                      f"{r['perplexity']:.1f}", f"{r['agreement']:.3f}" if r["agreement"] is not None else "-",
                      f"{r['ece']:.4f}", f"{r['wall_s']:.0f}" if r["wall_s"] is not None else "-")
    console.print(table)
    by_size: dict[str, dict[str, float]] = {}
    for r in rows:
        by_size.setdefault(r["size"], {})[r["kind"]] = r["loss"]
    for size, losses in by_size.items():
        if "kd" in losses and "ce" in losses:
            gap = losses["ce"] - losses["kd"]
            verdict = "KD ahead" if gap > 0 else "CE ahead"
            line = f"   {size}: CE {losses['ce']:.4f} vs sparse KD {losses['kd']:.4f} -> {verdict} by {abs(gap):.4f}"
            if "online_kd" in losses and losses["ce"] != losses["online_kd"]:
                line += (f"; online KD {losses['online_kd']:.4f}: sparse keeps "
                         f"{gap / (losses['ce'] - losses['online_kd']):.0%} of its gain")
            console.print(line)
