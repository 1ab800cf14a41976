"""``raydistill sweep``: many students from one capture, against CE-only and online-KD baselines.

One shard set (one teacher pass) trains a ladder of students with sparse offline KD: named sizes or
students of any shape (``models/students.py``), run smallest first by parameter count. In
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

from raydistill.config import StudentConfig, SweepConfig, TrainConfig
from raydistill.contracts.shards.reader import ShardSet
from raydistill.contracts.students import MODEL_DIR, SUMMARY_NAME
from raydistill.errors import ConfigError, RaydistillError
from raydistill.io import storage
from raydistill.models.students import check_student_spec, student_name, student_parameters
from raydistill.recipes.sweep_report import KIND_LABELS, summarize, write_results

RUN_KINDS = ("kd", "ce", "online_kd")


@dataclass(frozen=True)
class Run:
    """One student of the sweep; ``size`` is its ladder name (a size, or the name of any student)."""

    kind: str  # kd | ce | online_kd
    size: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.size}-{self.kind}-s{self.seed}"


def ladder(cfg: SweepConfig) -> dict[str, StudentConfig]:
    """The ladder's students by name (``name:``, else one made from the student); the names name the
    run directories, so two alike are refused."""
    students: dict[str, StudentConfig] = {}
    for i, entry in enumerate(cfg.sizes):
        name = entry.name or student_name(entry)
        if name in students:
            raise ConfigError(f"sizes[{i}]: a second student named '{name}'; give one of them another `name:`")
        students[name] = entry.student()
    return students


def sweep_runs(cfg: SweepConfig, vocab_size: int, teacher: str | None = None) -> list[Run]:
    """Every run of the sweep, smallest students first (their results are the first to read).

    Each student is checked here, before any run starts, at the shard set's ``vocab_size`` (``teacher``: what
    a teacher fraction cuts when it names none): a bad shape fails the sweep in one line naming the student.
    """
    students = ladder(cfg)
    online = cfg.online_kd_sizes
    unknown = [name for name in online or [] if name not in students]
    if unknown:
        raise ConfigError(f"online_kd_sizes: no student named '{unknown[0]}' in sizes; the names are "
                          f"{', '.join(students)}")
    params = {name: _checked_parameters(cfg, name, spec, vocab_size, teacher) for name, spec in students.items()}
    names = sorted(students, key=params.__getitem__)  # stable: equal sizes keep the ladder's order
    smallest = names[0]
    online = online if online is not None else [smallest]
    runs = []
    for name in names:
        seeds = cfg.seeds if name == smallest else cfg.seeds[:1]
        for seed in seeds:
            runs.append(Run("kd", name, seed))
            if cfg.ce_baseline:
                runs.append(Run("ce", name, seed))
            if name in online:  # at every seed, so retention compares like with like
                runs.append(Run("online_kd", name, seed))
    return runs


def _checked_parameters(cfg: SweepConfig, name: str, spec: StudentConfig, vocab_size: int,
                        teacher: str | None) -> int:
    """The student's parameter count, once ``check_student_spec`` passes it; its errors name the student."""
    try:
        check_student_spec(spec, vocab_size=vocab_size, seq_len=cfg.train.seq_len, teacher=teacher,
                           data="the shard set")
        return student_parameters(spec, vocab_size, teacher)
    except RaydistillError as err:
        raise type(err)(f"sizes: {name}: {err}") from None


def train_config(cfg: SweepConfig, run: Run, teacher: str | None) -> TrainConfig:
    student = ladder(cfg)[run.size]
    fraction = student.teacher_fraction
    if fraction is not None and fraction.teacher is None and cfg.teacher is not None:  # the sweep's teacher
        student = student.model_copy(update={"teacher_fraction": fraction.model_copy(update={"teacher": cfg.teacher})})
    settings = {**cfg.train.model_dump(), "shards": cfg.shards, "output": train_output(cfg, run),
                "student": student.model_dump(), "seed": run.seed, "name": run.name}
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
    runs = sweep_runs(cfg, shard_set.manifest.vocab_size, teacher)
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


__all__ = ["RUN_KINDS", "Run", "ladder", "run_sweep", "sweep_runs", "teacher_cost"]
