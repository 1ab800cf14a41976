"""What ``raydistill select`` writes for others: per-unit scores, the ranked ``scores.parquet``, the kept set.

Per unit, ``scores/unit-NNNNNN.parquet`` holds each document's predicted tokens, both models'
summed losses and the share of its characters in repeated lines (``stages.select.repetition``), and
``done/unit-NNNNNN.json`` (``contracts.units``) records its checksum. Once
every unit is scored, ``scores.parquet`` adds ``score``, ``repetitive``, ``rank`` and ``kept`` for every document;
a capture or a training run given ``corpus.selection`` reads only that ``kept`` column.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raydistill.config.sections import CorpusConfig
from raydistill.contracts.plan import Plan
from raydistill.contracts.units import UnitRecord
from raydistill.errors import ConfigError, ContractError, RaydistillError
from raydistill.io import corpus, storage
from raydistill.io.corpus import Document, SkippedDocuments

__all__ = [
    "HISTOGRAM_NAME",
    "REPORT_NAME",
    "SCORES_DIR",
    "SCORES_NAME",
    "SCORES_VERSION",
    "UNIT_SCHEMA",
    "KeptDocuments",
    "read_unit_scores",
    "selected",
    "selected_documents",
    "selected_documents_counted",
    "selection_identity",
    "unit_scores_relpath",
]

SCORES_DIR = "scores"  # one Parquet file of per-document sums per unit
SCORES_NAME = "scores.parquet"  # every document: sums, score, rank, kept
REPORT_NAME = "report.json"
HISTOGRAM_NAME = "score_histogram.png"
UNIT_SCHEMA = pa.schema([("doc_id", pa.string()), ("tokens", pa.int64()), ("teacher_loss", pa.float64()),
                         ("reference_loss", pa.float64()), ("repeated_line_chars", pa.float64())])
SCORES_VERSION = 2  # 2: repeated_line_chars per document; in the plan hash, so older scores are never mixed in


def unit_scores_relpath(unit: int) -> str:
    return f"{SCORES_DIR}/unit-{unit:06d}.parquet"


def read_unit_scores(root: str, plan: Plan, done: dict[int, UnitRecord]) -> pa.Table:
    """Every unit's scores, in plan order, with a ``unit`` column; each checked against its completion
    record in ``done`` (those ``trusted_completions`` found written for this plan's units: size and sha256;
    the document ids its worker read, in order)."""
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
        ids = part.column("doc_id").to_pylist() if part.schema == UNIT_SCHEMA else None
        if ids is None or _ids_sha256(ids) != record.content_sha256:
            raise ContractError(f"{url} does not hold the scores of unit {unit.unit}'s documents; delete it and run "
                                "the same command again to re-score that unit")
        parts.append(part.append_column("unit", pa.array(np.full(len(part), unit.unit, dtype=np.int64))))
    return pa.concat_tables(parts)


def _ids_sha256(ids: list[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


def selection_identity(selection: str) -> dict:
    """What names a selection in a plan hash: where it is and its report's sha256 (which changes with the
    scores and with ``fraction``). One line if the selection is not there."""
    url = storage.join(selection, REPORT_NAME)
    if not storage.exists(url) or not storage.exists(storage.join(selection, SCORES_NAME)):
        raise ConfigError(f"corpus.selection: {storage.join(selection, SCORES_NAME)} does not exist; run "
                          f"`raydistill select` with output {storage.redact_url(selection)} first")
    return {"url": storage.redact_url(selection), "report_sha256": storage.sha256_bytes(storage.read_bytes(url))}


class KeptDocuments:
    """Which documents a selection scored and kept, as two sorted arrays of 64-bit ids (9 bytes a document):
    what a worker needs to filter its own slice by a selection, loaded once per process."""

    def __init__(self, selection: str, ids: np.ndarray, kept: np.ndarray):
        self.selection, self.ids, self.kept = selection, ids, kept

    @classmethod
    def load(cls, selection: str) -> KeptDocuments:
        url = storage.join(selection, SCORES_NAME)
        if not storage.exists(url):
            raise ConfigError(f"corpus.selection: {url} does not exist; run `raydistill select` with output "
                              f"{selection} first")
        table = pq.read_table(io.BytesIO(storage.read_bytes(url)), columns=["doc_id", "kept"])
        ids = np.array([int(i, 16) for i in table.column("doc_id").to_pylist()], dtype=np.uint64)
        kept = table.column("kept").to_numpy(zero_copy_only=False).astype(bool)
        order = np.argsort(ids, kind="stable")
        return cls(selection, ids[order], kept[order])

    def filter(self, docs: list[Document], where: object = "the corpus") -> list[Document]:
        """The documents of ``docs`` the selection kept, in order. Every one must have been scored by it: a
        selection made over another corpus would silently drop the ones it never saw."""
        if not docs:
            return []
        want = np.array([int(d.id, 16) for d in docs], dtype=np.uint64)
        pos = np.minimum(np.searchsorted(self.ids, want), max(len(self.ids) - 1, 0))
        seen = (self.ids[pos] == want) if len(self.ids) else np.zeros(len(want), dtype=bool)
        if not seen.all():
            first = docs[int(np.argmin(seen))].id
            raise ConfigError(f"corpus.selection: {int((~seen).sum())} of {len(docs)} documents of "
                              f"{getattr(where, 'describe', lambda: where)()} (first: {first}) were not scored by the "
                              f"selection in {storage.redact_url(self.selection)}; run `raydistill select` over this "
                              "corpus, or remove corpus.selection")
        keep = self.kept[pos]
        return [d for d, k in zip(docs, keep, strict=True) if k]


def selected(docs: list[Document], selection: str) -> list[Document]:
    """The documents a ``raydistill select`` run kept, in corpus order (see :meth:`KeptDocuments.filter`)."""
    return KeptDocuments.load(selection).filter(docs)


def selected_documents_counted(cfg: CorpusConfig) -> tuple[list[Document], SkippedDocuments]:
    """The corpus's documents (``io.corpus``) with ``cfg.selection`` applied, and the records skipped."""
    docs, skipped = corpus.read_documents_counted(cfg.model_copy(update={"selection": None}))
    return (docs if cfg.selection is None else selected(docs, cfg.selection)), skipped


def selected_documents(cfg: CorpusConfig) -> list[Document]:
    """:func:`selected_documents_counted` without the counts."""
    return selected_documents_counted(cfg)[0]
