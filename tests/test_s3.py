"""Input and output in an S3 bucket: moto's S3 server on 127.0.0.1, pyarrow's S3 filesystem."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from images import write_photos
from segpipe.model.categories import COCO_TABLE
from test_cli import run_cli, small_flags

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def s3_env():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.time() < deadline, "moto server did not start"
                time.sleep(0.2)
        import boto3

        boto3.client("s3").create_bucket(Bucket="segpipe-test")
        yield env
    finally:
        server.terminate()
        server.wait()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.mark.ray
def test_segment_and_export_from_and_to_a_bucket(s3_env, tmp_path, checkpoint):
    fs, _ = pafs.FileSystem.from_uri("s3://segpipe-test/x")
    write_photos(tmp_path / "photos", names=("chelsea", "coffee"))
    for path in sorted((tmp_path / "photos").iterdir()):
        with fs.open_output_stream(f"segpipe-test/images/sub/{path.name}") as f:
            f.write(path.read_bytes())
    with fs.open_output_stream("segpipe-test/images/empty.jpg") as f:
        f.write(b"")
    result = run_cli("segment", "s3://segpipe-test/images", "s3://segpipe-test/out",
                     "--weights", str(checkpoint), *small_flags(), env_extra=s3_env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "3 images: 2 ok, 1 failed" in result.stdout
    names = {i.path for i in fs.get_file_info(pafs.FileSelector("segpipe-test/out", recursive=True))}
    assert {"segpipe-test/out/coco/instances.json", "segpipe-test/out/coco/results.json",
            "segpipe-test/out/run.json"} <= names
    assert any(n.startswith("segpipe-test/out/predictions/part-") for n in names)
    assert not any(n.endswith(".tmp") for n in names)
    with fs.open_input_stream("segpipe-test/out/coco/instances.json") as f:
        instances = json.loads(f.read())
    assert sorted(i["file_name"] for i in instances["images"]) == ["sub/chelsea.png", "sub/coffee.png"]

    exported = run_cli("export", "s3://segpipe-test/out", "--to", "s3://segpipe-test/export07",
                       "--score-threshold", "0.7", env_extra=s3_env)
    assert exported.returncode == 0, exported.stderr[-2000:]
    with fs.open_input_stream("segpipe-test/export07/export.json") as f:
        assert json.loads(f.read())["asked"]["score_threshold"] == 0.7
    # The exported annotations are exactly the stored detections scoring 0.7 or more, read
    # from the bucket's Parquet files directly.
    stored = []
    for info in fs.get_file_info(pafs.FileSelector("segpipe-test/out/predictions")):
        if info.base_name.startswith("part-") and info.path.endswith(".parquet"):
            with fs.open_input_file(info.path) as f:
                stored += [(row["image_id"], det["score"], det["segmentation"]["counts"])
                           for row in pq.read_table(f).to_pylist() if row["status"] == "ok"
                           for det in row["detections"]
                           if det["score"] >= 0.7 and det["area"] > 0
                           and det["category_id"] in COCO_TABLE.ids]
    with fs.open_input_stream("segpipe-test/export07/instances.json") as f:
        exported = json.loads(f.read())["annotations"]
    assert sorted((a["image_id"], a["score"], a["segmentation"]["counts"]) for a in exported) \
        == sorted(stored)
    assert stored and all(a["score"] >= 0.7 for a in exported)
