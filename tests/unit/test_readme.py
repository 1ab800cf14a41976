"""The README's two quickstart commands stay true: CI runs the test one verbatim."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository


def _bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_quickstart_has_the_two_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    quickstart = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    demo, tests = _bash_blocks(quickstart)[:2]
    assert demo.startswith("python3 -m venv .venv") and demo.endswith("raydistill demo")
    assert "torch==2.13.0" in demo and tests.endswith("pytest")
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci, "the README's test command must appear verbatim in .ci/run"


def test_every_documented_job_config_exists():
    readme = (ROOT / "README.md").read_text()
    for path in set(re.findall(r"jobs/[\w.-]+\.ya?ml", readme)):
        assert (ROOT / path).is_file(), path
