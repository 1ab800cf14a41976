"""``raydistill select``: MiniPLM difference sampling, a refined corpus from teacher-vs-reference scores.

Offline teacher inference can improve the *data* as well as the targets (MiniPLM, Gu et al. 2024):
score every document by how much better a large teacher predicts it than a small reference model
of the same tokenizer, per token, ``(reference loss − teacher loss) / tokens``, and keep the top
fraction. Documents both models find easy (boilerplate) or both find hard (noise) score low; the
kept ones are where the teacher's extra capacity shows, which is what a student should learn from.
Because only the corpus changes, students of *any* tokenizer can train on the result with plain
CE (``raydistill train`` with ``corpus:``), across model families where logit KD cannot go.

The scoring pass is a capture without targets: the same deterministic units and plan hash, the
same restartable Ray actor pool, one Parquet file of per-document sums per unit, written
atomically and last, so a rerun scores only the units that have no file. The ranking, the refined
corpus and the report are pure functions of those files and ``fraction``: changing ``fraction``
re-ranks without running a model.
"""

from __future__ import annotations

import io
import json
import logging
import math
import threading
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from raydistill.config import SelectConfig
from raydistill.contracts.plan import Plan, make_plan, write_or_check_plan
from raydistill.errors import ConfigError, ContractError, RaydistillError
from raydistill.io import storage
from raydistill.io.corpus import Document, describe, read_documents_counted
from raydistill.models.loading import load_causal_lm, model_identity
from raydistill.models.tokenizers import load_tokenizer, tokenizer_sha256
from raydistill.runtime.cluster import init_ray
from raydistill.stages.capture.run import (
    drive_units,
    drop_oversize,
    remove_stale_temporaries,
    resolve_num_actors,
    start_actors,
)
from raydistill.stages.capture.worker import (
    document_windows,
    length_batches,
    make_batch,
    pick_device_and_dtype,
)

log = logging.getLogger(__name__)

SCORES_DIR = "scores"  # one Parquet file of per-document sums per unit
SCORES_NAME = "scores.parquet"  # every document: sums, score, rank, kept
REPORT_NAME = "report.json"
HISTOGRAM_NAME = "score_histogram.png"
_UNIT_SCHEMA = pa.schema([("doc_id", pa.string()), ("tokens", pa.int64()), ("teacher_loss", pa.float64()),
                          ("reference_loss", pa.float64())])


@dataclass(frozen=True)
class ScoreSettings:
    """What a ``ScoreWorker`` actor needs: both models, how to cut and batch documents."""

    teacher: str
    reference: str
    teacher_gguf_file: str | None = None
    reference_gguf_file: str | None = None
    max_length: int = 256
    batch_tokens: int = 4096
    dtype: str = "auto"
    threads: int = 1
    trust_remote_code: bool = False


def unit_scores_relpath(unit: int) -> str:
    return f"{SCORES_DIR}/unit-{unit:06d}.parquet"


