"""`raydistill demo` as a newcomer runs it: a real process, beside another Ray instance on the machine.

What it must print is the demo's own stages, bars and tables: no Ray worker log lines, no
DeepSpeed or Python warnings, no per-model "Loading weights" bars (``--verbose`` brings those
back). And the local Ray it starts must be the one its workers talk to, even when another Ray
runs on the same machine (Ray Train's placement-group cleaner looks the cluster up by itself).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from support import free_port, wait_for

TINY_DEMO = ["--set", "teacher_steps=3", "--set", "steps=4", "--set", "student_sizes=[micro]",
             "--set", "online_kd_sizes=[micro]", "--set", "max_documents=10", "--set", "k=16",
             "--set", "reference_steps=3"]
LIBRARY_NOISE = re.compile(r"pid=\d+|Loading weights|\[WARNING\]|FutureWarning|UserWarning|Traceback|"
                           r"Found multiple active Ray instances")


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def _clean_env() -> dict[str, str]:
    """The environment of a newcomer's shell: none of the variables the test session sets for itself."""
    return {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "DS_ACCELERATOR")}


@pytest.mark.extended  # test_demo runs every stage of the demo in CI; this one adds the CLI's output and a second Ray
def test_demo_is_quiet_and_finds_its_own_ray_beside_another(tmp_path):
    port = free_port()
    other_dir = tempfile.mkdtemp(prefix="rd-other-ray-", dir="/tmp")  # short: Ray's socket paths have a limit
    ray_cli = str(Path(sys.executable).parent / "ray")
    other = subprocess.Popen([ray_cli, "start", "--head", f"--port={port}", "--num-cpus=1", "--block",
                              "--include-dashboard=false", f"--temp-dir={other_dir}"],
                             start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env=_clean_env())
    try:
        wait_for(lambda: _listening(port), timeout=180, what="the other Ray head")
        run = subprocess.run([sys.executable, "-m", "raydistill", "demo", "--workdir", str(tmp_path / "demo"),
                              *TINY_DEMO], capture_output=True, text=True, timeout=1800, env=_clean_env())
    finally:
        os.killpg(other.pid, signal.SIGTERM)
        try:
            other.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(other.pid, signal.SIGKILL)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-4000:]
    for stage in ("1/5 teacher", "2/5 capture", "3/5 students", "5/5 select", "demo finished"):
        assert stage in out
    noise = [line for line in out.replace("\r", "\n").splitlines() if LIBRARY_NOISE.search(line)]
    assert noise == []
