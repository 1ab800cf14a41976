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

import time
from dataclasses import dataclass
from pathlib import Path

from raydistill.config import SweepConfig, TrainConfig
from raydistill.contracts.shards.reader import ShardSet
from raydistill.contracts.students import MODEL_DIR, SUMMARY_NAME
from raydistill.errors import ConfigError
from raydistill.io import storage
from raydistill.models.sizes import STUDENT_SIZES, check_sizes
from raydistill.recipes.sweep_report import KIND_LABELS, summarize, write_results

RUN_KINDS = ("kd", "ce", "online_kd")


@dataclass(frozen=True)
class Run:
    """One student of the sweep."""

    kind: str  # kd | ce | online_kd
    size: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.size}-{self.kind}-s{self.seed}"


def sweep_runs(cfg: SweepConfig) -> list[Run]:
    """Every run of the sweep, smallest sizes first (their results are the first to read)."""
    check_sizes([*cfg.sizes, *(cfg.online_kd_sizes or [])], "sizes")
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
    settings = {**cfg.train.model_dump(), "shards": cfg.shards, "output": train_output(cfg, run),
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
    if storage.exists(storage.join(train_cfg.output, SUMMARY_NAME)):
        fs, path = storage.filesystem(train_cfg.output)
        fs.rm(path, recursive=True)  # its checkpoints would mislead a resume
    return run_training(train_cfg, address=address)


def resolve_parallel(cfg: SweepConfig, resources: dict[str, float]) -> int:
    """How many runs fit side by side: the cluster's CPUs (or GPUs) over what one run takes."""
    if cfg.max_parallel != "auto":
        return cfg.max_parallel
    probe = cfg.train
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
    from raydistill.contracts.selection import selected_documents
    from raydistill.stages.evaluate.scores import evaluate_model

    documents = selected_documents(cfg.heldout)
    rows = []
    reference = None
    if teacher is not None:
        scores = evaluate_model(teacher, documents, max_length=cfg.eval_max_length)
        reference = scores.pop("top1")
        scores["eval_tokens"] = scores.pop("tokens")
        rows.append({"run": "teacher", "kind": "teacher", "size": "teacher", "seed": None, "tokens": None,
                     "wall_s": None, "agreement": 1.0, **scores})
    for run, summary in runs.items():
        model_dir = storage.join(train_output(cfg, run), MODEL_DIR)
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


def run_sweep(cfg: SweepConfig, *, address: str | None = None, log=print) -> dict:
    """Train, evaluate and report the whole sweep; returns the headline figures."""
    if "://" in cfg.output:
        raise ConfigError(f"sweep output '{cfg.output}' must be a local directory (its plots and tables are "
                          "for a person); the shard set may be on any storage")
    t0 = time.perf_counter()
    shard_set = ShardSet(cfg.shards)
    teacher = cfg.teacher or shard_set.manifest.teacher.name_or_path
    runs = sweep_runs(cfg)
    needs_teacher = any(r.kind == "online_kd" for r in runs)
    if not Path(teacher).exists() and "://" not in teacher:
        if needs_teacher:
            raise ConfigError(f"online KD needs the teacher, but '{teacher}' does not exist; set `teacher:` to "
                              "its directory or `online_kd_sizes: []`")
        teacher = None  # sparse KD and CE never need it; the table then has no agreement column
    log(f"sweep: {len(runs)} runs from {storage.redact_url(cfg.shards)} into {cfg.output}")
    summaries = train_all(cfg, runs, teacher, address, log)
    log("   evaluating on held-out text")
    rows = evaluate_all(cfg, summaries, teacher, log)
    teacher_row = next((r for r in rows if r["kind"] == "teacher"), None)
    cost = teacher_cost(shard_set, rows, teacher_row["params"] if teacher_row else None)
    headline = summarize(rows, runs[0].size, cfg.seeds)
    headline["teacher_passes"] = 1
    headline["seconds"] = round(time.perf_counter() - t0, 1)
    write_results(cfg.output, rows, cost, headline)
    return {"headline": headline, "teacher_cost": cost, "rows": rows}


__all__ = ["RUN_KINDS", "Run", "run_sweep", "sweep_runs", "teacher_cost"]
