"""Work the cluster can never place is refused before it starts, and a local Ray that cannot start is one line.

Before issue #19, ``num_gpus_per_actor: 1`` on a CPU-only machine left the actors pending forever
(only autoscaler messages to show for it), and a failing ``ray.init`` (a temp dir under a file) was a
traceback after the plan had been written.
"""

from __future__ import annotations

import logging

import pytest

from raydistill.config import CaptureConfig
from raydistill.errors import ConfigError, RaydistillError
from raydistill.runtime.pool import check_pool_fits


def _cfg(**kw) -> CaptureConfig:
    return CaptureConfig(teacher="t", output="o", **kw)


@pytest.mark.parametrize(("settings", "resources", "needles"), [
    ({"num_gpus_per_actor": 1}, {"CPU": 8.0}, ("num_gpus_per_actor=1 but the cluster has 0 GPUs",
                                               "set num_gpus_per_actor: 0 to run on CPUs")),
    ({"num_gpus_per_actor": 2, "num_actors": 1}, {"CPU": 8.0, "GPU": 1.0}, ("num_gpus_per_actor=2", "<= 1")),
    ({"threads_per_actor": 16}, {"CPU": 8.0}, ("threads_per_actor=16 but the cluster has 8 CPUs", "<= 8")),
    ({"num_actors": 9}, {"CPU": 8.0}, ("num_actors=9 x threads_per_actor=1 needs 9 CPUs", "num_actors <= 8")),
    ({"num_actors": 3, "num_gpus_per_actor": 1}, {"CPU": 8.0, "GPU": 2.0}, ("needs 3 GPUs", "num_actors <= 2")),
])
def test_actors_beyond_a_fixed_cluster_are_refused(settings, resources, needles):
    with pytest.raises(ConfigError) as err:
        check_pool_fits(_cfg(**settings), resources, fixed=True)
    for needle in needles:
        assert needle in str(err.value)


def test_actors_that_fit_pass_and_a_cluster_that_may_grow_only_warns(caplog):
    check_pool_fits(_cfg(num_actors=2), {"CPU": 2.0}, fixed=True)  # exactly full: fine
    check_pool_fits(_cfg(num_actors="auto", num_gpus_per_actor=0.5), {"CPU": 8.0, "GPU": 1.0}, fixed=True)
    check_pool_fits(_cfg(num_actors=10), {"CPU": 64.0}, fixed=True, count=2)  # the count run_units starts
    with caplog.at_level(logging.WARNING, logger="raydistill.runtime.pool"):
        check_pool_fits(_cfg(num_gpus_per_actor=1, num_actors=8), {"CPU": 4.0}, fixed=False)  # an autoscaler may add GPUs
    assert "num_gpus_per_actor=1 but the cluster has 0 GPUs" in caplog.text and "autoscaler" in caplog.text


def test_resources_ahead_of_a_local_ray_come_from_this_machine_and_a_cluster_to_join_is_left(monkeypatch):
    import ray

    from raydistill.runtime import cluster

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    resources, fixed = cluster.cluster_resources_ahead(None)
    assert fixed and resources["CPU"] >= 1 and "GPU" in resources
    monkeypatch.setattr(cluster, "check_reachable", lambda address: None)
    assert cluster.cluster_resources_ahead("10.0.0.1:6379") is None  # joined later; it may grow


def test_a_local_ray_that_fails_to_start_is_one_line(monkeypatch):
    """Whatever ray.init raises (here a PermissionError on /tmp/ray) becomes one RaydistillError naming the fix."""
    import ray

    from raydistill.runtime.cluster import init_ray

    def refuse(**kwargs):
        raise PermissionError(13, "Permission denied", "/tmp/ray/session_2026")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(RaydistillError) as err:
        init_ray(None)
    message = str(err.value)
    assert "\n" not in message and message.startswith("cannot start a local Ray")
    assert "Permission denied" in message and "RAY_TMPDIR" in message


def test_a_ray_temp_dir_under_a_file_is_refused_before_ray_init(monkeypatch, tmp_path):
    import ray

    from raydistill.runtime.cluster import check_local_ray_can_start, init_ray

    (tmp_path / "a-file").write_text("x")
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "a-file"))
    with pytest.raises(RaydistillError, match=r"lies under .*a-file', which is a file"):
        check_local_ray_can_start()
    called = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: called.append(kw))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(RaydistillError, match="cannot start a local Ray"):
        init_ray(None)
    assert called == []
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "fresh" / "dir"))  # missing but creatable: fine
    check_local_ray_can_start()


def test_train_workers_beyond_a_fixed_cluster_are_refused(monkeypatch, tmp_path):
    from raydistill.config import TrainConfig
    from raydistill.stages.train import checks

    def cfg(**kw):
        return TrainConfig(shards="s", output=str(tmp_path / "o"), **kw)

    monkeypatch.setattr(checks, "cluster_resources_ahead", lambda address: ({"CPU": 4.0}, True))
    with pytest.raises(ConfigError, match="use_gpu=true but the cluster has 0 GPUs; set use_gpu: false"):
        checks.check_train_inputs(cfg(use_gpu=True))
    with pytest.raises(ConfigError, match="num_workers=8 x threads_per_worker=1 needs 8 CPUs"):
        checks.check_train_inputs(cfg(num_workers=8))
    checks.check_train_inputs(cfg(num_workers=4))
    monkeypatch.setattr(checks, "cluster_resources_ahead", lambda address: ({"CPU": 4.0}, False))
    checks.check_train_inputs(cfg(use_gpu=True))  # a joined cluster may still grow: a warning only
