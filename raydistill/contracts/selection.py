"""What ``raydistill select`` writes for others: per-unit scores, the ranked ``scores.parquet``, the kept set.

Per unit, ``scores/unit-NNNNNN.parquet`` holds each document's predicted tokens and both models'
summed losses, and ``done/unit-NNNNNN.json`` (``contracts.units``) records its checksum. Once
every unit is scored, ``scores.parquet`` adds ``score``, ``rank`` and ``kept`` for every document;
a capture or a training run given ``corpus.selection`` reads only that ``kept`` column.
"""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq

from raydistill.config.sections import CorpusConfig
from raydistill.contracts.plan import Plan
from raydistill.contracts.units import trusted_completions
from raydistill.errors import ConfigError, ContractError, RaydistillError
from raydistill.io import corpus, storage
from raydistill.io.corpus import Document, SkippedDocuments

__all__ = ["HISTOGRAM_NAME", "REPORT_NAME", "SCORES_DIR", "SCORES_NAME", "UNIT_SCHEMA", "read_unit_scores",
           "selected", "selected_documents", "selected_documents_counted", "unit_scores_relpath"]

SCORES_DIR = "scores"  # one Parquet file of per-document sums per unit
SCORES_NAME = "scores.parquet"  # every document: sums, score, rank, kept
REPORT_NAME = "report.json"
HISTOGRAM_NAME = "score_histogram.png"
UNIT_SCHEMA = pa.schema([("doc_id", pa.string()), ("tokens", pa.int64()), ("teacher_loss", pa.float64()),
                         ("reference_loss", pa.float64())])


def unit_scores_relpath(unit: int) -> str:
    return f"{SCORES_DIR}/unit-{unit:06d}.parquet"


def read_unit_scores(root: str, plan: Plan, documents: list[Document]) -> pa.Table:
    """Every unit's scores, in plan order, each checked against its completion record (written for this
    plan's unit; size and sha256) and against the documents the plan gave it."""
    done, _ = trusted_completions(root, plan.sha256, plan.unit_hashes())
    parts = []
    for unit in plan.units:
        url = storage.join(root, unit_scores_relpath(unit.unit))
        record = done.get(unit.unit)
        if record is None or not storage.exists(url):
            raise RaydistillError(f"unit {unit.unit} has no scores ({url}); run the same command again to finish it")
        data = storage.read_bytes(url)
        if len(data) != record.bytes or storage.sha256_bytes(data) != record.sha256:
            raise ContractError(f"{url} is not the file its completion record describes (size or sha256 differ); "
                                "delete both and run the same command again to re-score that unit")
        part = pq.read_table(io.BytesIO(data))
        want = [d.id for d in plan.documents_of(unit, documents)]
        if part.schema != UNIT_SCHEMA or part.column("doc_id").to_pylist() != want:
            raise ContractError(f"{url} does not hold the scores of unit {unit.unit}'s documents; delete it and run "
                                "the same command again to re-score that unit")
        parts.append(part)
    return pa.concat_tables(parts)


def selected(docs: list[Document], selection: str) -> list[Document]:
    """The documents a ``raydistill select`` run kept, in corpus order. Every document must have been
    scored by it: a selection made over another corpus would silently drop the ones it never saw."""
    url = storage.join(selection, SCORES_NAME)
    if not storage.exists(url):
        raise ConfigError(f"corpus.selection: {url} does not exist; run `raydistill select` with output "
                          f"{selection} first")
    table = pq.read_table(io.BytesIO(storage.read_bytes(url)), columns=["doc_id", "kept"])
    kept = dict(zip(table.column("doc_id").to_pylist(), table.column("kept").to_pylist(), strict=True))
    unseen = [d.id for d in docs if d.id not in kept]
    if unseen:
        raise ConfigError(f"corpus.selection: {len(unseen)} of {len(docs)} documents (first: {unseen[0]}) were not "
                          f"scored by the selection in {selection}; run `raydistill select` over this corpus, or "
                          "remove corpus.selection")
    return [d for d in docs if kept[d.id]]


def selected_documents_counted(cfg: CorpusConfig) -> tuple[list[Document], SkippedDocuments]:
    """The corpus's documents (``io.corpus``) with ``cfg.selection`` applied, and the records skipped."""
    docs, skipped = corpus.read_documents_counted(cfg.model_copy(update={"selection": None}))
    return (docs if cfg.selection is None else selected(docs, cfg.selection)), skipped


def selected_documents(cfg: CorpusConfig) -> list[Document]:
    """:func:`selected_documents_counted` without the counts."""
    return selected_documents_counted(cfg)[0]
