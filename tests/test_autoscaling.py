"""An autoscaling Ray cluster on this machine: the pool grows with the cluster, nothing is lost.

The cluster is Ray's fake multi-node autoscaler (``RAY_FAKE_CLUSTER=1``, as
``ray.cluster_utils.AutoscalingCluster`` starts it) with a head of 1 CPU and one worker type of
2 CPUs, 0 to 2 nodes. It is started with ``ray start`` in a temp dir and on ports of the test's
own and stopped by stopping exactly its processes (``AutoscalingCluster`` runs ``ray stop
--force``, which would stop every Ray on the machine). Its nodes are added on 127.0.0.1 by
``autoscaling_provider.LoopbackNodeProvider``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from images import write_photos
from segpipe.output.run_folder import prediction_files
from test_cli import run_cli, small_flags
from test_cluster import agent_ports, free_port, own_ray_processes, ray_cli, stop_processes

TESTS = Path(__file__).resolve().parent

#: The cluster of the issue: 1-CPU head, worker type of 2 CPUs, min 0, max 2.
HEAD_CPUS = 1
WORKER = {"CPU": 2}
MAX_WORKERS = 2
#: Copies of the four test photos: work for about 55 s on one 1-thread predictor at
#: min_size 320, long enough for Ray Data to ask for a node and start actors on it. Measured
#: quiet: the node joined after 6 s, its actors started after 28 s; on a loaded CI machine a run
#: of 8 copies (about 28 s of work) ended before the second actor had started.
COPIES = 12
#: Ray Data asks for a node once the cluster's use, averaged over 10 s, stays high, and at most
#: every 10 s (Ray's defaults for long jobs): the test's short run asks over 2 s, every 2 s.
#: Measured with the defaults: the node joined after 6 s in one run and after 24 s in another.
QUICK_NODE_REQUESTS = {"RAY_DATA_CLUSTER_UTIL_AVG_WINDOW_S": "2",
                       "RAY_DATA_MIN_GAP_BETWEEN_AUTOSCALING_REQUESTS": "2"}


def autoscaler_config(gcs_port: int) -> dict:
    """A cluster-launcher config for the fake provider (the fields Ray's example has)."""
    return {
        "cluster_name": "segpipe-test",
        "max_workers": MAX_WORKERS,
        "provider": {"type": "external",
                     "module": "autoscaling_provider.LoopbackNodeProvider",
                     "gcs_address": f"127.0.0.1:{gcs_port}",
                     "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": HEAD_CPUS}, "node_config": {},
                                 "max_workers": 0},
            "cpu2": {"resources": WORKER, "node_config": {}, "min_workers": 0,
                     "max_workers": MAX_WORKERS},
        },
        "head_node_type": "ray.head.default",
        "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": 5, "docker": {},
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [], "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
    }


@pytest.fixture()
def autoscaling_cluster():
    port, client = free_port(), free_port()
    temp = tempfile.mkdtemp(prefix="sp-as-", dir="/tmp")   # Ray's socket paths are short
    config = Path(temp) / "autoscaler.yaml"
    config.write_text(yaml.safe_dump(autoscaler_config(port)))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1", RAY_AUTH_MODE="disabled",
               PYTHONPATH=f"{TESTS}:{env.get('PYTHONPATH', '')}")
    try:
        head = ray_cli("start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                       f"--num-cpus={HEAD_CPUS}", "--include-dashboard=false",
                       f"--ray-client-server-port={client}", f"--autoscaling-config={config}",
                       "--object-store-memory=300000000", "--disable-usage-stats",
                       f"--temp-dir={temp}", *agent_ports(), env=env)
        assert head.returncode == 0, head.stderr[-2000:]
        yield f"127.0.0.1:{port}", env
    finally:
        stop_processes(own_ray_processes(temp, client))
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_pool_grows_with_an_autoscaling_cluster_and_every_image_comes_out_once(
        autoscaling_cluster, tmp_path, checkpoint):
    address, env = autoscaling_cluster
    inputs = tmp_path / "in"
    for copy in range(COPIES):   # enough queued work for Ray Data to grow the pool
        write_photos(inputs / f"set{copy}", scale=0.5)
    (inputs / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    out = tmp_path / "out"
    result = run_cli("segment", str(inputs), str(out), *small_flags(), "--weights",
                     str(checkpoint), "--address", address, "--actors", "1-3",
                     "--batch-size", "1", "--min-size", "320", "--max-size", "480",
                     env_extra={"RAY_AUTH_MODE": "disabled", **QUICK_NODE_REQUESTS})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # the plan saw the node types and sized the pool for the grown cluster
    assert "can grow from 1 CPUs and 0 GPUs to 5 CPUs" in result.stdout, result.stdout
    names = [row["file_name"] for path in prediction_files(str(out / "predictions"))
             for row in pq.read_table(path, columns=["file_name"]).to_pylist()]
    assert len(names) == len(set(names)) == 4 * COPIES + 1
    run = json.loads((out / "run.json").read_text())
    cluster = run["cluster"]
    assert cluster["at_start"]["largest"]["CPU"] == HEAD_CPUS + MAX_WORKERS * WORKER["CPU"]
    assert cluster["at_start"]["node_types_from"].startswith("the autoscaler's config")
    joined = [e for e in cluster["nodes_joined_or_left"] if e["event"] == "joined"]
    assert joined, cluster                      # the cluster grew while the run went
    assert {e["resources"]["CPU"] for e in joined} == {WORKER["CPU"]}
    assert cluster["predictor_actors"] >= 2, cluster["predictor_starts"]
    nodes_used = {s["node"] for s in cluster["predictor_starts"]}
    assert nodes_used & {e["node"] for e in joined}, cluster   # predictors on joined nodes
    assert run["accounting"]["complete"]
    print(json.dumps({"timeline": cluster["nodes_joined_or_left"],
                      "predictor_starts": cluster["predictor_starts"],
                      "timings_s": run["timings_s"], "images_per_s": run["images_per_s"]}, indent=1))
