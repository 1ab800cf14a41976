"""The refined corpus, written where the documents are read: one part per unit, by a Ray task each.

Once the ranking says which documents are kept, each unit's task reads its own slice again
(``io.slices``), keeps the documents the ranking kept, in corpus order, and writes
``part-NNNNNN.<format>`` atomically. The driver sends each task only its unit's kept ids
and scores; no document text passes through the driver or the object store. Every unit gets
a part (an empty one if it kept nothing), so a rerun rewrites the same set of files.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

from raydistill.config.jobs import SelectConfig
from raydistill.config.sections import CorpusConfig
from raydistill.contracts.plan import Plan
from raydistill.errors import ContractError
from raydistill.io import storage
from raydistill.io.slices import Slice, read_slice
from raydistill.runtime.failures import error_from_ray
from raydistill.stages.select.ranking import corpus_bytes

__all__ = ["refined_url", "write_refined"]


def refined_url(cfg: SelectConfig) -> str:
    return cfg.refined or storage.join(cfg.output, "refined")


def _write_part(corpus: CorpusConfig, piece: Slice, kept: dict[str, float | None], url: str, fmt: str) -> int:
    """Read ``piece``, keep the documents in ``kept`` (id -> score), write them to ``url``; returns how many."""
    docs, _ = read_slice(piece, corpus)
    rows = [{"id": d.id, "text": d.text, "score": kept[d.id]} for d in docs if d.id in kept]
    if len(rows) != len(kept):
        raise ContractError(f"{piece.describe()} no longer gives the documents it was scored on ({len(rows)} of the "
                            f"{len(kept)} kept found); run `raydistill select` into a new output")
    storage.atomic_write_bytes(url, corpus_bytes(rows, fmt))
    return len(rows)


def write_refined(cfg: SelectConfig, plan: Plan, table: pa.Table) -> str:
    """Write every unit's part of the refined corpus (``table``: the ranked scores with their ``unit``
    column) and return the folder's URL."""
    import ray

    folder = refined_url(cfg)
    kept = table.filter(table.column("kept"))
    order = np.argsort(kept.column("unit").to_numpy(), kind="stable")  # corpus order kept within a unit
    units = kept.column("unit").to_numpy()[order]
    ids = np.asarray(kept.column("doc_id").to_pylist(), dtype=object)[order]
    scores = kept.column("score").to_numpy()[order]
    bounds = np.searchsorted(units, [u.unit for u in plan.units] + [len(plan.units)])  # one pass, not one per unit
    task = ray.remote(_write_part).options(num_cpus=1, max_retries=3)
    refs = []
    for unit, lo, hi in zip(plan.units, bounds[:-1], bounds[1:], strict=True):
        chosen = {str(i): (None if math.isnan(s) else float(s)) for i, s in zip(ids[lo:hi], scores[lo:hi], strict=True)}
        url = storage.join(folder, f"part-{unit.unit:06d}.{cfg.refined_format}")
        refs.append(task.remote(cfg.corpus.model_copy(update={"selection": None}), unit.slice, chosen, url,
                                cfg.refined_format))
    try:
        ray.get(refs)
    except ray.exceptions.RayError as err:
        raise error_from_ray(err, "writing the refined corpus", "run the same command again") from err
    return folder
