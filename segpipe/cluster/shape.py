"""What a Ray cluster has now and what its autoscaler can grow it to, and how it grew.

``ClusterShape`` is the input of ``cluster.plan.plan_stages``: the resources of every node alive
at the start and, where Ray exposes them, the autoscaler's node types (resources and most
nodes of each). ``read_cluster_shape`` finds the node types in the first of these places:

1. the cluster config that an autoscaler reports to Ray's GCS
   (``ray._private.state.state.get_cluster_config()``, what Ray Data itself reads);
2. the autoscaler's own config file: the ``--autoscaling-config`` of the monitor process
   whose pid the autoscaler publishes in its status (``ray status`` reads the same status).
   The file is readable where the driver runs on the head node, as it does under
   ``ray job submit`` on clusters started with ``ray up`` (``~/ray_bootstrap_config.yaml``,
   with the instance types' resources filled in) or ``ray start --autoscaling-config``.

Elsewhere (KubeRay's autoscaler runs in its own container and reads the RayCluster resource)
the node types stay unknown, and the plan is made from the nodes present, saying so.

``ClusterWatch`` records, while a run goes, the nodes that join and leave, for run.json.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

#: The resource keys recorded and planned with.
KEYS = ("CPU", "GPU", "memory")

log = logging.getLogger(__name__)


#: The resource every head node has (Ray's own marker).
HEAD_MARKER = "node:__internal_head__"


@dataclass(frozen=True)
class NodeType:
    """A kind of node the autoscaler can add: its resources and the most nodes of it
    (``max_count`` -1: no limit)."""

    name: str
    resources: Mapping[str, float]
    max_count: int


@dataclass(frozen=True)
class ClusterShape:
    """The nodes alive now and, when visible, the node types the cluster can grow with.

    ``node_types`` is None when segpipe cannot see them; ``max_workers`` is the autoscaler's
    cap on worker nodes of all types together (None: no cap); ``source`` says where the node
    types were read.
    """

    nodes: tuple[Mapping[str, float], ...]
    node_types: Optional[tuple[NodeType, ...]] = None
    max_workers: Optional[int] = None
    source: Optional[str] = None

    @classmethod
    def of(cls, resources: Mapping[str, float],
           node_cpus: Optional[list[float]] = None) -> "ClusterShape":
        """A fixed cluster from its total ``resources`` (``ray.cluster_resources()``) and the
        CPUs of each node (default: one node with everything)."""
        if not node_cpus:
            return cls((dict(resources),))
        nodes = [{"CPU": float(c)} for c in node_cpus]
        for key, value in resources.items():  # GPUs and memory: on the first node
            if key != "CPU":
                nodes[0][key] = float(value)
        return cls(tuple(nodes))

    def now(self, key: str) -> float:
        """The cluster's ``key`` resource now, all nodes together."""
        return float(sum(node.get(key, 0) for node in self.nodes))

    @property
    def known(self) -> bool:
        """Whether the largest size is known (the node types are visible, each limited)."""
        if self.node_types is None:
            return False
        return self.max_workers is not None or all(t.max_count >= 0 for t in self.node_types)

    def largest(self, key: str) -> float:
        """``key`` at the cluster's largest size: the head node as it is plus every worker
        node the node types allow (never less than now). Without node types: now."""
        now = self.now(key)
        if not self.known:
            return now
        head = sum(node.get(key, 0) for node in self.nodes if HEAD_MARKER in node)
        return max(now, head + sum(self._largest_workers(key)))

    def largest_node_cpus(self) -> list[float]:
        """CPUs of every node at the cluster's largest size (each node of each type)."""
        if not self.known:
            return [node.get("CPU", 0) for node in self.nodes]
        head = [node.get("CPU", 0) for node in self.nodes if HEAD_MARKER in node]
        return head + self._largest_workers("CPU")

    def _largest_workers(self, key: str) -> list[float]:
        """``key`` of each worker node at the largest size, the richest nodes first (the
        ``max_workers`` cap keeps the ones with the most)."""
        values: list[float] = []
        for node_type in self.node_types or ():
            count = node_type.max_count if node_type.max_count >= 0 else (self.max_workers or 0)
            values += [float(node_type.resources.get(key, 0))] * count
        values.sort(reverse=True)
        return values[:self.max_workers] if self.max_workers is not None else values

    def node_kinds(self, key: str) -> list[float]:
        """``key`` of every kind of node that is or can be in the cluster: each node now and
        each node type (types that can never start are left out)."""
        kinds = [float(node.get(key, 0)) for node in self.nodes]
        kinds += [float(t.resources.get(key, 0)) for t in self.node_types or () if t.max_count]
        return kinds

    def describe(self) -> dict[str, Any]:
        """For run.json: the nodes now, the node types and where they came from."""
        return {
            "nodes": [summary(node) for node in self.nodes],
            "node_types": None if self.node_types is None else [
                {"name": t.name, "resources": summary(t.resources), "max_count": t.max_count}
                for t in self.node_types],
            "max_workers": self.max_workers,
            "node_types_from": self.source,
            "largest": {key: _number(self.largest(key)) for key in KEYS} if self.known
            else None,
        }


