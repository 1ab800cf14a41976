"""`raydistill demo` end to end at toy scale: teacher -> capture -> KD and CE students -> eval -> table + plot."""

from __future__ import annotations

import csv
import os

from transformers import AutoModelForCausalLM

from raydistill.config import DemoConfig
from raydistill.demo import run_demo


def test_demo_runs_every_stage_and_reuses_them(tmp_path, ray_session):
    cfg = DemoConfig(workdir=str(tmp_path / "demo"), teacher_steps=3, steps=4, student_sizes=["micro"],
                     ce_baseline_sizes=["micro"], max_documents=10, k=16)
    results = run_demo(cfg)
    assert [r["kind"] for r in results] == ["teacher", "kd", "ce"]
    with open(tmp_path / "demo" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["model"] for r in rows] == ["teacher", "micro KD", "micro CE"]
    assert all(float(r["loss"]) > 0 for r in rows)
    assert (tmp_path / "demo" / "results.png").stat().st_size > 10_000
    for r in results[1:]:
        AutoModelForCausalLM.from_pretrained(r["dir"])  # plain HF directories
    summary = tmp_path / "demo" / "students" / "micro-kd" / "summary.json"
    mtime = os.stat(summary).st_mtime_ns
    again = run_demo(cfg)  # every stage is reused: same numbers, no retraining
    assert [r["loss"] for r in again] == [r["loss"] for r in results]
    assert os.stat(summary).st_mtime_ns == mtime
