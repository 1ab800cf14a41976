"""Connecting to Ray: a local single-node cluster by default, an existing one on request.

- no address and no ``RAY_ADDRESS``: start a local Ray (laptop / single box mode);
- ``--address auto`` / ``ray://host:10001`` / ``host:6379`` or ``RAY_ADDRESS``: join that cluster
  (inside ``ray job submit`` jobs Ray sets ``RAY_ADDRESS`` for us);
- a wrong address fails fast with one line, not a hang or a traceback.
"""

from __future__ import annotations

import logging
import os
import socket

from raydistill.errors import RaydistillError, first_line
from raydistill.runtime.verbosity import forwarded_env, is_verbose

log = logging.getLogger(__name__)

GCS_PORT_VARIABLE = "RAY_GCS_SERVER_PORT"  # Ray reads it when ray.init starts a head node
REACHABLE_TIMEOUT_S = 5.0  # one TCP connect to the GCS port before ray.init, which retries for minutes


def worker_env() -> dict[str, str]:
    """Environment every Ray worker of ours needs: DeepSpeed picks its accelerator at import, and the
    libraries' verbosity must be set before they are imported."""
    env = {"TOKENIZERS_PARALLELISM": "false", **forwarded_env()}
    if "DS_ACCELERATOR" in os.environ:
        env["DS_ACCELERATOR"] = os.environ["DS_ACCELERATOR"]
    return env


def free_local_port() -> int:
    """A TCP port nothing listens on now, on loopback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Start or join Ray once per process; a no-op if Ray is already initialized.

    A local Ray is started on loopback with a GCS port chosen here, and every worker gets
    ``RAY_ADDRESS`` set to it: code inside workers that looks the cluster up by itself (Ray
    Train's placement-group cleaner uses the state API) then finds this cluster, even when
    another Ray instance runs on the same machine.
    """
    import ray

    if ray.is_initialized():
        return
    address = checked_address(address)
    quiet = not is_verbose()
    level = logging.ERROR if quiet else logging.WARNING
    if address is None:
        port = free_local_port()
        runtime_env = {"env_vars": {**worker_env(), "RAY_ADDRESS": f"127.0.0.1:{port}"}}
        previous = os.environ.get(GCS_PORT_VARIABLE)
        os.environ[GCS_PORT_VARIABLE] = str(port)  # read by the head node ray.init starts
        try:
            ray.init(num_cpus=num_cpus, runtime_env=runtime_env, dashboard_host="127.0.0.1",
                     _node_ip_address="127.0.0.1", logging_level=level, log_to_driver=not quiet)
        finally:
            if previous is None:
                os.environ.pop(GCS_PORT_VARIABLE, None)
            else:
                os.environ[GCS_PORT_VARIABLE] = previous
        return
    try:
        # joining a cluster (e.g. inside `ray job submit`): the job's own runtime_env applies, and
        # adding ours would clash with any variable it also sets
        ray.init(address=address, logging_level=level)
    except (ConnectionError, TimeoutError, ValueError, RuntimeError) as err:
        raise _unreachable(address, first_line(err)) from None


def _unreachable(address: str, why: str) -> RaydistillError:
    return RaydistillError(
        f"cannot connect to a Ray cluster at '{address}' ({why}); start one with "
        "`ray start --head`, check the address, or leave --address/RAY_ADDRESS unset to run locally"
    )


def checked_address(address: str | None) -> str | None:
    """The cluster to join (``address``, else ``RAY_ADDRESS``), checked; None means start a local Ray.

    The CLI calls this before loading a teacher or a corpus, so a wrong address costs a
    second, not the minutes of work that would come before ``ray.init``.
    """
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is not None:
        check_reachable(address)
    return address


def check_reachable(address: str, timeout: float = REACHABLE_TIMEOUT_S) -> None:
    """Fail in seconds, not minutes, when nothing listens at a ``host:port`` address.

    ``ray.init`` keeps retrying a dead GCS address for minutes; one TCP connect tells us first.
    ``auto`` (found through Ray's local session files) is left to ``ray.init``, which fails fast.
    """
    if address.startswith(("http://", "https://")):
        raise RaydistillError(
            f"'{address}' is a dashboard / job submission address: use it with `ray job submit --address`; "
            "--address and RAY_ADDRESS here take the cluster's GCS address (host:6379), ray://host:10001 or 'auto'"
        )
    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        return  # 'auto', 'local' or a form ray.init resolves itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as err:
        raise _unreachable(address, f"nothing answers at {host}:{port}: {err.strerror or err}") from None


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0
