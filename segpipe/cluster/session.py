"""Join a Ray cluster, or start a local Ray, for one command, and leave Ray as found."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator, Optional

from segpipe.cluster.reaper import watch_local_ray
from segpipe.config import ConfigError, one_line
from segpipe.io.storage import redact


@contextlib.contextmanager
def ray_session(address: Optional[str]) -> Iterator[None]:
    """Join ``address`` (or ``RAY_ADDRESS``), else start a local Ray; leave it as found.

    Ray puts the driver's current folder on its workers' import path; started from a folder
    that holds a clone named ``segpipe`` (no ``__init__.py`` at its top), the workers would
    import that folder as a namespace package instead of segpipe. So the folder the driver
    imported segpipe from goes on their path too, where a regular package wins over a
    namespace one whatever the order: no command depends on the folder it is started from."""
    import ray
    from ray.job_config import JobConfig

    if ray.is_initialized():
        yield
        return
    job_config = JobConfig(_py_driver_sys_path=[package_parent()])
    target = address or os.environ.get("RAY_ADDRESS")
    if target:
        problem = unreachable(target)
        if problem:
            raise ConfigError(problem)
        try:
            ray.init(address=target, log_to_driver=True, job_config=job_config)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ConfigError(redact(f"cannot join the Ray cluster at {target} (--address or "
                                     f"RAY_ADDRESS): {one_line(exc, 300)}")) from exc
        try:
            yield
        finally:
            ray.shutdown()
        return
    with watch_local_ray(package_parent()) as watch:   # its processes end even if this one is SIGKILLed
        ray.init(address="local", include_dashboard=False, log_to_driver=True,
                 job_config=job_config, _system_config=local_ray_system_config())
        try:
            watch.watch(local_ray_processes())
            yield
        finally:
            ray.shutdown()


def local_ray_system_config() -> dict[str, int]:
    """Ray's system config for a local Ray that segpipe starts: its workers run at the
    priority of the process that starts it.

    Ray runs its workers at niceness 15 (``RAY_worker_niceness``), below everything else on
    the machine, so that a cluster node's own daemons stay responsive. On a machine that
    does other work too, that starves the run: every stage runs in Ray's workers, and any
    other busy process takes the CPUs from them (docs/benchmarks.md, "the test suite"). The
    local Ray of a command is the command's own, so its workers get the command's priority,
    and ``nice segpipe ...`` applies to the whole run. A ``RAY_worker_niceness`` the user set
    is kept. A new dict each call: ``ray.init`` adds its own keys to the one it is given."""
    return {} if "RAY_worker_niceness" in os.environ else {"worker_niceness": 0}


def start_or_join_ray() -> None:
    """What a Python user's first run does when Ray is not running: ``ray.init()``, which
    joins ``RAY_ADDRESS`` when it is set and otherwise starts a local Ray, whose workers then
    run at this process's priority (``local_ray_system_config``)."""
    import ray

    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        ray.init(_system_config=local_ray_system_config())


def unreachable(address: str, timeout_s: float = 10.0) -> Optional[str]:
    """Why nothing listens at ``address`` when it names a host and port (``HOST:PORT``,
    ``ray://HOST:PORT``), or None: Ray itself waits minutes for a cluster that is not there
    (a typo in --address hung a run for over five). Other forms (``auto``, a module's
    scheme) are left to Ray."""
    import socket

    where = address[len("ray://"):] if address.startswith("ray://") else address
    host, _, port = where.rsplit("@", 1)[-1].rpartition(":")
    if "://" in where or not host or not port.isdigit():
        return None
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as exc:
        return redact(f"no Ray cluster answers at {address} (--address or RAY_ADDRESS): "
                      f"{exc}; check the address, or leave it out to start a local Ray")
    return None


def local_ray_processes() -> list[int]:
    """The pids of the processes ``ray.init`` started for this process's local Ray (GCS,
    raylet, dashboard, monitors; the raylet's workers and agents are their children)."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    processes = getattr(node, "all_processes", None) or {}
    return [info.process.pid for infos in processes.values() for info in infos
            if getattr(info, "process", None) is not None]


def package_parent() -> str:
    """The folder that holds the segpipe package this module is part of (``segpipe/`` is
    ``parents[1]`` of ``segpipe/cluster/session.py``)."""
    return str(Path(__file__).resolve().parents[2])
