"""``raydistill train``: one student, DeepSpeed ZeRO inside Ray Train, fed from the shards or a corpus.

The teacher is never loaded: everything the loss needs (token ids, sparse targets, the
tokenizer) is in the shard set. In corpus mode ("MiniPLM mode") there are no teacher targets:
the student trains with CE on a text corpus tokenized with any tokenizer (``corpus_rows``).
Inputs are checked on the driver before any worker starts (``checks``), so contract
mismatches fail in one line instead of a worker traceback; the workers run ``trainer``.

Checkpoints (DeepSpeed checkpoint + reader cursor + config) go through Ray Train; running
the same command again with the same run name and storage resumes from the latest one.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from raydistill.config.jobs import TrainConfig
from raydistill.config.sections import StudentConfig
from raydistill.contracts.shards.manifest import shard_set_identity
from raydistill.contracts.shards.reader import ShardSet
from raydistill.contracts.shards.verify import require_sound
from raydistill.contracts.students import MODEL_DIR, read_summary, write_summary
from raydistill.io import storage
from raydistill.models.loading import split_gguf_name
from raydistill.models.students import student_config_sha256
from raydistill.runtime.cluster import cluster_has_gpus, init_ray
from raydistill.runtime.failures import error_from_ray
from raydistill.runtime.guard import guarded_stage
from raydistill.stages.train.checkpoints import check_checkpoints, check_resume_settings
from raydistill.stages.train.checks import check_corpus_fills_a_batch, check_student, check_train_inputs
from raydistill.stages.train.corpus_rows import corpus_identity
from raydistill.stages.train.sources import load_corpus_tokenizer
from raydistill.stages.train.trainer import train_loop

__all__ = ["absolute", "finished_summary", "run_training", "with_absolute_paths"]


def absolute(url: str) -> str:
    """Ray and DeepSpeed need absolute local paths; URLs with a scheme pass through."""
    return url if "://" in url else str(Path(url).expanduser().resolve())


def absolute_if_local(path: str) -> str:
    """A local path made absolute (Ray Train workers run in another directory); hub ids and URLs unchanged."""
    looks_local = path.startswith(("/", ".", "~")) or os.path.exists(path)
    return absolute(path) if looks_local and "://" not in path else path


def with_absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with its local paths absolute, as the driver hands it to the workers and records it."""
    update: dict = {"output": absolute(cfg.output)}
    if cfg.shards is not None:
        update["shards"] = absolute(cfg.shards)
    if cfg.corpus is not None:
        corpus = {"source": absolute(cfg.corpus.source)} if cfg.corpus.source != "default" else {}
        if cfg.corpus.selection is not None:
            corpus["selection"] = absolute(cfg.corpus.selection)
        update["corpus"] = cfg.corpus.model_copy(update=corpus)
    if cfg.tokenizer is not None:
        update["tokenizer"] = absolute_if_local(cfg.tokenizer)
    update["student"] = _student_with_absolute_paths(cfg.student)
    return cfg.model_copy(update=update)


def _student_with_absolute_paths(student: StudentConfig) -> StudentConfig:
    """student.model, .config and .teacher_fraction.teacher made absolute where local (a GGUF teacher's
    ``DIR#FILE.gguf``: its DIR)."""
    update: dict = {key: absolute_if_local(value) for key in ("model", "config")
                    if (value := getattr(student, key)) is not None}
    fraction = student.teacher_fraction
    if fraction is not None and fraction.teacher is not None:
        path, gguf_file = split_gguf_name(fraction.teacher)
        teacher = absolute_if_local(path) + (f"#{gguf_file}" if gguf_file else "")
        update["teacher_fraction"] = fraction.model_copy(update={"teacher": teacher})
    return student.model_copy(update=update)


def finished_summary(cfg: TrainConfig) -> dict | None:
    """The summary of a finished run of exactly ``cfg`` on its data as it is now, else None.

    Lets drivers that train many students (demo, sweep) reuse finished runs without ever
    reusing one trained with other settings, on shards captured since, or on a corpus (or
    tokenizer) that has changed since. A ``model/`` without its completion marker (an export that
    crashed halfway on an object store, or one written before markers existed) is no finished run.
    """
    cfg = with_absolute_paths(cfg)
    summary = read_summary(cfg.output)
    recorded = storage.redact_values(cfg.model_dump(mode="json"))  # as export stored it: no URL credentials
    if summary is None or summary.get("config") != recorded or "wall_seconds" not in summary:
        return None
    if summary.get("student_config_sha256") != student_config_sha256(cfg.student):  # a config.json edited since
        return None
    if not storage.dir_complete(storage.join(cfg.output, MODEL_DIR)):
        return None
    if cfg.corpus is None:  # shards_identity: summaries written before corpus mode have no data_identity
        same = summary.get("shards_identity") == shard_set_identity(cfg.shards)
    else:
        same = summary.get("data_identity") == corpus_identity(cfg.corpus, load_corpus_tokenizer(cfg))
    return summary if same else None


@guarded_stage("train", worker_paths=("shards", "corpus.source", "corpus.selection", "output", "storage_path",
                                      "student.config"))
def run_training(cfg: TrainConfig, *, address: str | None = None) -> dict:
    """Launch (or resume) the Ray Train job for ``cfg``; returns the student's summary."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = with_absolute_paths(cfg)  # the output itself was checked by the guard
    check_train_inputs(cfg, address)  # before Ray starts: output inside the corpus, workers that never fit
    if cfg.corpus is None:
        require_sound(cfg.shards, checksums=cfg.check_shards == "full")
        check_student(cfg, ShardSet(cfg.shards))
    else:
        check_student(cfg)
        check_corpus_fills_a_batch(cfg)
    name = cfg.name or Path(cfg.output.rstrip("/")).name or "student"
    storage_path = absolute(cfg.storage_path or storage.join(cfg.output, "ray"))
    check_checkpoints(storage.join(storage_path, name))  # a planted checkpoint is refused before any worker
    # ... and so is one of another run: Ray Train would resume it whatever the settings
    check_resume_settings(storage.join(storage_path, name), storage.redact_values(cfg.model_dump(mode="json")),
                          TrainConfig(shards="-", output="-").model_dump(mode="json"))
    init_ray(address)
    use_gpu = cluster_has_gpus() if cfg.use_gpu is None else cfg.use_gpu
    resources = {"CPU": cfg.threads_per_worker, **({"GPU": 1} if use_gpu else {})}
    t0 = time.perf_counter()
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"train": cfg.model_dump(), "use_gpu": use_gpu},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(name=name, storage_path=storage_path,
                             failure_config=FailureConfig(max_failures=2),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    try:
        trainer.fit()
    except Exception as err:  # Ray wraps worker errors; keep the cause, drop Ray's frames
        raise error_from_ray(err, f"training run '{name}'", "see the Ray logs; re-running the same command "
                             "resumes from the last checkpoint") from err
    summary = read_summary(cfg.output)
    summary["wall_seconds"] = round(time.perf_counter() - t0, 1)
    write_summary(cfg.output, summary)
    return summary