def summary(resources: Mapping[str, float]) -> dict[str, float]:
    """The planned-with keys of a resource dict (CPU, GPU, memory), without zeros."""
    return {key: _number(resources[key]) for key in KEYS if resources.get(key)}


def _number(value: float) -> float | int:
    if math.isinf(value):
        return -1
    return int(value) if float(value).is_integer() else value


def read_cluster_shape() -> ClusterShape:
    """The connected Ray cluster's shape (``ray.init`` must have run)."""
    import ray

    nodes = tuple(dict(node["Resources"]) for node in ray.nodes() if node["Alive"])
    node_types, max_workers, source = reported_node_types(nodes)
    if node_types is None:
        node_types, max_workers, source = autoscaler_file_node_types()
    return ClusterShape(nodes, node_types, max_workers, source)


def reported_node_types(nodes: tuple[Mapping[str, float], ...] = ()
                        ) -> tuple[Optional[tuple[NodeType, ...]], Optional[int], Optional[str]]:
    """Node types from the cluster config an autoscaler reported to the GCS, if any; a group
    of at most one node shaped like the head node (of ``nodes``) is the head's own, already
    counted, and left out (as Ray Data's autoscaler does)."""
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # noqa: BLE001 - a private API: absent or changed means unknown
        return None, None, None
    if not config or not config.node_group_configs:
        return None, None, None
    heads = [summary(node) for node in nodes if HEAD_MARKER in node]
    types = tuple(NodeType(group.name, {k: float(v) for k, v in group.resources.items()},
                           int(group.max_count))
                  for group in config.node_group_configs)
    types = tuple(t for t in types if not (t.max_count == 1 and summary(t.resources) in heads))
    return types, None, "the cluster config reported to Ray's GCS"


def autoscaler_file_node_types() -> tuple[Optional[tuple[NodeType, ...]], Optional[int],
                                          Optional[str]]:
    """Node types from the autoscaler's config file, when the monitor runs on this host."""
    path = autoscaler_config_path()
    if path is None:
        return None, None, None
    try:
        import yaml

        config = yaml.safe_load(Path(path).read_text()) or {}
        return (*node_types_of_launcher_config(config), f"the autoscaler's config {path}")
    except Exception as exc:  # noqa: BLE001 - unreadable or malformed: unknown node types
        log.warning("could not read the autoscaler's config %s: %s", path, exc)
        return None, None, None