class ScoreWorker:
    """Holds the teacher and the reference; scores whole units. Safe for 2 calls at once (one uses
    the models while the other writes)."""

    def __init__(self, settings: ScoreSettings):
        torch.set_num_threads(settings.threads)
        self.settings = settings
        self.device, dtype = pick_device_and_dtype(settings.dtype)
        self.tokenizer = load_tokenizer(settings.teacher, trust_remote_code=settings.trust_remote_code,
                                        gguf_file=settings.teacher_gguf_file)
        self.models = [
            load_causal_lm(path, trust_remote_code=settings.trust_remote_code, dtype=dtype, gguf_file=gguf)
            .to(self.device).eval()
            for path, gguf in ((settings.teacher, settings.teacher_gguf_file),
                               (settings.reference, settings.reference_gguf_file))
        ]
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self._device_lock = threading.Lock()
        self._tokenizer_lock = threading.Lock()

    def score_unit(self, root: str, unit: int, documents: list[Document]) -> dict:
        """Per-document predicted tokens and summed next-token losses of both models, written to
        ``scores/unit-N.parquet`` (atomically: the file is the unit's completion record)."""
        t0 = time.perf_counter()
        with self._tokenizer_lock:
            cut = document_windows(self.tokenizer, documents, self.settings.max_length)
        cut = [c for c in cut if len(c[2]) >= 2]  # a window predicts len - 1 tokens
        owner, windows = [c[0] for c in cut], [c[2] for c in cut]
        losses = np.zeros((2, len(documents)), dtype=np.float64)
        tokens = np.zeros(len(documents), dtype=np.int64)
        np.add.at(tokens, owner, [len(w) - 1 for w in windows])
        for rows in length_batches([len(w) for w in windows], self.settings.batch_tokens):
            batch = make_batch(windows, rows, self.pad_id)
            with self._device_lock:
                sums = [summed_nll(model, batch.input_ids.to(self.device), batch.attention_mask.to(self.device))
                        for model in self.models]
            for m, s in enumerate(sums):
                np.add.at(losses[m], [owner[r] for r in rows], s)
        table = pa.table({"doc_id": [d.id for d in documents], "tokens": tokens, "teacher_loss": losses[0],
                          "reference_loss": losses[1]}, schema=_UNIT_SCHEMA)
        out = io.BytesIO()
        pq.write_table(table, out, compression="zstd")
        storage.atomic_write_bytes(storage.join(root, unit_scores_relpath(unit)), out.getvalue())
        return {"unit": unit, "tokens": int(tokens.sum()), "seconds": time.perf_counter() - t0}


