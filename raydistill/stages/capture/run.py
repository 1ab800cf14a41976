"""``raydistill capture`` (alias ``precompute``): run the teacher once over the corpus with a pool of Ray actors.

The driver plans deterministic units, skips those with a completion record, and hands the
rest to ``TeacherWorker`` actors (one per GPU; CPU actors locally) that write one shard per
unit (``runtime.units``: the same life as every unit stage). Actor processes that die are
restarted by Ray and their unit retried; a killed driver is survived by running the same
command again. The manifest, the alignment contract, is written last from the completion
records, with the run's statistics; a short summary for a person follows the progress bar.

One capture at a time per output: a run deletes the ``*.tmp-*`` files that killed writers
left behind (at its start, and again at its end once every call has returned).
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from raydistill.config.jobs import CaptureConfig
from raydistill.contracts.shards.codec import token_dtype_for
from raydistill.contracts.shards.format import FORMAT_VERSION
from raydistill.contracts.shards.manifest import (
    SHARDS_DIR,
    TOKENIZER_DIR,
    Manifest,
    PlanInfo,
    TeacherInfo,
    TokenizerInfo,
    VocabTableInfo,
    read_manifest,
    sparsify_info_for,
    utc_timestamp,
    write_manifest,
)
from raydistill.contracts.shards.vocab import VOCAB_TABLE_NAME, VocabTable
from raydistill.contracts.units import trusted_completions
from raydistill.errors import ConfigError, RaydistillError
from raydistill.io import storage
from raydistill.models.loading import model_identity
from raydistill.models.tokenizers import load_tokenizer, tokenizer_sha256, vocab_size_of
from raydistill.runtime.cluster import init_ray
from raydistill.runtime.guard import guarded_stage
from raydistill.runtime.units import PlannedUnits, plan_units, read_totals, run_units
from raydistill.stages.capture.checks import check_capture_inputs
from raydistill.stages.capture.stats import format_summary, run_stats
from raydistill.stages.capture.vocab_count import count_vocab_table_on_workers, ensure_vocab_table
from raydistill.stages.capture.worker import TeacherSettings, TeacherWorker, codec_for

__all__ = ["PreparedCapture", "capture_settings", "prepare_capture", "run_capture"]

def capture_settings(cfg: CaptureConfig, teacher_id: dict, tok_sha: str) -> dict:
    """Everything that changes a shard's bytes, for the plan hash: the target section as the manifest
    records it, the teacher and tokenizer identities, the format, the windows and the units."""
    return {
        "format_version": FORMAT_VERSION,
        "teacher_config_sha256": teacher_id["config_sha256"],
        "teacher_weights_sha256": teacher_id["weights_sha256"],
        "tokenizer_sha256": tok_sha,
        **cfg.targets.recorded(),
        "vocab_sample_tokens": cfg.vocab_sample_tokens,
        "max_length": cfg.max_length,
    }


def _save_tokenizer_copy(tokenizer, root: str) -> dict[str, str]:
    """Store the tokenizer inside the shard set so training never needs the teacher's directory; returns
    each file's sha256 for the manifest. Every file is written atomically, and only files that are
    missing or differ are written, so a copy cut short by a crash is completed by the rerun, never kept."""
    dest = storage.join(root, TOKENIZER_DIR)
    files = {}
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        for path in sorted(Path(tmp).rglob("*")):
            if path.is_file():
                name, data = path.relative_to(tmp).as_posix(), path.read_bytes()
                files[name] = storage.sha256_bytes(data)
                url = storage.join(dest, name)
                if not storage.exists(url) or storage.sha256_bytes(storage.read_bytes(url)) != files[name]:
                    storage.atomic_write_bytes(url, data)
    return files


@dataclass
class PreparedCapture:
    """A capture planned and ready for its actors: what :func:`run_capture` does before and after them."""

    planned: PlannedUnits
    settings: TeacherSettings  # what every actor gets
    teacher_id: dict
    tokenizer_sha256: str
    tokenizer_files: dict[str, str]
    vocab_size: int
    table: VocabTable
    table_sha256: str


def prepare_capture(cfg: CaptureConfig, *, address: str | None = None) -> PreparedCapture:
    """Plan ``cfg`` into its output (metadata only), store the tokenizer copy and count the vocabulary table
    (Ray tasks over a sample of units). ``tools/bench_scale.py`` runs a sample of the planned units from here."""
    tokenizer = load_tokenizer(cfg.teacher, trust_remote_code=cfg.trust_remote_code, gguf_file=cfg.gguf_file)
    vocab_size = vocab_size_of(tokenizer)
    if cfg.k > vocab_size:
        raise ConfigError(f"k={cfg.k} is larger than the teacher's vocabulary ({vocab_size} ids); choose k <= {vocab_size}")
    teacher_id = model_identity(cfg.teacher, cfg.gguf_file)
    tok_sha = tokenizer_sha256(tokenizer)
    planned = plan_units(cfg, output=cfg.output, address=address, settings=capture_settings(cfg, teacher_id, tok_sha),
                         what="capture", subdirs=(SHARDS_DIR,))
    tokenizer_files = _save_tokenizer_copy(tokenizer, cfg.output)
    if cfg.vocab_sample_tokens:
        init_ray(address)  # the table is counted by tasks reading their own units
    counted = count_vocab_table_on_workers(cfg.section(TeacherSettings), planned.plan, vocab_size,
                                           cfg.vocab_sample_tokens)
    table, table_sha = ensure_vocab_table(cfg.output, counted, vocab_size)
    settings = cfg.section(TeacherSettings, vocab_table=storage.join(cfg.output, VOCAB_TABLE_NAME),
                           vocab_table_sha256=table_sha)
    return PreparedCapture(planned, settings, teacher_id, tok_sha, tokenizer_files, vocab_size, table, table_sha)


@guarded_stage("capture", worker_paths=("output",), checks=check_capture_inputs)  # bad input: one line, nothing written
def run_capture(cfg: CaptureConfig, *, address: str | None = None, progress: bool = True) -> Manifest:
    """Capture sparse teacher targets for ``cfg.corpus`` into ``cfg.output``; resumable.

    ``progress`` shows the live bar and, at the end, a short summary on stderr.
    """
    t_start = time.perf_counter()
    prepared = prepare_capture(cfg, address=address)
    planned, vocab_size, table = prepared.planned, prepared.vocab_size, prepared.table
    drive = run_units(TeacherWorker, prepared.settings, planned, cfg, output=cfg.output, subdirs=(SHARDS_DIR,),
                      address=address, progress=progress, what="capture")

    plan = planned.plan
    done, _ = trusted_completions(cfg.output, plan.sha256, plan.unit_hashes())
    missing = [u.unit for u in plan.units if u.unit not in done]
    if missing:
        raise RaydistillError(f"capture finished with {len(missing)} units missing (first: {missing[:5]}); "
                              "run the same command again to finish them")
    shards = [done[u.unit] for u in plan.units]
    documents, skipped = read_totals(shards, "capture", plan.corpus)
    stats = run_stats(shards=shards, documents=documents, units_this_run=len(planned.todo), drive=drive,
                      skipped=skipped, seconds=time.perf_counter() - t_start,
                      stale_temporaries=planned.stale_temporaries,
                      earlier_capture_seconds=_earlier_capture_seconds(cfg.output))
    manifest = Manifest(
        format_version=FORMAT_VERSION,
        created_at=utc_timestamp(),
        teacher=TeacherInfo(**prepared.teacher_id),
        tokenizer=TokenizerInfo(sha256=prepared.tokenizer_sha256, path=TOKENIZER_DIR, files=prepared.tokenizer_files),
        vocab_size=vocab_size,
        padded_vocab_size=_padded_vocab(cfg),
        token_dtype=token_dtype_for(vocab_size),
        sparsify=sparsify_info_for(codec_for(cfg.targets, vocab_size, table), **cfg.targets.recorded()),
        vocab_table=VocabTableInfo(path=VOCAB_TABLE_NAME, sha256=prepared.table_sha256, sample_tokens=table.sample_tokens),
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


def _padded_vocab(cfg: CaptureConfig) -> int:
    from transformers import AutoConfig

    kwargs = {"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}
    return int(AutoConfig.from_pretrained(cfg.teacher, trust_remote_code=cfg.trust_remote_code, **kwargs).vocab_size)
