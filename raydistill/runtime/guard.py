"""What every stage that writes an output does before its own work: check that the cluster's nodes can
all see the paths its workers use (``cluster.check_cluster_paths``), then hold the output (``io.lock``).

``@guarded_stage("capture", worker_paths=("output",))`` on ``run_capture(cfg, *, address=None, ...)``:
the stage's body stays as it was, and a second command on the same output is refused with one line
naming the first (or takes the lock over from a dead one).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from raydistill.io import storage
from raydistill.io.lock import hold_output
from raydistill.runtime.cluster import check_cluster_paths

__all__ = ["guarded_stage", "worker_path_values"]

Run = TypeVar("Run", bound=Callable[..., Any])


def worker_path_values(cfg: Any, fields: tuple[str, ...]) -> dict[str, str]:
    """The set path fields of ``cfg`` by dotted name (``corpus.source``); None and ``default`` left out."""
    out = {}
    for name in fields:
        value: Any = cfg
        for part in name.split("."):
            value = getattr(value, part, None)
        if isinstance(value, str) and value != "default":
            out[name] = value
    return out


def guarded_stage(what: str, worker_paths: tuple[str, ...],
                  checks: Callable[[Any, str | None], None] | None = None) -> Callable[[Run], Run]:
    """Decorate ``run(cfg, *, address=None, ...)``: check ``cfg.output``, ``cfg``'s ``worker_paths`` against
    the cluster (``cfg.shared_filesystem``) and the stage's own ``checks(cfg, address)``, then run the stage
    holding ``cfg.output``. The checks come before the lock, which may create the output's folders: a
    refused command must find (and leave) the file system exactly as the user left it."""

    def decorate(run: Run) -> Run:
        @functools.wraps(run)
        def guarded(cfg, *args, address: str | None = None, **kwargs):
            storage.check_output(cfg.output, "output")
            check_cluster_paths(worker_path_values(cfg, worker_paths), cfg.shared_filesystem, address)
            if checks is not None:
                checks(cfg, address)
            with hold_output(cfg.output, what):
                return run(cfg, *args, address=address, **kwargs)

        return guarded  # type: ignore[return-value]

    return decorate