@torch.inference_mode()
def summed_nll(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> np.ndarray:
    """Sum over each row of −log p(next token) in float32, padding excluded: [B] float64."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    out = np.zeros(input_ids.shape[0], dtype=np.float64)
    for r in range(input_ids.shape[0]):  # one row at a time: a float32 copy of [T, V], not of [B, T, V]
        n = int(attention_mask[r].sum())
        if n >= 2:
            nll = torch.nn.functional.cross_entropy(logits[r, : n - 1].float(), input_ids[r, 1:n], reduction="sum")
            out[r] = float(nll)
    return out


# --- the driver ---------------------------------------------------------------------------------


def teacher_tokenizer(cfg: SelectConfig):
    """The teacher's tokenizer, after checking that the reference tokenizes the same way: per-token losses
    compare only over the same tokens."""
    tokenizers = [load_tokenizer(path, trust_remote_code=cfg.trust_remote_code, gguf_file=gguf)
                  for path, gguf in ((cfg.teacher, cfg.gguf_file), (cfg.reference, cfg.reference_gguf_file))]
    shas = [tokenizer_sha256(t) for t in tokenizers]
    if shas[0] != shas[1]:
        raise ConfigError(
            f"teacher {cfg.teacher} (tokenizer sha256 {shas[0][:12]}…) and reference {cfg.reference} (tokenizer "
            f"sha256 {shas[1][:12]}…) tokenize differently; the score compares their per-token losses, so the "
            "reference must use the teacher's tokenizer (a small model of the same family, or one trained with "
            "the teacher's tokenizer as the demo's is)")
    return tokenizers[0]


def run_select(cfg: SelectConfig, *, address: str | None = None, progress: bool = True) -> dict:
    """Score ``cfg.corpus`` with the teacher and the reference (resumable), then rank, write the
    refined corpus and the report. Returns the report."""
    t_start = time.perf_counter()
    tokenizer = teacher_tokenizer(cfg)
    documents, skipped = read_documents_counted(cfg.corpus)
    documents, oversize = drop_oversize(documents, tokenizer, cfg.max_document_tokens)
    if not documents:
        raise ConfigError(f"corpus {describe(cfg.corpus)} has no documents to score")
    settings = {"kind": "select", "teacher": model_identity(cfg.teacher, cfg.gguf_file),
                "reference": model_identity(cfg.reference, cfg.reference_gguf_file), "tokenizer_sha256": tokenizer_sha256(tokenizer),
                "max_length": cfg.max_length}
    plan = make_plan(documents, docs_per_unit=cfg.docs_per_unit, corpus=describe(cfg.corpus), settings=settings)
    write_or_check_plan(cfg.output, plan)
    remove_stale_temporaries(cfg.output, subdirs=(SCORES_DIR,))
    todo = [u for u in plan.units if not storage.exists(storage.join(cfg.output, unit_scores_relpath(u.unit)))]
    log.info("select plan %s: %d units, %d to score", plan.sha256[:12], len(plan.units), len(todo))
    score_seconds = 0.0
    if todo:
        import ray

        init_ray(address)
        count = min(resolve_num_actors(cfg, ray.cluster_resources()), len(todo))
        worker = ScoreSettings(teacher=cfg.teacher, reference=cfg.reference, teacher_gguf_file=cfg.gguf_file,
                               reference_gguf_file=cfg.reference_gguf_file, max_length=cfg.max_length,
                               batch_tokens=cfg.batch_tokens, dtype=cfg.dtype, threads=cfg.threads_per_actor,
                               trust_remote_code=cfg.trust_remote_code)
        actors = start_actors(ScoreWorker, worker, count, cpus=cfg.threads_per_actor, gpus=cfg.num_gpus_per_actor)
        try:
            score_seconds = drive_units(actors, todo, plan, documents, cfg.output, progress, method="score_unit",
                                        what="select").seconds
        finally:
            for actor in actors:
                ray.kill(actor)
        remove_stale_temporaries(cfg.output, subdirs=(SCORES_DIR,))
    table = ranked_scores(read_unit_scores(cfg.output, plan, documents), cfg.fraction)
    report = write_outputs(cfg, table, documents)
    report.update({"teacher": cfg.teacher, "reference": cfg.reference, "corpus": describe(cfg.corpus),
                   "units": len(plan.units), "units_this_run": len(todo), "score_seconds_this_run": round(score_seconds, 2),
                   "seconds_this_run": round(time.perf_counter() - t_start, 2),
                   "skipped_documents": {**skipped.as_dict(), "oversize": oversize}})
    storage.atomic_write_text(storage.join(cfg.output, REPORT_NAME), json.dumps(report, indent=1))
    storage.atomic_write_text(storage.join(cfg.output, "report.md"), report_markdown(report))
    return report


def read_unit_scores(root: str, plan: Plan, documents: list[Document]) -> pa.Table:
    """Every unit's file, in plan order, each checked against the documents the plan gave it."""
    parts = []
    for unit in plan.units:
        url = storage.join(root, unit_scores_relpath(unit.unit))
        if not storage.exists(url):
            raise RaydistillError(f"unit {unit.unit} has no scores ({url}); run the same command again to finish it")
        part = pq.read_table(io.BytesIO(storage.read_bytes(url)))
        want = [d.id for d in plan.documents_of(unit, documents)]
        if part.schema != _UNIT_SCHEMA or part.column("doc_id").to_pylist() != want:
            raise ContractError(f"{url} does not hold the scores of unit {unit.unit}'s documents; delete it and run "
                                "the same command again to re-score that unit")
        parts.append(part)
    return pa.concat_tables(parts)


def ranked_scores(table: pa.Table, fraction: float) -> pa.Table:
    """Adds ``score`` (per-token reference − teacher loss; NaN without a predicted token), ``rank``
    (0 = highest score; ties by document id; unscored documents last) and ``kept`` (the top
    ``round(fraction · documents)``, at least one)."""
    tokens = table.column("tokens").to_numpy()
    diff = table.column("reference_loss").to_numpy() - table.column("teacher_loss").to_numpy()
    score = np.where(tokens > 0, diff / np.maximum(tokens, 1), np.nan)
    ids = np.asarray(table.column("doc_id").to_pylist())
    order = np.lexsort((ids, -np.nan_to_num(score, nan=-np.inf), np.isnan(score)))  # last key sorts first
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    keep = max(1, min(len(order), round(fraction * len(order))))
    return table.append_column("score", pa.array(score)).append_column("rank", pa.array(rank)).append_column(
        "kept", pa.array(rank < keep))


def write_outputs(cfg: SelectConfig, table: pa.Table, documents: list[Document]) -> dict:
    """scores.parquet, the refined corpus (kept documents in corpus order) and the histogram."""
    out = io.BytesIO()
    pq.write_table(table, out, compression="zstd")
    storage.atomic_write_bytes(storage.join(cfg.output, SCORES_NAME), out.getvalue())
    kept = table.column("kept").to_numpy(zero_copy_only=False)
    score = table.column("score").to_numpy()
    tokens = table.column("tokens").to_numpy()
    refined_url = cfg.refined or storage.join(cfg.output, f"refined.{cfg.refined_format}")
    rows = [{"id": d.id, "text": d.text, "score": None if math.isnan(s) else float(s)}
            for d, s, k in zip(documents, score, kept, strict=True) if k]
    storage.atomic_write_bytes(refined_url, corpus_bytes(rows, cfg.refined_format))
    ranked = table.sort_by("rank")
    scored = ranked.filter(pc.invert(pc.is_nan(ranked.column("score"))))

    def listing(t: pa.Table) -> list[dict]:
        return [{"id": i, "score": round(s, 5)} for i, s in zip(t.column("doc_id").to_pylist(),
                                                                t.column("score").to_pylist(), strict=True)]

    finite = score[~np.isnan(score)]
    kept_scores = score[kept & ~np.isnan(score)]
    report = {
        "documents": len(documents), "scored_documents": len(finite),
        "kept_documents": int(kept.sum()), "fraction": cfg.fraction,
        "kept_fraction": round(float(kept.mean()), 6),
        "tokens": int(tokens.sum()), "kept_tokens": int(tokens[kept].sum()),
        "kept_token_fraction": round(float(tokens[kept].sum() / max(tokens.sum(), 1)), 6),
        "score_mean": round(float(finite.mean()), 5) if len(finite) else None,
        "score_median": round(float(np.median(finite)), 5) if len(finite) else None,
        "kept_score_min": round(float(kept_scores.min()), 5) if len(kept_scores) else None,
        "highest": listing(scored.slice(0, 10)), "lowest": listing(scored.slice(max(0, len(scored) - 10)))[::-1],
        "refined": refined_url, "scores": storage.join(cfg.output, SCORES_NAME),
        "histogram": storage.join(cfg.output, HISTOGRAM_NAME),
    }
    storage.atomic_write_bytes(report["histogram"], histogram_png(finite, report["kept_score_min"], cfg.fraction))
    return report


def corpus_bytes(rows: list[dict], fmt: str) -> bytes:
    """The refined corpus as jsonl or Parquet, with ``id``, ``text`` and ``score`` per document."""
    if fmt == "jsonl":
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    out = io.BytesIO()
    schema = pa.schema([("id", pa.string()), ("text", pa.string()), ("score", pa.float64())])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), out, compression="zstd")
    return out.getvalue()


