"""Before a stage works: its workers' paths against the cluster's nodes (runtime/cluster.check_paths_shared),
then its output held (runtime/guard.guarded_stage). No Ray here: node counts are given."""

from __future__ import annotations

import os
import socket
import sys

import pytest

from raydistill.config import CaptureConfig, TrainConfig
from raydistill.errors import RaydistillError
from raydistill.io.lock import LOCK_NAME
from raydistill.runtime import cluster, guard
from raydistill.runtime.cluster import check_cluster_paths, check_paths_shared
from raydistill.runtime.guard import guarded_stage, worker_path_values


@pytest.mark.parametrize("path", ["/data/shards", "relative/shards", "file:///data/shards"])
def test_a_local_path_on_a_multi_node_cluster_is_one_line_naming_path_nodes_and_fix(path):
    with pytest.raises(RaydistillError) as err:
        check_paths_shared({"output": path}, False, nodes=3)
    message = str(err.value)
    assert "\n" not in message
    for needle in (f"output '{path}'", "3 nodes", "s3://", "shared_filesystem: true"):
        assert needle in message, (needle, message)


def test_what_a_multi_node_cluster_accepts():
    check_paths_shared({"output": "/data/shards", "shards": "relative"}, False, nodes=1)  # one node: its disk
    check_paths_shared({"output": "s3://bucket/shards", "corpus.source": "gs://b/c/*.jsonl"}, False, nodes=4)
    check_paths_shared({"output": "/nfs/shards"}, True, nodes=4)  # the user says every node mounts it
    with pytest.raises(RaydistillError, match="in-memory storage"):
        check_paths_shared({"output": "memory://shards"}, True, nodes=2)  # one process's memory, never shared


def test_the_message_keeps_no_credentials():
    with pytest.raises(RaydistillError) as err:
        check_paths_shared({"output": "memory://user:s3cret@x/shards?token=abc"}, False, nodes=2)
    assert "s3cret" not in str(err.value) and "abc" not in str(err.value)


def test_the_paths_each_stage_checks():
    train = TrainConfig(corpus={"source": "/data/refined.jsonl", "selection": "s3://b/select"}, loss="ce",
                        tokenizer="tok", output="out", storage_path="/ckpt")
    fields = ("shards", "corpus.source", "corpus.selection", "output", "storage_path")
    assert worker_path_values(train, fields) == {"corpus.source": "/data/refined.jsonl",
                                                 "corpus.selection": "s3://b/select", "output": "out",
                                                 "storage_path": "/ckpt"}
    capture = CaptureConfig(teacher="t", output="shards")  # the default corpus is no path
    assert worker_path_values(capture, ("corpus.source", "output")) == {"output": "shards"}


def _no_ray(*args, **kwargs):
    raise AssertionError("Ray was started or joined")


def test_no_ray_is_started_just_to_count_the_nodes_of_a_private_one(monkeypatch, tmp_path):
    monkeypatch.setattr(cluster, "init_ray", _no_ray)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))  # no `ray start` cluster recorded here
    check_cluster_paths({"output": "/local"}, False, None)
    (tmp_path / "ray").mkdir()
    with socket.socket() as sock:  # a recorded cluster that is gone: nothing to join
        sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]
    (tmp_path / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{dead}")
    check_cluster_paths({"output": "/local"}, False, None)


def test_a_ray_start_cluster_that_ray_init_would_join_is_joined_and_counted(monkeypatch, tmp_path):
    joined, checked = [], []
    monkeypatch.setitem(sys.modules, "ray", None)  # as in a fresh process: earlier tests may have started Ray here
    monkeypatch.setattr(cluster, "init_ray", joined.append)
    monkeypatch.setattr(cluster, "check_paths_shared", lambda paths, shared: checked.append((paths, shared)))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    (tmp_path / "ray").mkdir()
    with socket.socket() as head:
        head.bind(("127.0.0.1", 0))
        head.listen()
        (tmp_path / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{head.getsockname()[1]}")
        check_cluster_paths({"output": "/local"}, True, None)
    assert joined == [None] and checked == [({"output": "/local"}, True)]


class _Cfg:
    shared_filesystem = False

    def __init__(self, output: str):
        self.output = output


def test_the_guard_checks_first_then_holds_the_output_for_the_stage(monkeypatch, tmp_path):
    out = tmp_path / "out"
    seen = []

    @guarded_stage("capture", worker_paths=("output",))
    def stage(cfg, *, address=None, progress=True):
        seen.append((address, progress, os.path.exists(os.path.join(cfg.output, LOCK_NAME))))
        return "done"

    monkeypatch.setattr(guard, "check_cluster_paths", lambda paths, shared, address: seen.append(paths))
    assert stage(_Cfg(str(out)), address="auto", progress=False) == "done"
    assert seen == [{"output": str(out)}, ("auto", False, True)]
    assert not out.exists()  # the stage wrote nothing: the lock took away the folder it made

    def refuse(paths, shared, address):
        raise RaydistillError("refused")

    monkeypatch.setattr(guard, "check_cluster_paths", refuse)
    with pytest.raises(RaydistillError, match="refused"):
        stage(_Cfg(str(out)))
    assert not out.exists() and len(seen) == 2  # refused before the lock and the stage
