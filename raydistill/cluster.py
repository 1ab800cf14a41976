"""Connecting to Ray: a local single-node cluster by default, an existing one on request.

- no address and no ``RAY_ADDRESS``: start a local Ray (laptop / single box mode);
- ``--address auto`` / ``ray://host:10001`` / ``host:6379`` or ``RAY_ADDRESS``: join that cluster
  (inside ``ray job submit`` jobs Ray sets ``RAY_ADDRESS`` for us);
- a wrong address fails fast with one line, not a hang or a traceback.
"""

from __future__ import annotations

import logging
import os

from raydistill.errors import RaydistillError

log = logging.getLogger(__name__)


def worker_env() -> dict[str, str]:
    """Environment every Ray worker of ours needs (DeepSpeed picks its accelerator at import)."""
    env = {"TOKENIZERS_PARALLELISM": "false"}
    if "DS_ACCELERATOR" in os.environ:
        env["DS_ACCELERATOR"] = os.environ["DS_ACCELERATOR"]
    return env


def init_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Start or join Ray once per process; a no-op if Ray is already initialized."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    runtime_env = {"env_vars": worker_env()}
    if address is None:
        ray.init(num_cpus=num_cpus, runtime_env=runtime_env, dashboard_host="127.0.0.1",
                 logging_level=logging.WARNING, log_to_driver=True)
        return
    try:
        # joining a cluster (e.g. inside `ray job submit`): the job's own runtime_env applies, and
        # adding ours would clash with any variable it also sets
        ray.init(address=address, logging_level=logging.WARNING)
    except (ConnectionError, TimeoutError, ValueError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RaydistillError(
            f"cannot connect to a Ray cluster at '{address}' ({first}); start one with "
            "`ray start --head`, check the address, or leave --address/RAY_ADDRESS unset to run locally"
        ) from None


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0