def histogram_png(scores: np.ndarray, cut: float | None, fraction: float) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.hist(scores, bins=min(60, max(10, len(scores) // 10)), color="#4C72B0")
    if cut is not None:
        ax.axvline(cut, color="#C44E52", linestyle="--", label=f"kept: top {fraction:.0%} (score ≥ {cut:.3f})")
        ax.legend()
    ax.set_xlabel("score: reference − teacher loss per token (nats)")
    ax.set_ylabel("documents")
    ax.set_title("MiniPLM difference scores")
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=110)
    plt.close(fig)
    return out.getvalue()


def report_markdown(report: dict) -> str:
    r = report
    lines = [
        "# raydistill select report", "",
        f"- teacher `{r['teacher']}`, reference `{r['reference']}`, corpus `{r['corpus']}`",
        f"- kept {r['kept_documents']:,} of {r['documents']:,} documents ({r['kept_fraction']:.1%}; asked "
        f"{r['fraction']:.1%}), {r['kept_tokens']:,} of {r['tokens']:,} tokens ({r['kept_token_fraction']:.1%})",
        f"- score (reference − teacher loss per token): mean {r['score_mean']}, median {r['score_median']}, "
        f"lowest kept {r['kept_score_min']}",
        f"- refined corpus: `{r['refined']}`; all scores: `{r['scores']}`; histogram: `{r['histogram']}`", "",
        "| highest scored | score | lowest scored | score |", "|---|---|---|---|",
    ]
    for hi, lo in zip(r["highest"], r["lowest"], strict=False):
        lines.append(f"| {hi['id']} | {hi['score']} | {lo['id']} | {lo['score']} |")
    return "\n".join(lines) + "\n"
