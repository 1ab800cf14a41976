"""The life of a unit stage (capture, select), written once: plan the units, then run the missing ones.

1. :func:`plan_units` cuts the corpus into slices from storage metadata (``io.slices``: file
   listings, Parquet footers, byte ranges; no document text), writes the plan or checks it
   against the one already in the output (a different plan is refused, naming a changed
   corpus file), deletes temporaries of killed writers and finds the units without a
   completion record this plan can trust (``contracts.units.trusted_completions``): records of
   another plan, or whose file is gone, are set aside and their units redone. Workers read,
   filter and de-duplicate their own slices (``runtime.unit_input``);
2. :func:`run_units` joins or starts Ray, sizes the actor pool, starts the unit workers,
   drives them until every unit has returned, stops them and deletes new temporaries.

Between the two a stage does its own driver-side work (the capture's tokenizer copy and
vocabulary table); after them, its own assembly (the manifest, the ranking).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from raydistill.config.sections import ActorPoolConfig, CorpusConfig
from raydistill.contracts.plan import Plan, WorkUnit, make_plan, read_plan_sha, write_or_check_plan
from raydistill.contracts.selection import selection_identity
from raydistill.contracts.units import UnitRecord, Untrusted, remove_stale_temporaries, trusted_completions
from raydistill.errors import ConfigError, PlanMismatchError
from raydistill.io import storage
from raydistill.io.corpus import describe
from raydistill.io.slices import Slice, plan_slices, read_slice
from raydistill.runtime.cluster import init_ray, ray_started_here
from raydistill.runtime.failures import error_from_ray
from raydistill.runtime.pool import (
    DriveResult,
    UnitWorker,
    check_pool_fits,
    drive_units,
    resolve_num_actors,
    start_actors,
)

__all__ = ["PlannedUnits", "plan_units", "read_totals", "reading_settings", "run_units"]

log = logging.getLogger(__name__)


@dataclass
class PlannedUnits:
    """A stage's plan and where a run of it stands."""

    plan: Plan
    todo: list[WorkUnit]  # units without a completion record this plan trusts
    resumed: bool  # the output already held this plan
    stale_temporaries: int
    set_aside: list[Untrusted]  # completion records found but not trusted (their units are in todo)


def reading_settings(cfg: ActorPoolConfig) -> dict[str, Any]:
    """What changes the documents a unit's worker reads from its slice, for the plan hash."""
    corpus = cfg.corpus
    return {"text_field": corpus.text_field, "split": corpus.split, "heldout_fraction": corpus.heldout_fraction,
            "selection": None if corpus.selection is None else selection_identity(corpus.selection),
            "max_document_tokens": cfg.max_document_tokens, "unit_bytes": cfg.unit_bytes}


def plan_units(cfg: ActorPoolConfig, *, output: str, settings: dict[str, Any], what: str,
               subdirs: tuple[str, ...], address: str | None = None) -> PlannedUnits:
    """Plan ``cfg.corpus`` into ``output`` from storage metadata; ``settings`` (everything that changes a
    unit's output) and the reading settings go into the plan hash; ``subdirs`` are where the stage writes
    unit outputs (swept for temporaries)."""
    storage.check_output(output, "output")
    slices = plan_slices(cfg.corpus.model_copy(update={"selection": None}), cfg.unit_bytes)
    plan = make_plan(slices, corpus=describe(cfg.corpus), settings={**settings, "reading": reading_settings(cfg)})
    if read_plan_sha(output) != plan.sha256:  # a new plan (a resume was probed when it was new)
        probe_corpus(plan, cfg, what, address)
    done, set_aside = trusted_completions(output, plan.sha256, plan.unit_hashes())
    _refuse_foreign_records(output, plan, set_aside)
    resumed = write_or_check_plan(output, plan)
    stale = remove_stale_temporaries(output, subdirs)
    for record in set_aside:  # deleted now: a crash before the redo must not find them again
        storage.remove(record.url)
    for record in set_aside[:5]:
        log.warning("%s: not trusted (%s); the unit is redone", record.url, record.reason)
    if len(set_aside) > 5:
        log.warning("%d more completion records not trusted; their units are redone", len(set_aside) - 5)
    todo = [u for u in plan.units if u.unit not in done]
    log.info("%s plan %s: %d units, %d already done%s", what, plan.sha256[:12], len(plan.units),
             len(plan.units) - len(todo), " (resuming)" if resumed else "")
    return PlannedUnits(plan=plan, todo=todo, resumed=resumed, stale_temporaries=stale, set_aside=set_aside)


