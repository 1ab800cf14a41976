"""The sweep's results for a person: headline figures, results.csv/.md, summary.json and two plots."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from raydistill.contracts.students import METRICS_NAME
from raydistill.io import storage

__all__ = ["KIND_LABELS", "results_markdown", "summarize", "write_results"]

KIND_LABELS = {"kd": "sparse offline KD", "ce": "CE only", "online_kd": "dense online KD", "teacher": "teacher"}


def summarize(rows: list[dict], smallest: str, seeds: list[int]) -> dict:
    """The sweep's headline figures (the JSON that tools/bench_quality.py prints)."""
    def loss(kind: str, size: str, seed: int) -> float | None:
        hit = [r["loss"] for r in rows if r["kind"] == kind and r["size"] == size and r["seed"] == seed]
        return hit[0] if hit else None

    sizes = sorted({r["size"] for r in rows if r["kind"] == "kd"}, key=lambda s: next(
        r["params"] for r in rows if r["size"] == s))
    seed0 = seeds[0]
    kd = [loss("kd", s, seed0) for s in sizes]
    ce = [loss("ce", s, seed0) for s in sizes]
    # the seed noise: the largest gap between two seeds of one kind at the smallest size (dense online KD too,
    # when it ran at both: its own gain must clear this noise for a retention figure to mean something)
    spreads = [abs(loss(k, smallest, seeds[0]) - loss(k, smallest, seeds[1]))
               for k in ("kd", "ce", "online_kd") if len(seeds) > 1
               and None not in (loss(k, smallest, seeds[0]), loss(k, smallest, seeds[1]))]
    spread = max(spreads) if spreads else None
    out = {"sizes": [next(r["params"] for r in rows if r["size"] == s) for s in sizes], "size_names": sizes,
           "kd_loss": kd, "ce_loss": ce, "online_kd_loss": loss("online_kd", smallest, seed0), "seed_spread": spread}
    if all(c is not None for c in ce) and spread is not None:
        out["kd_beats_ce_all_sizes"] = all(c - k > spread for c, k in zip(ce, kd, strict=True))
    # retention at the smallest size, over the seeds that have all three kinds (their means)
    full = [s for s in seeds if None not in (loss("kd", smallest, s), loss("ce", smallest, s),
                                             loss("online_kd", smallest, s))]
    if full:
        mean = {k: sum(loss(k, smallest, s) for s in full) / len(full) for k in ("kd", "ce", "online_kd")}
        out["retention_seeds"] = full
        out["retention_per_seed"] = [round((loss("ce", smallest, s) - loss("kd", smallest, s))
                                           / (loss("ce", smallest, s) - loss("online_kd", smallest, s)), 4)
                                     for s in full]
        if mean["ce"] != mean["online_kd"]:
            out["retention_vs_online_kd"] = round((mean["ce"] - mean["kd"]) / (mean["ce"] - mean["online_kd"]), 4)
        out["online_kd_gain"] = round(mean["ce"] - mean["online_kd"], 4)
        if spread is not None:  # retention is worth reading only where online KD's gain is well clear of the noise
            out["online_gain_over_3x_spread"] = out["online_kd_gain"] >= 3 * spread
    return out


