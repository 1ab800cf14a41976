"""The CLI on a real captured shard set: verify, inspect, and the entry point as a real process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from support import run_cli, write_config


def test_verify_names_a_corrupted_shard(capsys, captured, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(captured, copy)
    code, out, _ = run_cli(capsys, "verify", str(copy))
    assert code == 0 and "verify: OK" in out
    victim = sorted((copy / "shards").iterdir())[1]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    code, out, err = run_cli(capsys, "verify", str(copy))
    assert code == 1
    assert victim.name in out and "problem" in err

def test_inspect_summarises(capsys, captured):
    code, out, _ = run_cli(capsys, "inspect", captured)
    assert code == 0
    assert '"k": 16' in out and "bytes_per_token" in out

def test_entry_point_in_a_real_process(tmp_path):
    """The installed console script: an unknown key fails with one line and exit 2."""
    cfg = write_config(tmp_path, teacher="x", output="y", bogus=1)
    exe = shutil.which("raydistill") or os.path.join(os.path.dirname(sys.executable), "raydistill")
    proc = subprocess.run([exe, "precompute", cfg], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: invalid config") and "Traceback" not in proc.stderr
