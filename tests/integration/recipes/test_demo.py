"""`raydistill demo` end to end at toy scale: teacher -> capture -> KD and CE students -> eval -> table + plot."""

from __future__ import annotations

import csv
import json
import os

from transformers import AutoModelForCausalLM

from raydistill.config import DemoConfig
from raydistill.contracts.shards.manifest import read_manifest
from raydistill.recipes.demo import run_demo


def test_demo_runs_every_stage_and_reuses_them(tmp_path, ray_session):
    cfg = DemoConfig(workdir=str(tmp_path / "demo"), teacher_steps=3, steps=4, student_sizes=["micro"],
                     online_kd_sizes=["micro"], max_documents=10, k=16, reference_steps=3)
    results = run_demo(cfg)
    assert [r["kind"] for r in results] == ["teacher", "kd", "ce", "online_kd"]
    with open(tmp_path / "demo" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == ["teacher", "micro-kd-s0", "micro-ce-s0", "micro-online_kd-s0"]
    assert all(float(r["loss"]) > 0 and 0 <= float(r["agreement"]) <= 1 for r in rows)
    assert (tmp_path / "demo" / "loss_vs_params.png").stat().st_size > 10_000
    manifest = read_manifest(str(tmp_path / "demo" / "shards"))
    assert manifest.sparsify.mode == "sampled" and manifest.sparsify.draws == 32  # the demo's capture
    for r in rows[1:]:
        AutoModelForCausalLM.from_pretrained(tmp_path / "demo" / "runs" / r["run"] / "model")  # plain HF dirs
    summary = tmp_path / "demo" / "runs" / "micro-kd-s0" / "summary.json"
    mtime = os.stat(summary).st_mtime_ns
    report = json.loads((tmp_path / "demo" / "select" / "report.json").read_text())  # the MiniPLM stage
    assert report["documents"] == 10 and report["kept_documents"] == 5 and report["units_this_run"] == 1
    refined = sorted((tmp_path / "demo" / "select" / "refined").glob("part-*.jsonl"))
    assert refined and sum(len(p.read_text().splitlines()) for p in refined) == 5
    assert (tmp_path / "demo" / "reference" / "config.json").exists()
    again = run_demo(cfg)  # every stage is reused: same numbers, no retraining
    assert [r["loss"] for r in again] == [r["loss"] for r in results]
    assert os.stat(summary).st_mtime_ns == mtime
    assert json.loads((tmp_path / "demo" / "select" / "report.json").read_text())["units_this_run"] == 0