def probe_corpus(plan: Plan, cfg: ActorPoolConfig, what: str, address: str | None) -> None:
    """Read the first unit of each file format in Ray tasks before anything is written: a wrong
    ``text_field``, a first file that cannot be decoded, or (when that covers the whole plan) a corpus
    without one usable document is one error line now, not a failed run later. The driver reads
    nothing; a problem in a later file is found by the unit that reads it, naming the file."""
    firsts: dict[str, WorkUnit] = {}
    for unit in plan.units:
        firsts.setdefault(unit.slice.format, unit)
    import ray

    init_ray(address)
    task = ray.remote(_probe_unit).options(num_cpus=1, max_retries=3)
    try:
        found = ray.get([task.remote(unit.slice, cfg.corpus.model_copy(update={"selection": None}))
                         for unit in firsts.values()])
    except ray.exceptions.RayError as err:
        raise error_from_ray(err, f"reading the corpus's first {what} unit", "fix the corpus or the config") from err
    if len(firsts) == len(plan.units) and sum(n for n, _ in found) == 0:
        dropped = {k: sum(s[k] for _, s in found) for k in found[0][1]}
        reasons = ", ".join(f"{n} {k}" for k, n in dropped.items() if n) or "no records"
        raise ConfigError(f"corpus {plan.corpus} has no documents to {what} ({reasons})")


def _probe_unit(piece: Slice, corpus: CorpusConfig) -> tuple[int, dict[str, int]]:
    documents, skipped = read_slice(piece, corpus)
    return len(documents), skipped.as_dict()


def _refuse_foreign_records(output: str, plan: Plan, set_aside: list[Untrusted]) -> None:
    """An output without plan.json that holds another plan's completion records is another run's output
    whose plan was lost: writing this plan there would mix two runs (or silently overwrite one)."""
    foreign = [r for r in set_aside if r.foreign]
    if foreign and read_plan_sha(output) is None:
        raise PlanMismatchError(
            f"output {output} has no plan.json but holds {len(foreign)} completion records of another run "
            f"(e.g. {foreign[0].url}: {foreign[0].reason}); use a new output directory, or delete {output} to "
            "start over")


def run_units(worker_cls: type[UnitWorker], settings: Any, planned: PlannedUnits, cfg: ActorPoolConfig, *,
              output: str, subdirs: tuple[str, ...], address: str | None, progress: bool, what: str
              ) -> DriveResult:
    """Run ``planned.todo`` on a pool of ``worker_cls(settings)`` actors; returns what each actor did.

    The actors are killed on the way out, whatever happens; temporaries are swept only after
    every call has returned (no writer is left then).
    """
    if not planned.todo:
        return DriveResult(actors=[], seconds=0.0)
    import ray

    init_ray(address)
    resources = ray.cluster_resources()
    count = min(resolve_num_actors(cfg, resources), len(planned.todo))
    check_pool_fits(cfg, resources, fixed=ray_started_here(), count=count)  # else actors that never start: a hang
    actors = start_actors(worker_cls, settings, count, cpus=cfg.threads_per_actor, gpus=cfg.num_gpus_per_actor)
    try:
        drive = drive_units(actors, planned.todo, planned.plan, output, progress, what=what)
    finally:
        for actor in actors:
            ray.kill(actor)
    planned.stale_temporaries += remove_stale_temporaries(output, subdirs)
    return drive


def read_totals(records: list[UnitRecord], what: str, corpus: str) -> tuple[int, dict[str, int]]:
    """Documents and skipped records (by reason) over a finished run's completion records, as the workers
    counted them; a run whose units found no document at all is one error, not an empty output."""
    documents = sum(r.documents or 0 for r in records)
    skipped: dict[str, int] = {}
    for record in records:
        for reason, n in (record.skipped or {}).items():
            skipped[reason] = skipped.get(reason, 0) + n
    if records and all(r.documents is not None for r in records) and documents == 0:
        too_long = (f" ({skipped['oversize']} longer than max_document_tokens)" if skipped.get("oversize") else "")
        raise ConfigError(f"corpus {corpus} has no documents to {what}{too_long}")
    return documents, skipped
