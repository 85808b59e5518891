"""A real two-node Ray cluster on this machine: ``ray job submit`` gives a local run's result."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
from pycocotools import mask as mask_utils

from conftest import small_config
from images import write_photos
from segpipe.commands.segment import run_segment
from segpipe.output.run_folder import prediction_files
from test_cli import small_flags

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def agent_ports() -> list[str]:
    """``ray start`` flags giving a node's agents ports of their own: by default every node on
    a machine takes the same ones (the dashboard agent 52365), so a node started beside
    another Ray (the suite's own local Ray, a user's) would have no agent, and no job could
    be submitted to it."""
    return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]


def ray_cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], capture_output=True, text=True, env=env,
                          timeout=300)


def own_ray_processes(temp_dir: str, client_port: int) -> list[psutil.Process]:
    """The processes of the cluster a test started: every process whose command line names
    the cluster's own temp dir (or its Ray Client server, on the port the test chose), and all
    their descendants (workers, job drivers). Nothing else on the machine matches."""
    roots = []
    for process in psutil.process_iter(["cmdline"]):
        cmd = process.info["cmdline"] or []
        if any(temp_dir in arg for arg in cmd) or (
                "ray.util.client.server" in cmd and f"--port={client_port}" in cmd):
            roots.append(process)
    family = set(roots)
    for process in roots:
        with contextlib.suppress(psutil.Error):
            family.update(process.children(recursive=True))
    return list(family)


def stop_processes(processes: list[psutil.Process], grace_s: float = 3.0) -> None:
    """SIGTERM, then SIGKILL what is left after ``grace_s`` (Ray's daemons can take 15 s to
    wind down on SIGTERM; a test cluster has nothing to save)."""
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, alive = psutil.wait_procs(processes, timeout=grace_s)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()


@pytest.fixture()
def cluster():
    """Head node (1 CPU, the dashboard) and a second node (2 CPUs) on 127.0.0.1.

    Started with ``ray start`` in a temp dir of the test's own, on ports it chose, and stopped
    by stopping exactly those processes: never ``ray stop``, which stops every Ray on the
    machine (a user's, a neighbour test's).
    """
    port, dashboard, client = free_port(), free_port(), free_port()
    temp = tempfile.mkdtemp(prefix="sp-ray-", dir="/tmp")   # short: Ray's socket paths are
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # limited to 107 chars
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    # Ray 2.5x turns token authentication on by default; this cluster listens on 127.0.0.1
    # only, so every node and the job client run without it, consistently.
    env["RAY_AUTH_MODE"] = "disabled"
    try:
        head = ray_cli("start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                       "--num-cpus=1", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                       f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
                       "--object-store-memory=300000000", "--disable-usage-stats",
                       f"--temp-dir={temp}", *agent_ports(), env=env)
        assert head.returncode == 0, head.stderr[-2000:]
        worker = ray_cli("start", f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1",
                         "--num-cpus=2", '--resources={"second_node": 1}',
                         "--object-store-memory=300000000", f"--temp-dir={temp}", *agent_ports(),
                         env=env)
        assert worker.returncode == 0, worker.stderr[-2000:]
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        stop_processes(own_ray_processes(temp, client))
        shutil.rmtree(temp, ignore_errors=True)


def rows(out: Path) -> dict[str, dict]:
    return {r["file_name"]: r for p in prediction_files(str(out / "predictions"))
            for r in pq.read_table(p).to_pylist()}


@pytest.mark.slow
def test_job_on_a_two_node_cluster_equals_a_local_run(cluster, tmp_path, checkpoint, local_ray):
    address, env = cluster
    inputs = tmp_path / "in"
    write_photos(inputs)
    (inputs / "broken.png").write_bytes(b"\x89PNG not really")
    flags = [*small_flags(), "--weights", str(checkpoint), "--torch-threads", "1",
             "--batch-size", "1"]
    # Two 1-CPU predictors: the 1-CPU head holds one at most, so the second node runs one.
    sizing = ["--actors", "2", "--cpus-per-actor", "1"]
    for _ in range(10):   # the head's job agent may not be up yet right after `ray start`
        submitted = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT),
             "--", sys.executable, "jobs/segment.py", str(inputs), str(tmp_path / "cluster_out"),
             *flags, *sizing], capture_output=True, text=True, env=env, timeout=600)
        if "No available agent to submit job" not in submitted.stderr:
            break
        time.sleep(1)
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    assert "succeeded" in submitted.stdout
    assert "1 failed" in submitted.stdout
    # Where the work ran, from Ray's own state API: predictor batches on the second node.
    from ray.util.state import list_nodes, list_tasks

    second_node, = [n["node_id"] for n in list_nodes(address=address, detail=True)
                    if "second_node" in n["resources_total"]]
    predicted = [t for t in list_tasks(address=address, detail=True, limit=10000,
                                       raise_on_missing_output=False)
                 if "PredictStage" in (t.get("func_or_class_name") or "")
                 and t.get("state") == "FINISHED"]
    assert second_node in {t["node_id"] for t in predicted}, \
        [(t["func_or_class_name"], t["node_id"]) for t in predicted]
    # the same run on this process's local Ray (the CLI's run, in process: no second Ray start)
    run_segment(small_config(inputs, tmp_path / "local_out", checkpoint, torch_threads=1,
                             batch_size=1))
    on_cluster, here = rows(tmp_path / "cluster_out"), rows(tmp_path / "local_out")
    assert sorted(on_cluster) == sorted(here) and len(here) == 5
    for name, row in here.items():
        other = on_cluster[name]
        assert (other["image_id"], other["status"], other["width"], other["height"]) == \
            (row["image_id"], row["status"], row["width"], row["height"])
        assert len(other["detections"] or []) == len(row["detections"] or [])
        for a, b in zip(row["detections"] or [], other["detections"] or []):
            assert a["category_id"] == b["category_id"]
            assert abs(a["score"] - b["score"]) < 1e-4
            ma = mask_utils.decode(a["segmentation"]).astype(bool)
            mb = mask_utils.decode(b["segmentation"]).astype(bool)
            union = (ma | mb).sum()
            assert union == 0 or (ma & mb).sum() / union > 0.99
    cluster_info = json.loads((tmp_path / "cluster_out" / "run.json").read_text())["cluster"]
    assert cluster_info["address"] != "local"
    assert cluster_info["resources"]["CPU"] == 3.0  # both nodes: 1 + 2 CPUs


def test_the_reaper_ends_what_it_watches_when_the_driver_dies_and_nothing_else(tmp_path):
    """A driver that watches a process (as a local Ray's) and is then SIGKILLed: the watched
    process and its child end; a process it did not name runs on; a driver that ends well
    leaves its watched process alone."""
    import signal
    import subprocess
    import sys
    import time

    import psutil

    driver_code = (
        "import subprocess, sys, time\n"
        "from segpipe.cluster.reaper import watch_local_ray\n"
        f"with watch_local_ray({str(ROOT)!r}) as watch:\n"
        "    ray = subprocess.Popen(['sh', '-c', 'sleep 300 & sleep 300'])\n"
        "    watch.watch([ray.pid])\n"
        "    print(ray.pid, flush=True)\n"
        "    time.sleep(float(sys.argv[1]))\n")
    bystander = subprocess.Popen(["sleep", "300"])
    try:
        killed = subprocess.Popen([sys.executable, "-c", driver_code, "300"], stdout=subprocess.PIPE,
                                  text=True)
        watched = psutil.Process(int(killed.stdout.readline()))
        time.sleep(1.5)                                   # the reaper notes the watched children
        family = [watched, *watched.children(recursive=True)]
        assert len(family) == 3
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        gone, alive = psutil.wait_procs(family, timeout=15)
        assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
        assert bystander.poll() is None
        finished = subprocess.Popen([sys.executable, "-c", driver_code, "0.1"], stdout=subprocess.PIPE,
                                    text=True)
        kept = psutil.Process(int(finished.stdout.readline()))
        assert finished.wait(timeout=30) == 0
        time.sleep(2)
        assert kept.is_running() and kept.status() != psutil.STATUS_ZOMBIE
        for p in [kept, *kept.children(recursive=True)]:
            p.kill()
    finally:
        bystander.kill()
        bystander.wait()
