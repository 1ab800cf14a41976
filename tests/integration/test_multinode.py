"""A real two-node Ray cluster on this machine (``ray.cluster_utils.Cluster``: two raylets, one CPU each).

A local output (or shard set) on a cluster of more than one node is each node's own disk, so it is
refused before any work, in one line naming the path, the node count and the fix; with
``shared_filesystem: true`` (both "nodes" here do share this machine's disk) the capture runs, its
actors spread over both nodes, and the set verifies.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import pytest
import yaml
from support import assert_one_error_line

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_nodes():
    """The cluster, and the environment a command that joins it runs with."""
    from ray.cluster_utils import Cluster

    temp = tempfile.mkdtemp(prefix="rd2n-", dir="/tmp")  # short: Ray's socket paths live under it
    previous = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = temp  # Ray records this cluster there, never in the /tmp/ray others use
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        yield cluster.address, env
    finally:
        cluster.shutdown()
        if previous is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = previous
        shutil.rmtree(temp, ignore_errors=True)


def _run(env, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "raydistill", *args], env=env, text=True, capture_output=True,
                          timeout=timeout)


def _capture_config(tmp_path, teacher: str, corpus: str, **extra) -> tuple[str, str]:
    out = str(tmp_path / "shards")
    path = tmp_path / "capture.yaml"
    path.write_text(yaml.safe_dump(dict(
        teacher=teacher, output=out, corpus={"source": corpus, "split": "all"}, mode="topk", k=16, max_length=64,
        unit_bytes=3500, num_actors=2, batch_tokens=512, **extra)))
    return str(path), out


def test_a_local_output_on_two_nodes_is_refused_before_any_work(two_nodes, tiny_teacher, tiny_corpus, tmp_path):
    address, env = two_nodes
    config, out = _capture_config(tmp_path, tiny_teacher, tiny_corpus)
    run = _run(env, "capture", config, "--address", address)
    assert_one_error_line(run.returncode, run.stderr, f"output '{out}' is a local path", "has 2 nodes",
                          "object store URL", "shared_filesystem: true")
    assert not os.path.exists(out)  # nothing written: no plan, no lock, no folder


def test_a_local_shard_set_on_two_nodes_is_refused_for_training(two_nodes, tmp_path):
    address, env = two_nodes
    config = tmp_path / "train.yaml"
    shards, out = str(tmp_path / "shards"), str(tmp_path / "student")
    config.write_text(yaml.safe_dump({"shards": shards, "output": out}))
    run = _run(env, "train", str(config), "--address", address)
    assert_one_error_line(run.returncode, run.stderr, f"shards '{shards}' is a local path", "has 2 nodes")
    assert not os.path.exists(out)


def test_with_shared_filesystem_the_capture_runs_on_both_nodes(two_nodes, tiny_teacher, tiny_corpus, tmp_path):
    address, env = two_nodes
    config, out = _capture_config(tmp_path, tiny_teacher, tiny_corpus, shared_filesystem=True)
    run = _run(env, "capture", config, "--address", address, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    verify = _run(env, "verify", out, timeout=120)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    import json

    stats = json.load(open(os.path.join(out, "manifest.json")))["stats"]
    assert stats["actor.0.units"] > 0 and stats["actor.1.units"] > 0  # one actor per one-CPU node
