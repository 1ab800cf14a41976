"""The actor pool's pure pieces: sizing from cluster resources, busy time of overlapping calls, unit order."""

from __future__ import annotations

import pytest

from raydistill.config import CaptureConfig
from raydistill.errors import ConfigError
from raydistill.runtime.pool import ActorTally, covered_seconds, largest_first, resolve_num_actors


def test_num_actors_auto_follows_the_clusters_resources():
    def cfg(**kw) -> CaptureConfig:
        return CaptureConfig(teacher="t", output="o", num_actors="auto", **kw)

    assert resolve_num_actors(cfg(), {"CPU": 16.0}) == 15  # one core left for the driver
    assert resolve_num_actors(cfg(threads_per_actor=4), {"CPU": 16.0}) == 3
    assert resolve_num_actors(cfg(), {"CPU": 1.0}) == 1
    assert resolve_num_actors(cfg(num_gpus_per_actor=1), {"CPU": 64.0, "GPU": 8.0}) == 8
    assert resolve_num_actors(cfg(num_gpus_per_actor=0.1), {"CPU": 64.0, "GPU": 1.0}) == 10
    assert resolve_num_actors(cfg(num_gpus_per_actor=2), {"CPU": 64.0, "GPU": 8.0}) == 4
    assert resolve_num_actors(cfg(num_gpus_per_actor=1, threads_per_actor=8), {"CPU": 32.0, "GPU": 8.0}) == 4
    with pytest.raises(ConfigError, match="needs GPUs, but the cluster has 0"):
        resolve_num_actors(cfg(num_gpus_per_actor=1), {"CPU": 8.0})
    assert resolve_num_actors(CaptureConfig(teacher="t", output="o", num_actors=3), {"CPU": 64.0}) == 3
    with pytest.raises(ValueError, match="whole number >= 1 or 'auto'"):
        CaptureConfig(teacher="t", output="o", num_actors=0)

def test_busy_seconds_count_overlapping_calls_once():
    assert covered_seconds([]) == 0
    assert covered_seconds([(0.0, 2.0), (1.0, 3.0)]) == pytest.approx(3.0)  # two calls in flight
    assert covered_seconds([(5.0, 6.0), (0.0, 1.0), (0.5, 0.7)]) == pytest.approx(2.0)
    tally = ActorTally()
    tally.add(tokens=100, seconds=2.0, returned_at=12.0)
    tally.add(tokens=50, seconds=2.0, returned_at=13.0)
    assert (tally.units, tally.tokens, tally.busy_seconds) == (2, 150, pytest.approx(3.0))

def test_units_run_largest_first():
    """The driver hands out big units first, so a run does not end with one actor on a big unit."""
    from raydistill.contracts.plan import make_plan
    from raydistill.io.slices import Slice

    sizes = [10, 500, 40, 500, 5]
    slices = [Slice("c.jsonl", "jsonl", "bytes", sum(sizes[:i]), sum(sizes[: i + 1]), "size=1055", n)
              for i, n in enumerate(sizes)]
    plan = make_plan(slices, corpus="t", settings={})
    assert [u.unit for u in largest_first(plan.units)] == [1, 3, 2, 0, 4]
