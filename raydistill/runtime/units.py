"""The life of a unit stage (capture, select), written once: plan the units, then run the missing ones.

1. :func:`plan_units` reads the corpus (with any selection applied), drops oversize documents,
   cuts the plan, writes it or checks it against the one already in the output (a different
   plan is refused), deletes temporaries of killed writers and finds the units without a
   completion record;
2. :func:`run_units` joins or starts Ray, sizes the actor pool, starts the unit workers,
   drives them until every unit has returned, stops them and deletes new temporaries.

Between the two a stage does its own driver-side work (the capture's tokenizer copy and
vocabulary table); after them, its own assembly (the manifest, the ranking).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from raydistill.config.sections import ActorPoolConfig
from raydistill.contracts.plan import Plan, WorkUnit, make_plan, write_or_check_plan
from raydistill.contracts.selection import selected_documents_counted
from raydistill.contracts.units import read_completions, remove_stale_temporaries
from raydistill.errors import ConfigError
from raydistill.io import storage
from raydistill.io.corpus import Document, describe
from raydistill.models.windows import drop_oversize
from raydistill.runtime.cluster import init_ray
from raydistill.runtime.pool import DriveResult, UnitWorker, drive_units, resolve_num_actors, start_actors

__all__ = ["PlannedUnits", "plan_units", "run_units"]

log = logging.getLogger(__name__)


@dataclass
class PlannedUnits:
    """A stage's plan and where a run of it stands."""

    plan: Plan
    documents: list[Document]
    skipped: dict[str, int]  # corpus records left out, by reason (empty, undecodable, duplicate, oversize)
    todo: list[WorkUnit]  # units without a completion record
    resumed: bool  # the output already held this plan
    stale_temporaries: int


def plan_units(cfg: ActorPoolConfig, tokenizer, *, output: str, settings: dict[str, Any], what: str,
               subdirs: tuple[str, ...]) -> PlannedUnits:
    """Plan ``cfg.corpus`` into ``output``; ``settings`` (everything that changes a unit's output) go into
    the plan hash; ``subdirs`` are where the stage writes unit outputs (swept for temporaries)."""
    storage.check_output(output, "output")
    documents, skipped = selected_documents_counted(cfg.corpus)
    documents, oversize = drop_oversize(documents, tokenizer, cfg.max_document_tokens)
    if not documents:
        too_long = f" ({oversize} longer than max_document_tokens={cfg.max_document_tokens})" if oversize else ""
        raise ConfigError(f"corpus {describe(cfg.corpus)} has no documents to {what}{too_long}")
    plan = make_plan(documents, docs_per_unit=cfg.docs_per_unit, corpus=describe(cfg.corpus), settings=settings)
    resumed = write_or_check_plan(output, plan)
    stale = remove_stale_temporaries(output, subdirs)
    done = read_completions(output)
    todo = [u for u in plan.units if u.unit not in done]
    log.info("%s plan %s: %d units, %d already done%s", what, plan.sha256[:12], len(plan.units),
             len(plan.units) - len(todo), " (resuming)" if resumed else "")
    return PlannedUnits(plan=plan, documents=documents, skipped={**skipped.as_dict(), "oversize": oversize},
                        todo=todo, resumed=resumed, stale_temporaries=stale)


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
    count = min(resolve_num_actors(cfg, ray.cluster_resources()), len(planned.todo))
    actors = start_actors(worker_cls, settings, count, cpus=cfg.threads_per_actor, gpus=cfg.num_gpus_per_actor)
    try:
        drive = drive_units(actors, planned.todo, planned.plan, planned.documents, output, progress, what=what)
    finally:
        for actor in actors:
            ray.kill(actor)
    planned.stale_temporaries += remove_stale_temporaries(output, subdirs)
    return drive
