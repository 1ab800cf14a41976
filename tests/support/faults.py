"""Faults on storage, injected into real runs: a local filesystem that fails a chosen write part-way.

``faulty:///abs/dir`` names the same files as ``/abs/dir``, through :class:`FaultyFileSystem`, a
``LocalFileSystem`` whose writes obey a *fault plan*: a JSON file named by the environment variable
``RAYDISTILL_TEST_FAULTS``, e.g. ``{"match": "/shards/unit-", "nth": 3, "after_bytes": 1000,
"errno": "EIO"}``: the 3rd file opened for writing whose path contains ``match`` takes
``after_bytes`` bytes and then raises ``OSError(EIO)`` (``ENOSPC`` for a full disk). Writes are
counted across processes (a counter file next to the plan, under ``flock``), because the writers
are Ray actors in their own processes; every fault that fires appends one JSON line to
``<plan>.log``, so a test can wait for it and check it happened.

How the fault reaches the actors: fsspec finds a protocol in a per-process registry, and the
actors are Ray worker processes, so :func:`register` must run in each of them. ``python -m
support.faults CONFIG`` (what the tests run as the faulted driver) starts its own local Ray
with ``runtime_env={"worker_process_setup_hook": "support.faults.register"}``: Ray imports this
module and calls :func:`register` in every worker process before it runs any task or actor
(``tests/`` is on the workers' ``PYTHONPATH``, inherited from the driver through the raylet).
Then it runs ``raydistill capture CONFIG`` in-process, as the CLI would. The normal rerun that
follows is the plain command on the plain local path: no fault, no special filesystem.

The same driver can put the object store under pressure (``--object-store-mb``, ``--fill-mb``):
a Ray with a small object store, filled with pinned objects until Ray spills them to disk, before
the capture starts.
"""

from __future__ import annotations

import argparse
import errno as errno_codes
import fcntl
import json
import os
import sys

import fsspec
from fsspec.implementations.local import LocalFileSystem

__all__ = ["FAULTS_ENV", "PROTOCOL", "FaultyFileSystem", "arm", "fired", "register"]

PROTOCOL = "faulty"
FAULTS_ENV = "RAYDISTILL_TEST_FAULTS"


def _plan() -> tuple[str, dict] | None:
    path = os.environ.get(FAULTS_ENV)
    if not path or not os.path.exists(path):
        return None
    with open(path) as f:
        return path, json.load(f)


def _next_count(plan_path: str) -> int:
    """This write's number among the matching writes of every process (1, 2, ...)."""
    with open(plan_path + ".count", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        count = int(f.read() or 0) + 1
        f.seek(0)
        f.truncate()
        f.write(str(count))
        f.flush()
        return count  # the lock goes with the file


class _FailingFile:
    """A file open for writing that takes ``budget`` bytes, then raises ``OSError(code)``."""

    def __init__(self, inner, budget: int, code: int, log_path: str, path: str):
        self._inner, self._budget, self._code = inner, budget, code
        self._log_path, self._path, self._written = log_path, path, 0

    def write(self, data) -> int:
        room = self._budget - self._written
        if len(data) <= room:
            self._written += len(data)
            return self._inner.write(data)
        if room > 0:
            self._inner.write(data[:room])
            self._written += room
        self._inner.flush()
        with open(self._log_path, "a") as log:
            log.write(json.dumps({"path": self._path, "pid": os.getpid(), "written": self._written,
                                  "errno": errno_codes.errorcode[self._code]}) + "\n")
        raise OSError(self._code, f"{os.strerror(self._code)} (injected after {self._written} bytes)", self._path)

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._inner.close()


class FaultyFileSystem(LocalFileSystem):
    """The local disk, where the write a fault plan names fails part-way (see the module docstring)."""

    # "file" first: raydistill takes it for the local disk it is (the same code paths: lock, directories,
    # output checks); "faulty" is stripped from URLs like "file"
    protocol = ("file", PROTOCOL)

    def _open(self, path, mode="rb", block_size=None, **kwargs):
        f = super()._open(path, mode, block_size=block_size, **kwargs)
        if not any(c in mode for c in "wxa"):
            return f
        found = _plan()
        if found is None:
            return f
        plan_path, plan = found
        local = self._strip_protocol(path)
        if plan.get("match", "") not in local or _next_count(plan_path) != int(plan.get("nth", 1)):
            return f
        code = getattr(errno_codes, plan.get("errno", "EIO"))
        return _FailingFile(f, int(plan.get("after_bytes", 0)), code, plan_path + ".log", local)


def register() -> None:
    """Make ``faulty://`` known to fsspec in this process (Ray's worker_process_setup_hook calls it)."""
    fsspec.register_implementation(PROTOCOL, FaultyFileSystem, clobber=True)


def arm(plan_path: str, *, match: str, nth: int = 1, after_bytes: int = 0, errno: str = "EIO") -> str:
    """Write a fault plan; point ``RAYDISTILL_TEST_FAULTS`` at the path returned."""
    with open(plan_path, "w") as f:
        json.dump({"match": match, "nth": nth, "after_bytes": after_bytes, "errno": errno}, f)
    return plan_path


def fired(plan_path: str) -> list[dict]:
    """The faults that fired under this plan, one dict each (path, pid, written, errno)."""
    if not os.path.exists(plan_path + ".log"):
        return []
    with open(plan_path + ".log") as f:
        return [json.loads(line) for line in f if line.strip()]


def _fill_object_store(fill_mb: int) -> dict:
    """Put ``fill_mb`` MiB of objects in the store and keep them referenced (pinned); Ray spills what
    does not fit. Returns the refs (kept alive by the caller) and how much was spilled."""
    import numpy as np
    import ray

    refs = [ray.put(np.full(8 << 20, i, dtype=np.uint8)) for i in range(max(1, fill_mb // 8))]
    from ray._private.internal_api import memory_summary

    # this driver's own cluster: others (the test process's Ray) may run on the same machine
    return {"refs": refs, "summary": memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)}


def main(argv: list[str] | None = None) -> None:
    """``python -m support.faults CONFIG [--object-store-mb N --fill-mb M] [raydistill capture options]``."""
    p = argparse.ArgumentParser(description="raydistill capture on a local Ray whose workers know faulty://")
    p.add_argument("config")
    p.add_argument("--object-store-mb", type=int, default=None)
    p.add_argument("--fill-mb", type=int, default=0)
    p.add_argument("--num-cpus", type=int, default=3)
    args, rest = p.parse_known_args(argv)
    register()
    import ray

    from raydistill.runtime.cluster import worker_env

    tests_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [tests_dir, os.environ.get("PYTHONPATH")]))
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, logging_level="ERROR",
             _node_ip_address="127.0.0.1", log_to_driver=False,
             object_store_memory=args.object_store_mb << 20 if args.object_store_mb else None,
             runtime_env={"worker_process_setup_hook": "support.faults.register", "env_vars": worker_env()})
    held = _fill_object_store(args.fill_mb) if args.fill_mb else None
    if held is not None:
        print("object store: " + " ".join(held["summary"].split()), file=sys.stderr, flush=True)
    from raydistill.cli import main as cli

    cli(["capture", args.config, *rest])


if __name__ == "__main__":
    main()
