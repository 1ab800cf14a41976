"""``raydistill precompute``: run the teacher once over the corpus with a pool of Ray actors.

The driver plans deterministic units, skips those with a completion record, and hands the
rest to ``TeacherWorker`` actors (one per GPU; CPU actors locally) that write one shard per
unit. Actor processes that die are restarted by Ray and their unit retried
(``max_restarts`` / ``max_task_retries``); a killed driver is survived by running the same
command again. The manifest, the alignment contract, is written last from the completion
records, with the run's statistics; a short summary for a person follows the progress bar.

One capture at a time per output: a run deletes the ``*.tmp-*`` files that killed writers
left behind (at its start, and again at its end once every call has returned).
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field

from tqdm import tqdm

from raydistill.config import ActorPoolConfig, CaptureConfig
from raydistill.contracts.plan import make_plan, write_or_check_plan
from raydistill.contracts.shards.format import FORMAT_VERSION, Codec, token_dtype_for
from raydistill.contracts.shards.manifest import (
    DONE_DIR,
    SHARDS_DIR,
    Manifest,
    PlanInfo,
    ShardInfo,
    TeacherInfo,
    TokenizerInfo,
    VocabTableInfo,
    read_completions,
    read_manifest,
    sparsify_info_for,
    write_manifest,
)
from raydistill.contracts.shards.vocab import (
    VOCAB_TABLE_NAME,
    VocabTable,
    load_vocab_table,
    write_vocab_table,
)
from raydistill.errors import ConfigError, RaydistillError
from raydistill.io import storage
from raydistill.io.corpus import Document, SkippedDocuments, describe, read_documents_counted
from raydistill.models.loading import model_identity
from raydistill.models.tokenizers import load_tokenizer, tokenizer_sha256, vocab_size_of
from raydistill.runtime.cluster import init_ray
from raydistill.stages.capture.worker import TeacherSettings, TeacherWorker

log = logging.getLogger(__name__)

CALLS_IN_FLIGHT_PER_ACTOR = 2  # one forwarding while the other encodes and writes
ACTOR_MAX_RESTARTS = 3  # Ray restarts a dead actor process this many times ...
ACTOR_MAX_TASK_RETRIES = 3  # ... and resubmits the calls it had in flight
SKIP_REASONS = ("empty", "undecodable", "duplicate", "oversize")
_TOKENIZE_BATCH = 1024  # documents per tokenizer call when checking max_document_tokens


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
        "mode": cfg.mode,
        "k": cfg.draws if cfg.mode == "sampled" else cfg.k,
        "threshold": cfg.threshold if cfg.mode == "adaptive" else None,
        "min_prob": cfg.min_prob if cfg.mode == "adaptive" else None,
        "mean_ids": cfg.budget_mean_ids,
        "draws": cfg.draws if cfg.mode == "sampled" else None,
        "seed": cfg.seed if cfg.mode == "sampled" else None,
        "value_scale": cfg.value_scale,
        "vocab_sample_tokens": cfg.vocab_sample_tokens,
        "temperature": cfg.temperature,
        "max_length": cfg.max_length,
        "docs_per_unit": cfg.docs_per_unit,
    }


def run_capture(cfg: CaptureConfig, *, address: str | None = None, progress: bool = True) -> Manifest:
    """Capture sparse teacher targets for ``cfg.corpus`` into ``cfg.output``; resumable.

    ``progress`` shows the live bar and, at the end, a short summary on stderr.
    """
    import ray

    t_start = time.perf_counter()
    tokenizer = load_tokenizer(cfg.teacher, trust_remote_code=cfg.trust_remote_code, gguf_file=cfg.gguf_file)
    vocab_size = vocab_size_of(tokenizer)
    if cfg.k > vocab_size:
        raise ConfigError(f"k={cfg.k} is larger than the teacher's vocabulary ({vocab_size} ids); choose k <= {vocab_size}")
    teacher_id = model_identity(cfg.teacher, cfg.gguf_file)
    tok_sha = tokenizer_sha256(tokenizer)
    documents, skipped = read_documents_counted(cfg.corpus)
    documents, oversize = drop_oversize(documents, tokenizer, cfg.max_document_tokens)
    if not documents:
        too_long = f" ({oversize} longer than max_document_tokens={cfg.max_document_tokens})" if oversize else ""
        raise ConfigError(f"corpus {describe(cfg.corpus)} has no documents to capture{too_long}")
    plan = make_plan(documents, docs_per_unit=cfg.docs_per_unit, corpus=describe(cfg.corpus),
                     settings=_capture_settings(cfg, teacher_id, tok_sha))
    resumed = write_or_check_plan(cfg.output, plan)
    stale = remove_stale_temporaries(cfg.output)
    _save_tokenizer_copy(tokenizer, cfg.output)
    table, table_sha = ensure_vocab_table(cfg, tokenizer, documents, vocab_size)

    done = read_completions(cfg.output)
    todo = [u for u in plan.units if u.unit not in done]
    log.info("plan %s: %d units, %d already done%s", plan.sha256[:12], len(plan.units), len(done),
             " (resuming)" if resumed else "")

    drive = DriveResult(actors=[], seconds=0.0)
    if todo:
        init_ray(address)
        num_actors = min(resolve_num_actors(cfg, ray.cluster_resources()), len(todo))
        settings = TeacherSettings(teacher=cfg.teacher, k=cfg.k, temperature=cfg.temperature,
                                   max_length=cfg.max_length, batch_tokens=cfg.batch_tokens, dtype=cfg.dtype,
                                   threads=cfg.threads_per_actor, trust_remote_code=cfg.trust_remote_code,
                                   device_map=cfg.device_map, mode=cfg.mode, threshold=cfg.threshold,
                                   min_prob=cfg.min_prob, mean_ids=cfg.budget_mean_ids,
                                   draws=cfg.draws, seed=cfg.seed, value_scale=cfg.value_scale,
                                   vocab_table=storage.join(cfg.output, VOCAB_TABLE_NAME), gguf_file=cfg.gguf_file,
                                   vocab_table_sha256=table_sha)
        actors = start_actors(TeacherWorker, settings, num_actors, cpus=cfg.threads_per_actor,
                              gpus=cfg.num_gpus_per_actor)
        try:
            drive = drive_units(actors, todo, plan, documents, cfg.output, progress)
        finally:
            for actor in actors:
                ray.kill(actor)
        stale += remove_stale_temporaries(cfg.output)  # every call has returned: no writer is left

    done = read_completions(cfg.output)
    missing = [u.unit for u in plan.units if u.unit not in done]
    if missing:
        raise RaydistillError(f"capture finished with {len(missing)} units missing (first: {missing[:5]}); "
                              "run the same command again to finish them")
    shards = [done[u.unit] for u in plan.units]
    stats = run_stats(shards=shards, documents=len(documents), units_this_run=len(todo), drive=drive,
                      skipped=skipped, oversize=oversize, seconds=time.perf_counter() - t_start,
                      stale_temporaries=stale, earlier_capture_seconds=_earlier_capture_seconds(cfg.output))
    manifest = Manifest(
        format_version=FORMAT_VERSION,
        created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        teacher=TeacherInfo(**teacher_id),
        tokenizer=TokenizerInfo(sha256=tok_sha),
        vocab_size=vocab_size,
        padded_vocab_size=_padded_vocab(cfg),
        token_dtype=token_dtype_for(vocab_size),
        sparsify=sparsify_info_for(table_codec(cfg, vocab_size, table), temperature=cfg.temperature,
                                   threshold=cfg.threshold, min_prob=cfg.min_prob, mean_ids=cfg.budget_mean_ids,
                                   seed=cfg.seed,
                                   tail_model=cfg.tail_model,
                                   tail_prior_exponent=cfg.tail_prior_exponent),
        vocab_table=VocabTableInfo(path=VOCAB_TABLE_NAME, sha256=table_sha, sample_tokens=table.sample_tokens),
        plan=PlanInfo(sha256=plan.sha256, num_units=len(plan.units), corpus=plan.corpus, max_length=cfg.max_length),
        shards=shards,
        stats=stats,
    )
    write_manifest(cfg.output, manifest)
    if progress:
        print(format_summary(stats), file=sys.stderr, flush=True)
    return manifest


def _earlier_capture_seconds(root: str) -> float:
    """Capture seconds recorded by the manifest of an earlier finished run of this set (0 if none)."""
    try:
        stats = read_manifest(root).stats
    except RaydistillError:
        return 0.0
    return float(stats.get("capture_seconds_total", stats.get("capture_seconds_this_run", 0.0)))


def table_codec(cfg: CaptureConfig, vocab_size: int, table: VocabTable) -> Codec:
    """The codec the actors write with (the same construction as ``TeacherWorker``'s)."""
    return Codec.for_mode(cfg.mode, k=cfg.k, draws=cfg.draws, vocab_size=vocab_size, table=table,
                          value_scale=cfg.value_scale)


def sample_documents(documents: list[Document], max_chars: int) -> list[Document]:
    """An evenly spaced, deterministic subset of about ``max_chars`` characters."""
    total = sum(len(d.text) for d in documents)
    stride = max(1, math.ceil(total / max(max_chars, 1)))
    return documents[::stride]


def ensure_vocab_table(cfg: CaptureConfig, tokenizer, documents: list[Document], vocab_size: int
                       ) -> tuple[VocabTable, str]:
    """The set's vocabulary table: the one already in the output (a resumed run), else counted now.

    Counting covers about ``vocab_sample_tokens`` tokens of evenly spaced documents, on the
    driver, before any actor starts: every shard of the set must use the same renumbering.
    """
    url = storage.join(cfg.output, VOCAB_TABLE_NAME)
    if storage.exists(url):
        return load_vocab_table(url, vocab_size)
    table = count_vocab_table(tokenizer, documents, vocab_size, cfg.vocab_sample_tokens)
    _, sha = write_vocab_table(cfg.output, table)
    return table, sha


def count_vocab_table(tokenizer, documents: list[Document], vocab_size: int, sample_tokens: int) -> VocabTable:
    """Token counts over about ``sample_tokens`` tokens of evenly spaced documents (0: all counts
    equal). Benchmarks call it too, so they renumber ids exactly as a capture would."""
    if sample_tokens == 0:
        return VocabTable.uniform(vocab_size)
    sample = sample_documents(documents, sample_tokens * 4)  # ≈ 4 characters per token
    lists = []
    for start in range(0, len(sample), _TOKENIZE_BATCH):
        texts = [d.text for d in sample[start : start + _TOKENIZE_BATCH]]
        lists.extend(tokenizer(texts, add_special_tokens=False)["input_ids"])
    return VocabTable.count(lists, vocab_size)


def _padded_vocab(cfg: CaptureConfig) -> int:
    from transformers import AutoConfig

    kwargs = {"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}
    return int(AutoConfig.from_pretrained(cfg.teacher, trust_remote_code=cfg.trust_remote_code, **kwargs).vocab_size)


# --- inputs and resources -----------------------------------------------------------------------


def drop_oversize(documents: list[Document], tokenizer, max_tokens: int | None) -> tuple[list[Document], int]:
    """Documents of at most ``max_tokens`` tokens (as the actors tokenize them), and the number dropped.

    Done on the driver, before planning, so the plan (and its hash) only holds documents that
    are captured; the cost, one tokenizer pass, is paid only when a limit is set.
    """
    if max_tokens is None:
        return documents, 0
    kept: list[Document] = []
    for start in range(0, len(documents), _TOKENIZE_BATCH):
        batch = documents[start : start + _TOKENIZE_BATCH]
        encoded = tokenizer([d.text for d in batch], add_special_tokens=False)["input_ids"]
        kept += [doc for doc, ids in zip(batch, encoded, strict=True) if len(ids) <= max_tokens]
    if len(kept) < len(documents):
        log.warning("skipped %d documents longer than max_document_tokens=%d",
                    len(documents) - len(kept), max_tokens)
    return kept, len(documents) - len(kept)


def resolve_num_actors(cfg: ActorPoolConfig, resources: dict[str, float]) -> int:
    """``cfg.num_actors``, or for ``"auto"`` the number the cluster's ``resources`` hold right now.

    GPU actors: one per ``num_gpus_per_actor`` GPUs, no more than the CPUs can give
    ``threads_per_actor`` each. CPU actors: one per ``threads_per_actor`` CPUs, less one actor
    so the driver and Ray's own processes keep a core.
    """
    if cfg.num_actors != "auto":
        return cfg.num_actors
    by_cpu = int(resources.get("CPU", 0) // cfg.threads_per_actor)
    if cfg.num_gpus_per_actor > 0:
        gpus = resources.get("GPU", 0)
        by_gpu = math.floor(gpus / cfg.num_gpus_per_actor + 1e-9)  # 1 / 0.1 must count 10, not 9
        if by_gpu < 1:
            raise ConfigError(
                f"num_actors: auto with num_gpus_per_actor={cfg.num_gpus_per_actor} needs GPUs, but the cluster "
                f"has {gpus:g}; set num_gpus_per_actor: 0 for CPU actors, or a number of actors "
                "(an autoscaling cluster shows only the nodes already up)"
            )
        return max(1, min(by_gpu, by_cpu))
    return max(1, by_cpu - 1)


def remove_stale_temporaries(root: str, subdirs: tuple[str, ...] = (SHARDS_DIR, DONE_DIR)) -> int:
    """Delete the ``*.tmp-*`` files a killed writer left in ``root`` and its ``subdirs``.

    A temporary is never valid data (the rename that would have made it a shard never
    happened), and ``raydistill verify`` reports any it finds. Only safe while no other
    run writes to ``root``, hence called at the start and at the end of a run.
    """
    removed = 0
    for folder in (root, *(storage.join(root, d) for d in subdirs)):
        fs, path = storage.filesystem(folder)
        if not fs.exists(path):
            continue
        for entry in fs.ls(path, detail=False):
            if ".tmp-" in entry.rstrip("/").rsplit("/", 1)[-1]:
                fs.rm(entry)
                removed += 1
    if removed:
        log.warning("removed %d temporary files left by interrupted writes in %s", removed, root)
    return removed


# --- the actor pool -----------------------------------------------------------------------------


def covered_seconds(spans: list[tuple[float, float]]) -> float:
    """Length of the union of ``(start, end)`` spans.

    An actor runs two calls at once, so summing their durations would count the time they
    overlap twice; the union is the time the actor had work.
    """
    total, reached = 0.0, -math.inf
    for start, end in sorted(spans):
        if end > reached:
            total += end - max(start, reached)
            reached = end
    return total


@dataclass
class ActorTally:
    """What one actor did this run, as the driver saw its calls return."""

    units: int = 0
    tokens: int = 0
    spans: list[tuple[float, float]] = field(default_factory=list)  # on the driver's clock

    def add(self, tokens: int, seconds: float, returned_at: float) -> None:
        self.units += 1
        self.tokens += tokens
        self.spans.append((returned_at - seconds, returned_at))

    @property
    def busy_seconds(self) -> float:
        return covered_seconds(self.spans)


@dataclass
class DriveResult:
    actors: list[ActorTally]
    seconds: float  # first unit handed out to last unit returned (the actors' start included)


def largest_first(todo: list, plan, documents: list[Document]) -> list:
    """Units ordered by size, largest first (ties by unit id): the classic longest-processing-time
    rule, so the run does not end with one actor finishing a big unit while the others idle."""
    size = {u.unit: sum(len(d.text) for d in plan.documents_of(u, documents)) for u in todo}
    return sorted(todo, key=lambda u: (-size[u.unit], u.unit))


def start_actors(worker_cls: type, settings, count: int, *, cpus: float, gpus: float) -> list:
    """``count`` Ray actors of ``worker_cls(settings)`` that Ray restarts when their process dies
    (and then resubmits the calls they had in flight), each taking two calls at once."""
    import ray

    actor_cls = ray.remote(worker_cls).options(
        num_cpus=cpus, num_gpus=gpus, max_restarts=ACTOR_MAX_RESTARTS, max_task_retries=ACTOR_MAX_TASK_RETRIES,
        max_concurrency=CALLS_IN_FLIGHT_PER_ACTOR,
    )
    return [actor_cls.remote(settings) for _ in range(count)]


def drive_units(actors, todo, plan, documents, root: str, progress: bool, *, method: str = "capture_unit",
                what: str = "capture") -> DriveResult:
    """Keep every actor busy with ``CALLS_IN_FLIGHT_PER_ACTOR`` units until none are left.

    Each call is ``actor.<method>(root, unit id, the unit's documents)`` and returns a dict with
    ``tokens`` and ``seconds``; ``what`` names the work in the progress bar and in errors.
    """
    import ray

    queue = largest_first(todo, plan, documents)
    pending: dict = {}  # object ref -> index of the actor running it
    tallies = [ActorTally() for _ in actors]
    tokens = 0
    t0 = time.perf_counter()

    def submit(index: int) -> None:
        unit = queue.pop(0)
        ref = getattr(actors[index], method).remote(root, unit.unit, plan.documents_of(unit, documents))
        pending[ref] = index

    for _ in range(CALLS_IN_FLIGHT_PER_ACTOR):
        for index in range(len(actors)):
            if queue:
                submit(index)
    bar = tqdm(total=len(todo), unit="unit", desc=what, disable=not progress, dynamic_ncols=True)
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            index = pending.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except ray.exceptions.RayError as err:  # retries and actor restarts are used up
                cause = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
                raise RaydistillError(f"a {what} unit failed after Ray's retries: {cause}; finished units are "
                                      "kept, run the same command again to resume") from err
            tallies[index].add(result["tokens"], result["seconds"], time.perf_counter())
            tokens += result["tokens"]
            bar.update(1)
            bar.set_postfix(tokens=tokens, tok_s=f"{tokens / max(time.perf_counter() - t0, 1e-9):,.0f}")
            if queue:
                submit(index)
    finally:
        bar.close()
    return DriveResult(actors=tallies, seconds=time.perf_counter() - t0)


# --- statistics ---------------------------------------------------------------------------------


def _rate(tokens: int, seconds: float) -> float:
    return round(tokens / seconds, 1) if seconds > 0 else 0.0


def run_stats(*, shards: list[ShardInfo], documents: int, units_this_run: int, drive: DriveResult,
              skipped: SkippedDocuments, oversize: int, seconds: float,
              stale_temporaries: int = 0, earlier_capture_seconds: float = 0.0) -> dict[str, int | float]:
    """The manifest's ``stats``: flat (``actor.N.*``, ``skipped_documents.*``) so any JSON tool reads them."""
    tokens_this_run = sum(a.tokens for a in drive.actors)
    by_reason = {**skipped.as_dict(), "oversize": oversize}  # the order of SKIP_REASONS
    stats: dict[str, int | float] = {
        "tokens": sum(s.tokens for s in shards),
        "windows": sum(s.rows for s in shards),
        "documents": documents,
        "units": len(shards),
        "units_this_run": units_this_run,
        "units_already_done": len(shards) - units_this_run,
        "tokens_this_run": tokens_this_run,
        "seconds_this_run": round(seconds, 2),
        "capture_seconds_this_run": round(drive.seconds, 2),
        "capture_seconds_total": round(earlier_capture_seconds + drive.seconds, 2),  # over runs that finished
        "tokens_per_s_this_run": _rate(tokens_this_run, drive.seconds),
        "actor_seconds_this_run": round(sum(a.busy_seconds for a in drive.actors), 2),
        "num_actors": len(drive.actors),
        "skipped_documents": sum(by_reason.values()),
        **{f"skipped_documents.{reason}": n for reason, n in by_reason.items()},
        "stale_temporaries_removed": stale_temporaries,
    }
    for i, actor in enumerate(drive.actors):
        stats.update({f"actor.{i}.units": actor.units, f"actor.{i}.tokens": actor.tokens,
                      f"actor.{i}.busy_seconds": round(actor.busy_seconds, 2),
                      f"actor.{i}.tokens_per_s": _rate(actor.tokens, actor.busy_seconds)})
    return stats


def format_summary(stats: dict[str, int | float]) -> str:
    """A few lines for a person, printed after the progress bar; the numbers are the manifest's."""
    s = stats
    lines = [
        f"capture: {s['units']} units ({s['units_this_run']} this run, {s['units_already_done']} already done), "
        f"{s['documents']:,} documents, {s['windows']:,} windows, {s['tokens']:,} tokens",
        f"this run: {s['tokens_this_run']:,} tokens in {s['capture_seconds_this_run']:,.1f} s of capture "
        f"({s['seconds_this_run']:,.1f} s in all), {s['tokens_per_s_this_run']:,.0f} tokens/s",
    ]
    for i in range(int(s["num_actors"])):
        a = {key: s[f"actor.{i}.{key}"] for key in ("units", "tokens", "busy_seconds", "tokens_per_s")}
        lines.append(f"  actor {i}: {a['units']} units, {a['tokens']:,} tokens, {a['busy_seconds']:,.1f} s busy, "
                     f"{a['tokens_per_s']:,.0f} tokens/s")
    reasons = ", ".join(f"{s[f'skipped_documents.{r}']} {r}" for r in SKIP_REASONS)
    lines.append(f"skipped documents: {s['skipped_documents']} ({reasons})")
    return "\n".join(lines)
