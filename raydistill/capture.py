"""``raydistill precompute``: run the teacher once over the corpus with a pool of Ray actors.

The driver plans deterministic units, skips those with a completion record, and hands the
rest to ``TeacherWorker`` actors (one per GPU; CPU actors locally) that write one shard per
unit. Actor processes that die are restarted by Ray and their unit retried
(``max_restarts`` / ``max_task_retries``); a killed driver is survived by running the same
command again. The manifest, the alignment contract, is written last from the completion
records.
"""

from __future__ import annotations

import datetime as dt
import logging
import tempfile
import time

from tqdm import tqdm

from raydistill import storage
from raydistill.cluster import init_ray
from raydistill.config import CaptureConfig
from raydistill.corpus import describe, read_documents
from raydistill.errors import ConfigError, RaydistillError
from raydistill.models import model_identity
from raydistill.plan import make_plan, write_or_check_plan
from raydistill.shards.format import FORMAT_VERSION, token_dtype_for
from raydistill.shards.manifest import (
    Manifest,
    PlanInfo,
    ShardInfo,
    SparsifyInfo,
    TeacherInfo,
    TokenizerInfo,
    read_completions,
    write_manifest,
)
from raydistill.teacher import TeacherSettings, TeacherWorker
from raydistill.tokenization import load_tokenizer, tokenizer_sha256, vocab_size_of

log = logging.getLogger(__name__)

CALLS_IN_FLIGHT_PER_ACTOR = 2  # one forwarding while the other encodes and writes


def _save_tokenizer_copy(tokenizer, root: str) -> None:
    """Store the tokenizer inside the shard set so training never needs the teacher's directory."""
    dest = storage.join(root, "tokenizer")
    if storage.exists(storage.join(dest, "tokenizer.json")):
        return
    fs, path = storage.filesystem(dest)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        fs.put(tmp + "/", path, recursive=True)


def _capture_settings(cfg: CaptureConfig, teacher_id: dict, tok_sha: str) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "teacher_config_sha256": teacher_id["config_sha256"],
        "teacher_weights_sha256": teacher_id["weights_sha256"],
        "tokenizer_sha256": tok_sha,
        "k": cfg.k,
        "temperature": cfg.temperature,
        "max_length": cfg.max_length,
        "docs_per_unit": cfg.docs_per_unit,
    }


def run_capture(cfg: CaptureConfig, *, address: str | None = None, progress: bool = True) -> Manifest:
    """Capture sparse teacher targets for ``cfg.corpus`` into ``cfg.output``; resumable."""
    import ray

    t_start = time.perf_counter()
    tokenizer = load_tokenizer(cfg.teacher, trust_remote_code=cfg.trust_remote_code)
    vocab_size = vocab_size_of(tokenizer)
    if cfg.k > vocab_size:
        raise ConfigError(f"k={cfg.k} is larger than the teacher's vocabulary ({vocab_size} ids); choose k <= {vocab_size}")
    teacher_id = model_identity(cfg.teacher)
    tok_sha = tokenizer_sha256(tokenizer)
    documents = read_documents(cfg.corpus)
    if not documents:
        raise ConfigError(f"corpus {describe(cfg.corpus)} has no documents to capture")
    plan = make_plan(documents, docs_per_unit=cfg.docs_per_unit, corpus=describe(cfg.corpus),
                     settings=_capture_settings(cfg, teacher_id, tok_sha))
    resumed = write_or_check_plan(cfg.output, plan)
    _save_tokenizer_copy(tokenizer, cfg.output)

    done = read_completions(cfg.output)
    todo = [u for u in plan.units if u.unit not in done]
    log.info("plan %s: %d units, %d already done%s", plan.sha256[:12], len(plan.units), len(done),
             " (resuming)" if resumed else "")

    seconds_in_units = 0.0
    if todo:
        init_ray(address)
        settings = TeacherSettings(teacher=cfg.teacher, k=cfg.k, temperature=cfg.temperature,
                                   max_length=cfg.max_length, batch_tokens=cfg.batch_tokens, dtype=cfg.dtype,
                                   threads=cfg.threads_per_actor, trust_remote_code=cfg.trust_remote_code)
        actor_cls = ray.remote(TeacherWorker).options(
            num_cpus=cfg.threads_per_actor, num_gpus=cfg.num_gpus_per_actor,
            max_restarts=3, max_task_retries=3, max_concurrency=CALLS_IN_FLIGHT_PER_ACTOR,
        )
        actors = [actor_cls.remote(settings) for _ in range(min(cfg.num_actors, len(todo)))]
        seconds_in_units = _drive(actors, todo, plan, documents, cfg.output, progress)
        for actor in actors:
            ray.kill(actor)

    done = read_completions(cfg.output)
    missing = [u.unit for u in plan.units if u.unit not in done]
    if missing:
        raise RaydistillError(f"capture finished with {len(missing)} units missing (first: {missing[:5]}); "
                              "run the same command again to finish them")
    shards = [done[u.unit] for u in plan.units]
    elapsed = time.perf_counter() - t_start
    tokens = sum(s.tokens for s in shards)
    manifest = Manifest(
        format_version=FORMAT_VERSION,
        created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        teacher=TeacherInfo(**teacher_id),
        tokenizer=TokenizerInfo(sha256=tok_sha),
        vocab_size=vocab_size,
        padded_vocab_size=_padded_vocab(cfg),
        token_dtype=token_dtype_for(vocab_size),
        sparsify=SparsifyInfo(k=cfg.k, temperature=cfg.temperature),
        plan=PlanInfo(sha256=plan.sha256, num_units=len(plan.units), corpus=plan.corpus, max_length=cfg.max_length),
        shards=shards,
        stats={"tokens": tokens, "documents": len(documents), "units_this_run": len(todo),
               "seconds_this_run": round(elapsed, 2), "actor_seconds_this_run": round(seconds_in_units, 2),
               "num_actors": cfg.num_actors},
    )
    write_manifest(cfg.output, manifest)
    return manifest


def _padded_vocab(cfg: CaptureConfig) -> int:
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(cfg.teacher, trust_remote_code=cfg.trust_remote_code).vocab_size)


def _drive(actors, todo, plan, documents, root: str, progress: bool) -> float:
    """Keep every actor busy with ``CALLS_IN_FLIGHT_PER_ACTOR`` units until none are left."""
    import ray

    queue = list(todo)
    pending: dict = {}
    actor_seconds = 0.0
    tokens = 0
    t0 = time.perf_counter()

    def submit(actor) -> None:
        unit = queue.pop(0)
        ref = actor.capture_unit.remote(root, unit.unit, plan.documents_of(unit, documents))
        pending[ref] = actor

    for _ in range(CALLS_IN_FLIGHT_PER_ACTOR):
        for actor in actors:
            if queue:
                submit(actor)
    bar = tqdm(total=len(todo), unit="unit", desc="capture", disable=not progress, dynamic_ncols=True)
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            actor = pending.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except ray.exceptions.RayError as err:  # retries and actor restarts are used up
                cause = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
                raise RaydistillError(f"a capture unit failed after Ray's retries: {cause}; finished units are "
                                      "kept, run the same command again to resume") from err
            info = ShardInfo(**result["shard"])
            actor_seconds += result["seconds"]
            tokens += info.tokens
            bar.update(1)
            bar.set_postfix(tokens=tokens, tok_s=f"{tokens / max(time.perf_counter() - t0, 1e-9):,.0f}")
            if queue:
                submit(actor)
    finally:
        bar.close()
    return actor_seconds