def node_types_of_launcher_config(config: Mapping[str, Any]
                                  ) -> tuple[Optional[tuple[NodeType, ...]], Optional[int]]:
    """The worker node types of a cluster-launcher config (``available_node_types``; the
    ``head_node_type`` is the head, already counted from the nodes present) and the global
    ``max_workers``. A worker type without ``resources`` (an instance type the provider did
    not fill in) makes the types unknown: its size cannot be known."""
    available = config.get("available_node_types") or {}
    head = config.get("head_node_type")
    types = []
    for name, spec in available.items():
        if name == head:
            continue
        resources = {k: float(v) for k, v in (spec.get("resources") or {}).items()}
        if not resources:
            return None, None
        types.append(NodeType(name, resources, int(spec.get("max_workers", -1))))
    cap = config.get("max_workers")
    return tuple(types), (int(cap) if cap is not None else None)


def autoscaler_config_path() -> Optional[str]:
    """The ``--autoscaling-config`` of this cluster's autoscaler monitor, when that monitor
    runs on this host (its pid is in the autoscaler's status, and its command line names
    this cluster's GCS port: the address may be spelled with another of the host's IPs)."""
    try:
        import ray
        from ray.experimental.internal_kv import _internal_kv_get

        status = _internal_kv_get("__autoscaling_status")
        pid = json.loads(status)["monitor_pid"] if status else None
        gcs_address = ray.get_runtime_context().gcs_address
    except Exception:  # noqa: BLE001 - no autoscaler status: nothing to read
        return None
    if not pid:
        return None
    try:
        args = Path(f"/proc/{int(pid)}/cmdline").read_bytes().decode().split("\0")
    except (OSError, ValueError):
        return None  # not on this host, or not Linux
    port = gcs_address.rsplit(":", 1)[-1]
    if not any(a.startswith("--gcs-address=") and a.rsplit(":", 1)[-1] == port for a in args):
        return None  # another process with that pid: the monitor runs elsewhere
    for arg in args:
        if arg.startswith("--autoscaling-config="):
            path = os.path.expanduser(arg.split("=", 1)[1])
            return path if os.path.isfile(path) else None
    return None


@dataclass
class ClusterWatch:
    """Nodes that joined or left while a run went (polled every ``period_s`` seconds)."""

    period_s: float = 2.0
    events: list[dict] = field(default_factory=list)
    _start: float = field(default_factory=time.time)
    _last: dict = field(default_factory=dict)

    @contextlib.contextmanager
    def running(self) -> Iterator["ClusterWatch"]:
        import ray

        def alive() -> dict[str, dict]:
            return {node["NodeID"]: node["Resources"] for node in ray.nodes() if node["Alive"]}

        stop = threading.Event()
        self._last = alive()

        def poll() -> None:
            while not stop.wait(self.period_s):
                with contextlib.suppress(Exception):  # a slow GCS only delays the next look
                    self._record(alive())

        thread = threading.Thread(target=poll, name="segpipe-cluster-watch", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()
            with contextlib.suppress(Exception):
                self._record(alive())

    def _record(self, after: dict[str, dict]) -> None:
        before, at = self._last, round(time.time() - self._start, 1)
        for node_id in after.keys() - before.keys():
            self.events.append({"t_s": at, "event": "joined", "node": node_id,
                                "resources": summary(after[node_id])})
        for node_id in before.keys() - after.keys():
            self.events.append({"t_s": at, "event": "left", "node": node_id,
                                "resources": summary(before[node_id])})
        self._last = after

    def report(self, start: ClusterShape, predictor_starts: list[dict]) -> dict[str, Any]:
        """run.json's record of the cluster as it grew: its shape at the start, the nodes
        that joined or left (seconds from the pipeline's start), the nodes at the end, and
        when and where each predictor actor started (a restart counts again, under the same
        actor id)."""
        starts = [{"t_s": round(s["time"] - self._start, 1),
                   **{k: v for k, v in s.items() if k != "time"}} for s in predictor_starts]
        return {
            "at_start": start.describe(),
            "nodes_joined_or_left": self.events,
            "nodes_at_end": [summary(resources) for resources in self._last.values()],
            "predictor_starts": sorted(starts, key=lambda s: s["t_s"]),
            "predictor_actors": len({s.get("actor") for s in starts}),
        }
