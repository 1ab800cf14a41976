"""One actor pool for any unit worker: restartable Ray actors, kept busy, their work tallied.

A *unit worker* (:class:`UnitWorker`) holds its models in memory and turns one work unit into
one output file plus a completion record (``contracts.units``). The capture's ``TeacherWorker``
and the selection's ``ScoreWorker`` are both unit workers; this module knows neither.

Actor processes that die are restarted by Ray and their calls retried
(``max_restarts`` / ``max_task_retries``); each actor takes two calls at once, so one can use
the device while the other tokenizes, encodes or writes.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from tqdm import tqdm

from raydistill.config.sections import ActorPoolConfig
from raydistill.contracts.plan import Plan, WorkUnit
from raydistill.contracts.units import UnitKey
from raydistill.errors import ConfigError
from raydistill.io.slices import Slice
from raydistill.runtime.cluster import check_local_ray_can_start, cluster_resources_ahead
from raydistill.runtime.failures import error_from_ray

__all__ = ["ACTOR_MAX_RESTARTS", "ACTOR_MAX_TASK_RETRIES", "CALLS_IN_FLIGHT_PER_ACTOR", "ActorTally", "DriveResult",
           "UnitWorker", "check_pool_ahead", "check_pool_fits", "covered_seconds", "drive_units", "largest_first", "resolve_num_actors",
           "start_actors"]

log = logging.getLogger(__name__)

CALLS_IN_FLIGHT_PER_ACTOR = 2  # one on the device while the other encodes and writes
ACTOR_MAX_RESTARTS = 3  # Ray restarts a dead actor process this many times ...
ACTOR_MAX_TASK_RETRIES = 3  # ... and resubmits the calls it had in flight


class UnitWorker(Protocol):
    """What the pool drives: built once per actor from picklable settings, then one unit per call."""

    def __init__(self, settings: Any) -> None: ...

    def run_unit(self, root: str, unit: UnitKey, piece: Slice) -> dict:
        """Read slice ``piece`` of the corpus, write unit ``unit``'s output under ``root`` and mark it done;
        return at least ``{"tokens": int, "seconds": float}``."""
        ...


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


def check_pool_fits(cfg: ActorPoolConfig, resources: dict[str, float], *, fixed: bool,
                    count: int | None = None) -> None:
    """Refuse actors the cluster can never place: Ray would keep them pending, and the run would wait
    forever with only autoscaler messages to show for it.

    One actor's ``num_gpus_per_actor`` GPUs or ``threads_per_actor`` CPUs beyond the whole cluster,
    or ``count`` actors (default: ``cfg.num_actors`` when it is a number) beyond it together. Only on
    a ``fixed`` cluster (the local Ray this process started); a joined cluster may still grow, so
    there the shortfall is logged as a warning.
    """
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    count = count if count is not None else (cfg.num_actors if cfg.num_actors != "auto" else None)
    problem = None
    if cfg.num_gpus_per_actor > gpus:
        problem = (f"num_gpus_per_actor={cfg.num_gpus_per_actor:g} but the cluster has {gpus:g} GPUs; "
                   + ("set num_gpus_per_actor: 0 to run on CPUs" if gpus == 0 else
                      f"set num_gpus_per_actor <= {gpus:g}"))
    elif cfg.threads_per_actor > cpus:
        problem = (f"threads_per_actor={cfg.threads_per_actor} but the cluster has {cpus:g} CPUs; "
                   f"set threads_per_actor <= {int(cpus)}")
    elif count is not None and count * cfg.threads_per_actor > cpus:
        problem = (f"num_actors={count} x threads_per_actor={cfg.threads_per_actor} needs "
                   f"{count * cfg.threads_per_actor} CPUs but the cluster has {cpus:g}; set num_actors <= "
                   f"{int(cpus // cfg.threads_per_actor)} (or num_actors: auto)")
    elif count is not None and cfg.num_gpus_per_actor > 0 and count * cfg.num_gpus_per_actor > gpus + 1e-9:
        problem = (f"num_actors={count} x num_gpus_per_actor={cfg.num_gpus_per_actor:g} needs "
                   f"{count * cfg.num_gpus_per_actor:g} GPUs but the cluster has {gpus:g}; set num_actors <= "
                   f"{math.floor(gpus / cfg.num_gpus_per_actor + 1e-9)} (or num_actors: auto)")
    if problem is None:
        return
    if fixed:
        raise ConfigError(problem)
    log.warning("%s; waiting for the cluster to grow (an autoscaler must add nodes)", problem)


def check_pool_ahead(cfg: ActorPoolConfig, address: str | None) -> None:
    """:func:`check_pool_fits` before a stage writes anything or starts Ray: against the Ray already
    connected, or, for the local Ray ``init_ray`` will start, against this machine (and that Ray's
    temporary directory must be usable). A cluster still to join is checked once joined (``run_units``)."""
    ahead = cluster_resources_ahead(address)
    if ahead is None:
        return
    resources, fixed = ahead
    check_pool_fits(cfg, resources, fixed=fixed)
    import ray

    if fixed and not ray.is_initialized():
        check_local_ray_can_start()


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


def largest_first(todo: list[WorkUnit]) -> list[WorkUnit]:
    """Units ordered by their slices' bytes, largest first (ties by unit id): the classic
    longest-processing-time rule, so the run does not end with one actor finishing a big unit while
    the others idle."""
    return sorted(todo, key=lambda u: (-u.slice.bytes, u.unit))


def start_actors(worker_cls: type[UnitWorker], settings: Any, count: int, *, cpus: float, gpus: float) -> list:
    """``count`` Ray actors of ``worker_cls(settings)`` that Ray restarts when their process dies
    (and then resubmits the calls they had in flight), each taking two calls at once."""
    import ray

    actor_cls = ray.remote(worker_cls).options(
        num_cpus=cpus, num_gpus=gpus, max_restarts=ACTOR_MAX_RESTARTS, max_task_retries=ACTOR_MAX_TASK_RETRIES,
        max_concurrency=CALLS_IN_FLIGHT_PER_ACTOR,
    )
    return [actor_cls.remote(settings) for _ in range(count)]


def drive_units(actors: list, todo: list[WorkUnit], plan: Plan, root: str, progress: bool, *, what: str
                ) -> DriveResult:
    """Keep every actor busy with ``CALLS_IN_FLIGHT_PER_ACTOR`` units until none are left.

    Each call is ``actor.run_unit(root, the unit's key, the unit's slice)``: a few hundred bytes, no
    document text (each worker reads its own slice). The key (unit, unit hash, plan hash) goes into
    the unit's output and record. The bar counts corpus bytes done, so its rate and ETA hold from the
    first unit; ``what`` names the work in the bar and in errors.
    """
    import ray

    queue = largest_first(todo)
    units = {u.unit: u for u in todo}
    pending: dict = {}  # object ref -> (index of the actor running it, unit)
    tallies = [ActorTally() for _ in actors]
    tokens = 0
    t0 = time.perf_counter()

    def submit(index: int) -> None:
        unit = queue.pop(0)
        key = UnitKey(unit=unit.unit, unit_sha256=unit.sha256, plan_sha256=plan.sha256)
        pending[actors[index].run_unit.remote(root, key, unit.slice)] = (index, unit.unit)

    for _ in range(CALLS_IN_FLIGHT_PER_ACTOR):
        for index in range(len(actors)):
            if queue:
                submit(index)
    bar = tqdm(total=sum(u.slice.bytes for u in todo), unit="B", unit_scale=True, unit_divisor=1024, desc=what,
               disable=not progress, dynamic_ncols=True)
    done = 0
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            index, unit_id = pending.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except ray.exceptions.RayError as err:  # retries and actor restarts are used up
                raise error_from_ray(err, f"a {what} unit", "finished units are kept, run the same command "
                                     "again to resume") from err
            tallies[index].add(result["tokens"], result["seconds"], time.perf_counter())
            tokens += result["tokens"]
            done += 1
            bar.update(units[unit_id].slice.bytes)
            bar.set_postfix(units=f"{done}/{len(todo)}", tokens=tokens,
                            tok_s=f"{tokens / max(time.perf_counter() - t0, 1e-9):,.0f}")
            if queue:
                submit(index)
    finally:
        bar.close()
    return DriveResult(actors=tallies, seconds=time.perf_counter() - t0)
