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
import sys

from raydistill.errors import RaydistillError, first_line
from raydistill.io import storage
from raydistill.io.storage import redact_url
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
            check_local_ray_can_start()
            ray.init(num_cpus=num_cpus, runtime_env=runtime_env, dashboard_host="127.0.0.1",
                     _node_ip_address="127.0.0.1", logging_level=level, log_to_driver=not quiet)
        except RaydistillError:
            raise
        except Exception as err:  # a temp dir it may not use, a port taken, a node that never came up
            raise _local_start_failed(first_line(err)) from None
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


def ray_temp_dir() -> str:
    """Where a local Ray keeps its session files: ``$RAY_TMPDIR/ray``, else ``$TMPDIR/ray``, else ``/tmp/ray``
    (Ray's own rule on Linux)."""
    base = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    return os.path.join(base, "ray")


def check_local_ray_can_start() -> None:
    """Refuse in one line a local Ray that cannot start because its temporary directory cannot be made
    or written (``RAY_TMPDIR`` under a file, a ``/tmp/ray`` of another user); ``ray.init`` would fail
    with a traceback after the stage had already written its plan."""
    temp = ray_temp_dir()
    parent, problem = storage.local_write_problem(temp)
    if problem == "file":
        raise _local_start_failed(f"its temporary directory '{temp}' lies under '{parent}', which is a file")
    if problem == "unwritable":
        raise _local_start_failed(f"this process may not write its temporary directory '{parent}'")


def _local_start_failed(why: str) -> RaydistillError:
    return RaydistillError(
        f"cannot start a local Ray: {why}; set RAY_TMPDIR to a writable directory (Ray uses $RAY_TMPDIR/ray, "
        "default /tmp/ray), or join a running cluster with --address"
    )


def ray_started_here() -> bool:
    """Whether this process started the Ray it is connected to: a fixed single node that no autoscaler
    grows, so work that needs more than it has would wait forever. False when Ray was joined."""
    try:
        import ray._private.worker as ray_worker

        node = getattr(ray_worker, "_global_node", None)
        return bool(getattr(node, "head", False))
    except Exception:  # another Ray version's internals: assume a cluster that may grow
        return False


def cluster_resources_ahead(address: str | None) -> tuple[dict[str, float], bool] | None:
    """The CPUs and GPUs work will get, before any is started, and whether that is all it can ever get.

    Ray already connected: its resources (``fixed`` if this process started it). No Ray yet and no
    address: the local Ray ``init_ray`` will start, predicted from this machine (the CPUs Ray counts,
    the GPUs torch sees), fixed. A cluster to join: None (it is checked once joined).
    """
    import ray

    if ray.is_initialized():
        return dict(ray.cluster_resources()), ray_started_here()
    if checked_address(address) is not None:
        return None
    import torch

    try:  # Ray's own count (cgroup limits included), as the local Ray will see it
        from ray._private.utils import get_num_cpus

        cpus = float(get_num_cpus(override_docker_cpu_warning=True))
    except Exception:
        cpus = float(os.cpu_count() or 1)
    return {"CPU": cpus, "GPU": float(torch.cuda.device_count())}, True


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


def alive_node_count() -> int:
    """Nodes of the connected Ray cluster that are alive now."""
    import ray

    return sum(1 for node in ray.nodes() if node.get("Alive"))


def check_paths_shared(paths: dict[str, str], shared_filesystem: bool, *, nodes: int | None = None) -> None:
    """Refuse, in one line, a path the cluster's nodes cannot all see when it has more than one node.

    ``paths`` are the config fields that workers read or write (``{"output": ...}``). A local path
    (no scheme, or ``file://``) on a multi-node cluster is each node's own disk: workers would write
    shards the driver never sees (or read a corpus that is not there), unless every node mounts it at
    the same place (NFS, Lustre: ``shared_filesystem: true``). ``memory://`` lives in one process and
    is never shared. ``nodes`` defaults to the connected cluster's alive nodes.
    """
    nodes = alive_node_count() if nodes is None else nodes
    if nodes <= 1:
        return
    for field, path in paths.items():
        scheme = path.split("://", 1)[0].lower() if "://" in path else "file"
        shown = redact_url(path)
        if scheme == "memory":
            raise RaydistillError(
                f"{field} '{shown}' is in-memory storage, which only this process sees, but the Ray cluster has "
                f"{nodes} nodes; use an object store URL (s3://, gs://) or a path on a filesystem every node mounts")
        if scheme in ("file", "local") and not shared_filesystem:
            raise RaydistillError(
                f"{field} '{shown}' is a local path, but the Ray cluster has {nodes} nodes: each node would use "
                "its own disk there and the driver would not see the workers' files; use an object store URL "
                f"(s3://, gs://) for {field}, or set shared_filesystem: true if every node mounts '{shown}' at "
                "the same place (NFS, Lustre)")


def check_cluster_paths(paths: dict[str, str], shared_filesystem: bool, address: str | None) -> None:
    """:func:`check_paths_shared` against the cluster this command will run on, before any work.

    Joins the cluster first when there is one to join (``address``, ``RAY_ADDRESS``, or a ``ray
    start`` cluster on this machine that ``ray.init`` would join), as the stage would a moment later;
    a private local Ray (one node) is not started here, as there is nothing to check on it.
    """
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        if checked_address(address) is None and not _started_cluster_answers():
            return
        init_ray(address)
    check_paths_shared(paths, shared_filesystem)


def _started_cluster_answers() -> bool:
    """Whether ``ray.init()`` without an address would join a ``ray start`` cluster of this machine: Ray
    records the last one in ``<temp dir>/ray_current_cluster``; a stale record (nothing listens) is not one."""
    try:
        with open(os.path.join(ray_temp_dir(), "ray_current_cluster")) as f:
            recorded = f.read().strip()
    except OSError:
        return False
    try:
        check_reachable(recorded, timeout=1.0)
    except RaydistillError:
        return False
    return bool(recorded)
