"""`raydistill sweep`: a real ladder of DeepSpeed students from one shard set, with baselines.

The sparse-KD and CE runs train from a shard set whose teacher is not on disk; a second call
adds the online-KD run, reuses every finished run, and evaluates everything with the teacher.
"""

from __future__ import annotations

import csv
import json
import os
import shutil

import pytest

from raydistill.config import SweepConfig
from raydistill.contracts.shards.manifest import MANIFEST_NAME
from raydistill.errors import ConfigError
from raydistill.io import storage
from raydistill.recipes.sweep import run_sweep

# one worker a run, two runs side by side (max_parallel 2 on the 4-CPU test cluster, each a Ray task): the
# sweep's own paths; multi-worker DeepSpeed is test_train's
TRAIN = {"seq_len": 32, "micro_batch_size": 2, "steps": 4, "warmup_steps": 1, "log_every": 2, "num_workers": 1,
         "zero_stage": 1, "lr": 0.003}


def test_sweep_trains_evaluates_and_resumes(captured, tiny_teacher, ray_session, tmp_path):
    shards = str(tmp_path / "shards")
    shutil.copytree(captured, shards)
    manifest = json.loads(storage.read_text(storage.join(shards, MANIFEST_NAME)))
    manifest["teacher"]["name_or_path"] = str(tmp_path / "no-teacher-here")  # sparse runs must not need it
    storage.atomic_write_text(storage.join(shards, MANIFEST_NAME), json.dumps(manifest))
    out = str(tmp_path / "sweep")
    base = dict(shards=shards, output=out, sizes=["micro", "tiny"], seeds=[0, 1], train=TRAIN)

    first = run_sweep(SweepConfig(**base, online_kd_sizes=[]), log=lambda *_: None)
    assert {r["run"] for r in first["rows"]} == {"micro-kd-s0", "micro-ce-s0", "micro-kd-s1", "micro-ce-s1",
                                                 "tiny-kd-s0", "tiny-ce-s0"}  # no teacher row: it is absent
    assert all(r["agreement"] is None for r in first["rows"])
    summaries = {r: os.stat(os.path.join(out, "runs", r, "summary.json")).st_mtime_ns
                 for r in ("micro-kd-s0", "tiny-ce-s0")}

    with pytest.raises(ConfigError, match="online KD needs the teacher"):
        run_sweep(SweepConfig(**base, online_kd_sizes=["micro"]), log=lambda *_: None)
    teacher = str(tmp_path / "teacher")
    shutil.copytree(tiny_teacher, teacher)
    second = run_sweep(SweepConfig(**base, online_kd_sizes=["micro"], teacher=teacher), log=lambda *_: None)
    for run, mtime in summaries.items():  # finished runs are reused, not retrained
        assert os.stat(os.path.join(out, "runs", run, "summary.json")).st_mtime_ns == mtime
    rows = {r["run"]: r for r in second["rows"]}
    assert set(rows) == {"teacher", "micro-online_kd-s0", "micro-online_kd-s1", *(r["run"] for r in first["rows"])}
    assert rows["teacher"]["agreement"] == 1.0
    for r in rows.values():
        assert r["loss"] > 0 and 0 <= r["agreement"] <= 1 and 0 <= r["ece"] <= 1
    assert rows["micro-online_kd-s0"]["tokens"] == rows["micro-kd-s0"]["tokens"]  # same token budget
    online_summary = json.loads(open(os.path.join(out, "runs", "micro-online_kd-s0", "summary.json")).read())
    assert online_summary["config"]["online_teacher"] == teacher
    assert json.loads(open(os.path.join(out, "runs", "micro-kd-s0", "summary.json")).read())["config"][
        "online_teacher"] is None

    head = second["headline"]
    assert head["teacher_passes"] == 1 and len(head["sizes"]) == 2 and head["sizes"][0] < head["sizes"][1]
    assert isinstance(head["kd_beats_ce_all_sizes"], bool) and "retention_vs_online_kd" in head
    cost = second["teacher_cost"]
    assert cost["online_kd_teacher_tokens"] == 3 * rows["micro-kd-s0"]["tokens"]  # 3 sparse-KD runs
    assert cost["capture_teacher_flops"] == 2.0 * rows["teacher"]["params"] * cost["capture_tokens"]
    table = list(csv.DictReader(open(os.path.join(out, "results.csv"))))
    assert len(table) == len(rows)
    text = open(os.path.join(out, "results.md")).read()
    assert "| micro-online_kd-s0 | dense online KD |" in text and "Teacher cost" in text
    for png in ("loss_vs_params.png", "training_curves.png"):
        assert open(os.path.join(out, png), "rb").read(8) == b"\x89PNG\r\n\x1a\n"

def test_shard_set_identity_ignores_when_and_how_fast(captured, tmp_path):
    """A capture rerun that finds nothing to do rewrites the manifest's time and stats only: finished
    students stay valid. Another shard checksum (a re-capture) makes them stale."""
    from raydistill.contracts.shards.manifest import shard_set_identity

    shards = str(tmp_path / "set")
    shutil.copytree(captured, shards)
    url = storage.join(shards, MANIFEST_NAME)
    before = shard_set_identity(shards)
    manifest = json.loads(storage.read_text(url))
    storage.atomic_write_text(url, json.dumps({**manifest, "created_at": "2030-01-01T00:00:00+00:00",
                                               "stats": {"tokens_per_s_this_run": 1.0}}, indent=3))
    assert shard_set_identity(shards) == before
    manifest["shards"][0]["sha256"] = "0" * 64
    storage.atomic_write_text(url, json.dumps(manifest))
    assert shard_set_identity(shards) != before
