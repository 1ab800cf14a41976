"""``raydistill sweep``: many students from one capture, against CE-only and online-KD baselines.

One shard set (one teacher pass) trains a ladder of student sizes with sparse offline KD. In
the same sweep, on the same token budget and data order (same seed = same init and same
batches): a CE-only student at every size, dense online KD (the teacher in the training loop)
at the sizes asked for, and a second seed at the smallest size so a reader can tell a gap
from seed noise. Then every model, the teacher included, is scored on held-out text (loss,
perplexity, top-1 agreement with the teacher, calibration error), and results.csv,
results.md and two plots are written.

Each run is an ordinary ``raydistill train`` run in its own directory, so it resumes on its
own: a finished run (summary.json with the same config) is reused, an interrupted one picks
up from its last checkpoint. Runs go side by side as Ray tasks when the cluster has room
for more than one (``max_parallel``), one after another otherwise. Sparse-KD and CE runs
never load the teacher.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass
from pathlib import Path

from raydistill.config import SweepConfig, TrainConfig
from raydistill.contracts.shards.reader import ShardSet
from raydistill.errors import ConfigError
from raydistill.io import storage
from raydistill.models.loading import STUDENT_SIZES

KINDS = ("kd", "ce", "online_kd")
KIND_LABELS = {"kd": "sparse offline KD", "ce": "CE only", "online_kd": "dense online KD", "teacher": "teacher"}


@dataclass(frozen=True)
class Run:
    """One student of the sweep."""

    kind: str  # kd | ce | online_kd
    size: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.size}-{self.kind}-s{self.seed}"


def plan_runs(cfg: SweepConfig) -> list[Run]:
    """Every run of the sweep, smallest sizes first (their results are the first to read)."""
    sizes = sorted(cfg.sizes, key=list(STUDENT_SIZES).index)  # the ladder is listed smallest first
    smallest = sizes[0]
    runs = []
    online = cfg.online_kd_sizes if cfg.online_kd_sizes is not None else [smallest]
    for size in sizes:
        seeds = cfg.seeds if size == smallest else cfg.seeds[:1]
        for seed in seeds:
            runs.append(Run("kd", size, seed))
            if cfg.ce_baseline:
                runs.append(Run("ce", size, seed))
            if size in online:  # at every seed, so retention compares like with like
                runs.append(Run("online_kd", size, seed))
    return runs


def train_config(cfg: SweepConfig, run: Run, teacher: str | None) -> TrainConfig:
    settings = {**cfg.train, "shards": cfg.shards, "output": train_output(cfg, run),
                "student": {"size": run.size}, "seed": run.seed, "name": run.name}
    if run.kind == "ce":
        settings["loss"] = "ce"
    elif run.kind == "online_kd":
        settings.update(loss="forward_kl", online_teacher=teacher, taid=False)
    return TrainConfig(**settings)


def _train_one(train_cfg: TrainConfig, address: str | None) -> dict:
    """Train (or reuse) one run; a run finished with other settings or shards is started over."""
    from raydistill.stages.train.run import finished_summary, run_training

    done = finished_summary(train_cfg)
    if done is not None:
        return done
    if storage.exists(storage.join(train_cfg.output, "summary.json")):
        fs, path = storage.filesystem(train_cfg.output)
        fs.rm(path, recursive=True)  # its checkpoints would mislead a resume
    return run_training(train_cfg, address=address)


def resolve_parallel(cfg: SweepConfig, resources: dict[str, float]) -> int:
    """How many runs fit side by side: the cluster's CPUs (or GPUs) over what one run takes."""
    if cfg.max_parallel != "auto":
        return cfg.max_parallel
    probe = TrainConfig(shards="s", output="o", **cfg.train)
    if resources.get("GPU", 0) >= 1 and probe.use_gpu is not False:
        return max(1, int(resources["GPU"]) // probe.num_workers)
    return max(1, int(resources.get("CPU", 1)) // (probe.num_workers * probe.threads_per_worker))


def train_all(cfg: SweepConfig, runs: list[Run], teacher: str | None, address: str | None,
              log=print) -> dict[Run, dict]:
    """Every run's summary; in parallel as Ray tasks when more than one fits."""
    import ray

    from raydistill.runtime.cluster import init_ray

    init_ray(address)
    parallel = min(resolve_parallel(cfg, ray.cluster_resources()), len(runs))
    configs = {run: train_config(cfg, run, teacher) for run in runs}
    results: dict[Run, dict] = {}
    if parallel == 1:
        for i, run in enumerate(runs):
            log(f"   [{i + 1}/{len(runs)}] {run.name} ({KIND_LABELS[run.kind]})")
            results[run] = _train_one(configs[run], address)
        return results
    log(f"   {len(runs)} runs, up to {parallel} side by side")
    task = ray.remote(num_cpus=0)(_train_one)  # each run's Ray Train workers reserve the resources
    pending: dict = {}
    queue = list(runs)
    while queue or pending:
        while queue and len(pending) < parallel:
            run = queue.pop(0)
            pending[task.remote(configs[run], "auto")] = run
        ready, _ = ray.wait(list(pending), num_returns=1)
        run = pending.pop(ready[0])
        results[run] = ray.get(ready[0])
        log(f"   done {run.name} ({KIND_LABELS[run.kind]})")
    return {run: results[run] for run in runs}  # plan order, whatever order they finished in


def evaluate_all(cfg: SweepConfig, runs: dict[Run, dict], teacher: str | None, log=print) -> list[dict]:
    """Scores of the teacher and every student on the held-out documents (same windows for all)."""
    from raydistill.io.corpus import read_documents
    from raydistill.stages.evaluate.run import evaluate_model

    documents = read_documents(cfg.heldout)
    rows = []
    reference = None
    if teacher is not None:
        scores = evaluate_model(teacher, documents, max_length=cfg.eval_max_length)
        reference = scores.pop("top1")
        scores["eval_tokens"] = scores.pop("tokens")
        rows.append({"run": "teacher", "kind": "teacher", "size": "teacher", "seed": None, "tokens": None,
                     "wall_s": None, "agreement": 1.0, **scores})
    for run, summary in runs.items():
        model_dir = storage.join(train_output(cfg, run), "model")
        scores = evaluate_model(model_dir, documents, max_length=cfg.eval_max_length, reference_top1=reference)
        scores.pop("top1")
        scores["eval_tokens"] = scores.pop("tokens")  # held-out tokens scored; "tokens" is the training budget
        rows.append({"run": run.name, "kind": run.kind, "size": run.size, "seed": run.seed,
                     "tokens": summary["tokens"], "wall_s": summary["wall_seconds"],
                     "agreement": scores.pop("agreement", None), **scores})
        log(f"   {run.name}: held-out loss {scores['loss']:.4f}")
    return rows


def train_output(cfg: SweepConfig, run: Run) -> str:
    return storage.join(cfg.output, "runs", run.name)


def teacher_cost(shard_set: ShardSet, rows: list[dict], teacher_params: int | None) -> dict:
    """Teacher forward FLOPs (≈ 2 · params · tokens) spent once by the capture, against what the
    sweep's sparse-KD students would cost if each ran the teacher in its training loop."""
    m = shard_set.manifest
    kd_tokens = sum(r["tokens"] for r in rows if r["kind"] == "kd")
    out = {"capture_tokens": m.total_tokens, "capture_seconds": m.stats.get("capture_seconds_total"),
           "online_kd_teacher_tokens": kd_tokens, "teacher_params": teacher_params}
    if teacher_params:
        out["capture_teacher_flops"] = 2.0 * teacher_params * m.total_tokens
        out["online_kd_teacher_flops"] = 2.0 * teacher_params * kd_tokens
    online = [r for r in rows if r["kind"] == "online_kd" and r.get("wall_s")]
    twins = {(r["size"], r["seed"]): r for r in rows if r["kind"] == "kd"}
    extra = [r["wall_s"] - twins[(r["size"], r["seed"])]["wall_s"] for r in online if (r["size"], r["seed"]) in twins]
    if extra:  # measured: what the teacher in the loop added to a student's wall time
        out["online_kd_extra_seconds_per_run"] = round(sum(extra) / len(extra), 1)
    return out


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
    spreads = [abs(loss(k, smallest, seeds[0]) - loss(k, smallest, seeds[1]))
               for k in ("kd", "ce") if len(seeds) > 1 and loss(k, smallest, seeds[1]) is not None]
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
    return out


def write_outputs(output: str, rows: list[dict], cost: dict, headline: dict) -> None:
    """results.csv, results.md, loss_vs_params.png and training_curves.png under ``output``."""
    fields = ["run", "kind", "size", "seed", "params", "tokens", "wall_s", "loss", "perplexity", "agreement",
              "top1_accuracy", "ece"]
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (out / "results.md").write_text(results_markdown(rows, cost, headline))
    _plot_loss_vs_params(out / "loss_vs_params.png", rows)
    _plot_training_curves(out / "training_curves.png", output, rows)
    (out / "summary.json").write_text(json.dumps({"headline": headline, "teacher_cost": cost}, indent=1))


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


def _plot_loss_vs_params(path: Path, rows: list[dict]) -> None:
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
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_training_curves(path: Path, output: str, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    styles = {"kd": "-", "ce": "--", "online_kd": ":"}
    for r in rows:
        metrics = Path(output) / "runs" / r["run"] / "metrics.csv"
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
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_sweep(cfg: SweepConfig, *, address: str | None = None, log=print) -> dict:
    """Train, evaluate and report the whole sweep; returns the headline figures."""
    if "://" in cfg.output:
        raise ConfigError(f"sweep output '{cfg.output}' must be a local directory (its plots and tables are "
                          "for a person); the shard set may be on any storage")
    t0 = time.perf_counter()
    shard_set = ShardSet(cfg.shards)
    teacher = cfg.teacher or shard_set.manifest.teacher.name_or_path
    runs = plan_runs(cfg)
    needs_teacher = any(r.kind == "online_kd" for r in runs)
    if not Path(teacher).exists() and "://" not in teacher:
        if needs_teacher:
            raise ConfigError(f"online KD needs the teacher, but '{teacher}' does not exist; set `teacher:` to "
                              "its directory or `online_kd_sizes: []`")
        teacher = None  # sparse KD and CE never need it; the table then has no agreement column
    log(f"sweep: {len(runs)} runs from {cfg.shards} into {cfg.output}")
    summaries = train_all(cfg, runs, teacher, address, log)
    log("   evaluating on held-out text")
    rows = evaluate_all(cfg, summaries, teacher, log)
    teacher_row = next((r for r in rows if r["kind"] == "teacher"), None)
    cost = teacher_cost(shard_set, rows, teacher_row["params"] if teacher_row else None)
    headline = summarize(rows, runs[0].size, cfg.seeds)
    headline["teacher_passes"] = 1
    headline["seconds"] = round(time.perf_counter() - t0, 1)
    write_outputs(cfg.output, rows, cost, headline)
    return {"headline": headline, "teacher_cost": cost, "rows": rows}


__all__ = ["KINDS", "Run", "plan_runs", "run_sweep", "summarize", "teacher_cost"]
