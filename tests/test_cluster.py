"""A real two-node Ray cluster on this machine: ``ray job submit`` gives a local run's result."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from pycocotools import mask as mask_utils

from images import write_photos
from segpipe.layout import prediction_files
from test_cli import run_cli, small_flags

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.fixture()
def cluster(tmp_path):
    """Head node (1 CPU) and a second node (2 CPUs, its own resource) on 127.0.0.1."""
    port, dashboard = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    # Ray 2.5x turns token authentication on by default; this cluster listens on 127.0.0.1 only,
    # so every node and the job client run without it, consistently.
    env["RAY_AUTH_MODE"] = "disabled"
    head = ray_cli("start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                   "--num-cpus=1", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                   f"--dashboard-port={dashboard}", "--object-store-memory=300000000",
                   "--disable-usage-stats", env=env)
    try:
        assert head.returncode == 0, head.stderr[-2000:]
        worker = ray_cli("start", f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1",
                         "--num-cpus=2", '--resources={"second_node": 1}',
                         "--object-store-memory=300000000", env=env)
        assert worker.returncode == 0, worker.stderr[-2000:]
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        ray_cli("stop", "--force", env=env)


def rows(out: Path) -> dict[str, dict]:
    return {r["file_name"]: r for p in prediction_files(str(out / "predictions"))
            for r in pq.read_table(p).to_pylist()}


def test_job_on_a_two_node_cluster_equals_a_local_run(cluster, tmp_path, checkpoint):
    address, env = cluster
    inputs = tmp_path / "in"
    write_photos(inputs)
    (inputs / "broken.png").write_bytes(b"\x89PNG not really")
    flags = [*small_flags(), "--weights", str(checkpoint), "--torch-threads", "2"]
    submitted = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT),
         "--", sys.executable, "jobs/segment.py", str(inputs), str(tmp_path / "cluster_out"),
         *flags], capture_output=True, text=True, env=env, timeout=600)
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    assert "succeeded" in submitted.stdout
    assert "1 failed" in submitted.stdout
    local = run_cli("segment", str(inputs), str(tmp_path / "local_out"), *flags)
    assert local.returncode == 0, local.stderr[-3000:]
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
