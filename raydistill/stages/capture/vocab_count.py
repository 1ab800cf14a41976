"""The shard set's vocabulary table, counted by Ray tasks before any teacher actor starts.

Every shard of a set must renumber ids by the same table (format.md §2.4), so it is counted
over a deterministic sample of the plan's units (evenly spaced, about ``vocab_sample_tokens``
tokens in all) and written to ``vocab.parquet`` first. Each task reads its own unit's slice
as a teacher actor would and returns one array of counts; the driver only adds the arrays.
A resumed run counts it again and keeps the file only if it is that table.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from raydistill.contracts.plan import Plan, WorkUnit
from raydistill.contracts.shards.vocab import (
    VOCAB_TABLE_NAME,
    VocabTable,
    load_vocab_table,
    write_vocab_table,
)
from raydistill.errors import RaydistillError
from raydistill.io import storage
from raydistill.io.corpus import Document
from raydistill.models.tokenizers import load_tokenizer
from raydistill.models.windows import TOKENIZE_BATCH
from raydistill.runtime.failures import error_from_ray
from raydistill.runtime.unit_input import read_unit_documents
from raydistill.stages.capture.worker import TeacherSettings

__all__ = ["count_vocab_table", "count_vocab_table_on_workers", "ensure_vocab_table", "evenly_spaced", "sample_documents",
           "sample_units"]

CHARS_PER_TOKEN = 4  # English text: sizes the sample before anything is tokenized
MIN_SAMPLE_UNITS = 16  # spread over the corpus even when a few units would hold the sample

log = logging.getLogger(__name__)


def sample_documents(documents: list[Document], max_chars: int) -> list[Document]:
    """An evenly spaced, deterministic subset of about ``max_chars`` characters."""
    total = sum(len(d.text) for d in documents)
    stride = max(1, math.ceil(total / max(max_chars, 1)))
    return documents[::stride]


def count_vocab_table(tokenizer, documents: list[Document], vocab_size: int, sample_tokens: int) -> VocabTable:
    """Token counts over about ``sample_tokens`` tokens of evenly spaced documents (0: all counts
    equal). Benchmarks call it too, so they renumber ids exactly as a capture would."""
    if sample_tokens == 0:
        return VocabTable.uniform(vocab_size)
    sample = sample_documents(documents, sample_tokens * CHARS_PER_TOKEN)
    lists = []
    for start in range(0, len(sample), TOKENIZE_BATCH):
        texts = [d.text for d in sample[start : start + TOKENIZE_BATCH]]
        lists.extend(tokenizer(texts, add_special_tokens=False)["input_ids"])
    return VocabTable.count(lists, vocab_size)


def sample_units(plan: Plan, sample_tokens: int) -> list[WorkUnit]:
    """Evenly spaced units of ``plan`` holding about ``sample_tokens`` tokens (by their bytes), in plan order:
    a pure function of the plan, so every run of it counts the same sample."""
    if sample_tokens == 0 or not plan.units:
        return []
    units = plan.units
    needed = math.ceil(sample_tokens * CHARS_PER_TOKEN / max(plan.bytes / len(units), 1))
    return evenly_spaced(units, max(MIN_SAMPLE_UNITS, needed))


def evenly_spaced(items: list, n: int) -> list:
    """``n`` items (all of them if fewer) at even steps from the first: a deterministic spread."""
    n = min(n, len(items))
    return [items[i * len(items) // n] for i in range(n)]


def _count_unit(settings: TeacherSettings, unit: WorkUnit, vocab_size: int, max_tokens: int) -> np.ndarray:
    """Token counts of the first ``max_tokens`` tokens of one unit's documents, read from its slice here."""
    tokenizer = load_tokenizer(settings.teacher, trust_remote_code=settings.trust_remote_code,
                               gguf_file=settings.gguf_file)
    documents = read_unit_documents(unit.slice, settings, tokenizer).documents
    counts, seen = np.zeros(vocab_size, dtype=np.int64), 0
    for start in range(0, len(documents), TOKENIZE_BATCH):
        texts = [d.text for d in documents[start : start + TOKENIZE_BATCH]]
        for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
            ids = ids[: max(0, max_tokens - seen)]
            counts += np.bincount(np.asarray(ids, dtype=np.int64), minlength=vocab_size)[:vocab_size]
            seen += len(ids)
        if seen >= max_tokens:
            break
    return counts


def count_vocab_table_on_workers(settings: TeacherSettings, plan: Plan, vocab_size: int, sample_tokens: int
                                 ) -> VocabTable:
    """The table over :func:`sample_units`, each unit counted by a Ray task (one CPU each) reading its own
    slice; the driver holds one array of ``vocab_size`` counts per task, never a document."""
    units = sample_units(plan, sample_tokens)
    if not units:
        return VocabTable.uniform(vocab_size)
    import ray

    per_unit = math.ceil(sample_tokens / len(units))
    task = ray.remote(_count_unit).options(num_cpus=1, max_retries=3)
    counts = np.zeros(vocab_size, dtype=np.int64)
    refs = [task.remote(settings, u, vocab_size, per_unit) for u in units]
    try:
        for part in ray.get(refs):
            counts += part
    except ray.exceptions.RayError as err:
        raise error_from_ray(err, "counting the vocabulary table", "run the same command again") from err
    return VocabTable(counts)


def ensure_vocab_table(root: str, table: VocabTable, vocab_size: int) -> tuple[VocabTable, str]:
    """``table`` and its sha256, written unless ``root`` already holds it.

    The table is a pure function of the plan, the tokenizer and ``sample_tokens``, so every unit of a
    plan is encoded with the same one; a resumed run counts it again rather than trusting the file it
    finds, so a table replaced since (which would renumber every id of the units still to do) is put
    back, never used.
    """
    url = storage.join(root, VOCAB_TABLE_NAME)
    if storage.exists(url):
        try:
            found, sha = load_vocab_table(url, vocab_size)
            if np.array_equal(found.counts, table.counts):
                return found, sha
        except RaydistillError:
            pass
        log.warning("%s is not the table this corpus and tokenizer give (replaced or damaged); writing it again", url)
    _, sha = write_vocab_table(root, table)
    return table, sha
