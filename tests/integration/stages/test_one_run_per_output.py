"""One capture per output at a time: two real `raydistill capture` processes started at once on one output.

One of them holds the output (``io.lock``); the other is refused in one line that names the holder (or,
had it started after the first had finished, would resume a finished capture). Either way the set
verifies, with every unit exactly once.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import yaml
from support import assert_one_error_line

from raydistill.contracts.shards.manifest import read_manifest
from raydistill.io.lock import LOCK_NAME


def test_two_captures_started_at_once_on_one_output_never_mix(tiny_teacher, tiny_corpus, tmp_path):
    out = tmp_path / "shards"
    config = tmp_path / "capture.yaml"
    config.write_text(yaml.safe_dump(dict(
        teacher=tiny_teacher, output=str(out), corpus={"source": tiny_corpus, "split": "all"}, mode="topk", k=16,
        max_length=64, unit_bytes=3500, num_actors=1, batch_tokens=512)))
    env = {**os.environ, "RAY_ADDRESS": ""}  # each its own local Ray, like two users' shells
    cmd = [sys.executable, "-m", "raydistill", "capture", str(config)]
    procs = [subprocess.Popen(cmd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(2)]
    results = [(p.pid, *p.communicate(timeout=600), p.returncode) for p in procs]  # both ended
    finished = [r for r in results if r[3] == 0]
    refused = [r for r in results if r[3] != 0]
    assert finished, [r[2][-2000:] for r in results]
    for _, _, err, code in refused:  # named the holder: its pid, this host, when it started
        assert_one_error_line(code, err, "is in use: capture by pid", f"pid {finished[0][0]}",
                              f"on host {socket.gethostname()}", "started 20", f"delete {out / LOCK_NAME}")
    assert len(refused) == 1  # started at once, the second found the first holding the output

    verify = subprocess.run([sys.executable, "-m", "raydistill", "verify", str(out)], env=env, text=True,
                            capture_output=True, timeout=120)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    manifest = read_manifest(str(out))
    units = [s.unit for s in manifest.shards]
    assert units == list(range(manifest.plan.num_units))  # every unit exactly once
    assert sorted(os.listdir(out / "done")) == [f"unit-{u:06d}.json" for u in units]
    assert sorted(os.listdir(out / "shards")) == sorted(os.path.basename(s.path) for s in manifest.shards)
    assert not (out / LOCK_NAME).exists()
    assert json.loads(finished[0][1].strip().splitlines()[-1])["units"] == len(units)
