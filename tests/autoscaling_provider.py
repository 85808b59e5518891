"""A fake-cluster node provider for Ray's autoscaler whose nodes stay on this machine's loopback.

Ray's ``FakeMultiNodeProvider`` (``RAY_FAKE_CLUSTER=1``) starts each node the autoscaler adds as
local Ray processes, but on the machine's outward IP address. This subclass starts them on
127.0.0.1, under the head's temp dir (so the test that started the head finds and stops them),
and otherwise does what Ray's provider does. The autoscaler's monitor imports it by module path
(``provider: {type: external, module: autoscaling_provider.LoopbackNodeProvider}``), so the
test puts this folder on the monitor's PYTHONPATH.
"""

from __future__ import annotations

import copy
import json

import ray
import ray._private.ray_constants as ray_constants
from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider
from ray.autoscaler.tags import (NODE_KIND_WORKER, STATUS_UP_TO_DATE, TAG_RAY_NODE_KIND,
                                 TAG_RAY_NODE_NAME, TAG_RAY_NODE_STATUS, TAG_RAY_USER_NODE_TYPE)


class LoopbackNodeProvider(FakeMultiNodeProvider):
    """``FakeMultiNodeProvider`` with every added node listening on 127.0.0.1."""

    def _create_node_with_resources_and_labels(self, node_config, tags, count, resources,
                                               labels):
        resources = copy.deepcopy(resources)
        with self.lock:
            node_type = tags[TAG_RAY_USER_NODE_TYPE]
            node_id = self._next_hex_node_id()
            params = ray._private.parameter.RayParams(
                node_ip_address="127.0.0.1", min_worker_port=0, max_worker_port=0,
                dashboard_port=None, dashboard_agent_listen_port=0,
                num_cpus=resources.pop("CPU", 0), num_gpus=resources.pop("GPU", 0),
                object_store_memory=resources.pop("object_store_memory", None),
                resources=resources, labels=labels, gcs_address=self._gcs_address,
                env_vars={"RAY_OVERRIDE_NODE_ID_FOR_TESTING": node_id,
                          "RAY_CLOUD_INSTANCE_ID": node_id, "RAY_NODE_TYPE_NAME": node_type,
                          ray_constants.RESOURCES_ENVIRONMENT_VARIABLE: json.dumps(resources),
                          ray_constants.LABELS_ENVIRONMENT_VARIABLE: json.dumps(labels)})
            node = ray._private.node.Node(params, head=False, shutdown_at_exit=False,
                                          spawn_reaper=False)
            self._nodes[node_id] = {
                "tags": {TAG_RAY_NODE_KIND: NODE_KIND_WORKER, TAG_RAY_USER_NODE_TYPE: node_type,
                         TAG_RAY_NODE_NAME: node_id, TAG_RAY_NODE_STATUS: STATUS_UP_TO_DATE,
                         **tags},
                "node": node}