def write_results(output: str, rows: list[dict], cost: dict, headline: dict) -> None:
    """results.csv, results.md, loss_vs_params.png, training_curves.png and summary.json under ``output``,
    each written whole or not at all (an older file stays until its new version is complete)."""
    fields = ["run", "kind", "size", "seed", "params", "tokens", "wall_s", "loss", "perplexity", "agreement",
              "top1_accuracy", "ece"]
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    storage.atomic_write_text(storage.join(output, "results.csv"), table.getvalue())
    storage.atomic_write_text(storage.join(output, "results.md"), results_markdown(rows, cost, headline))
    storage.atomic_write_bytes(storage.join(output, "loss_vs_params.png"), _plot_loss_vs_params(rows))
    storage.atomic_write_bytes(storage.join(output, "training_curves.png"), _plot_training_curves(output, rows))
    storage.atomic_write_text(storage.join(output, "summary.json"),
                              json.dumps({"headline": headline, "teacher_cost": cost}, indent=1))


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def results_markdown(rows: list[dict], cost: dict, headline: dict) -> str:
    lines = ["| run | kind | params | tokens | wall s | held-out loss | perplexity | agreement | ECE |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {KIND_LABELS[r['kind']]} | {r['params']:,} | {_fmt(r['tokens'], ',')} | "
                     f"{_fmt(r['wall_s'], '.0f')} | {r['loss']:.4f} | {r['perplexity']:.1f} | "
                     f"{_fmt(r['agreement'], '.3f')} | {r['ece']:.4f} |")
    lines.append("")
    if cost.get("capture_teacher_flops"):
        lines.append(
            f"Teacher cost: the capture ran the teacher once over {cost['capture_tokens']:,} tokens "
            f"(≈ {cost['capture_teacher_flops']:.3g} forward FLOPs, {_fmt(cost['capture_seconds'], '.0f')} s). "
            f"Online KD for the same {sum(1 for r in rows if r['kind'] == 'kd')} sparse-KD students would run it "
            f"over {cost['online_kd_teacher_tokens']:,} tokens (≈ {cost['online_kd_teacher_flops']:.3g} FLOPs, "
            f"{cost['online_kd_teacher_flops'] / cost['capture_teacher_flops']:.1f}× the capture)"
            + (f"; measured, the teacher in the loop added {cost['online_kd_extra_seconds_per_run']:.0f} s to "
               "a student's wall time" if "online_kd_extra_seconds_per_run" in cost else "") + ".")
    lines.append("")
    lines.append("Headline: " + json.dumps(headline))
    return "\n".join(lines) + "\n"


def _plot_loss_vs_params(rows: list[dict]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    first_seed = min((r["seed"] for r in rows if r["seed"] is not None), default=0)
    for kind, style in (("kd", "o-"), ("ce", "s--"), ("online_kd", "^:")):
        points = sorted((r["params"], r["loss"]) for r in rows if r["kind"] == kind and r["seed"] == first_seed)
        others = [(r["params"], r["loss"]) for r in rows if r["kind"] == kind and r["seed"] != first_seed]
        if points:
            (line,) = ax.plot(*zip(*points, strict=True), style, label=KIND_LABELS[kind])
            if others:  # other seeds: the same marker, unconnected, so the seed noise shows
                ax.plot(*zip(*others, strict=True), style[0], color=line.get_color(), fillstyle="none")
    teacher = next((r for r in rows if r["kind"] == "teacher"), None)
    if teacher:
        ax.axhline(teacher["loss"], color="gray", linestyle=":", label=f"teacher ({teacher['params']:,} params)")
    ax.set_xscale("log")
    ax.set_xlabel("student parameters")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title("one capture, many students")
    ax.legend()
    fig.tight_layout()
    return _png(fig)


def _plot_training_curves(output: str, rows: list[dict]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    styles = {"kd": "-", "ce": "--", "online_kd": ":"}
    for r in rows:
        metrics = Path(output) / "runs" / r["run"] / METRICS_NAME
        if r["kind"] == "teacher" or not metrics.exists():
            continue
        with open(metrics) as f:
            points = [(int(m["step"]), float(m["ce"])) for m in csv.DictReader(f)]
        if points:
            ax.plot(*zip(*points, strict=True), styles[r["kind"]], label=r["run"])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training CE (nats/token)")
    ax.set_title("training curves (CE part of the loss)")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return _png(fig)


def _png(fig) -> bytes:
    """The figure as PNG bytes (for an atomic write), and closed."""
    import matplotlib.pyplot as plt

    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=120)
    plt.close(fig)
    return out.getvalue()
