"""Input and output in an S3 bucket: moto's S3 server on 127.0.0.1, pyarrow's S3 filesystem."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from images import write_photos
from segpipe.io.storage import redact
from segpipe.model.categories import COCO_TABLE
from test_cli import run_cli, small_flags

BIN = Path(sys.executable).parent
#: credentials in URIs and in the environment, which no output or printed line may hold
SECRET = "Sup3rSecretValue"
TOKEN = "T0kenValue42"
ENV_SECRET = "EnvSecretValue9"


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


def bucket_objects(fs: pafs.FileSystem, prefix: str) -> dict[str, bytes]:
    infos = fs.get_file_info(pafs.FileSelector(prefix, recursive=True))
    return {i.path: fs.open_input_stream(i.path).read() for i in infos
            if i.type == pafs.FileType.File}


@pytest.mark.ray
def test_segment_and_export_from_and_to_a_bucket_and_no_secret_appears(s3_env, tmp_path,
                                                                       checkpoint):
    """INPUT and OUTPUT as users paste them: credentials as user info, pyarrow's options after
    ``?``. segpipe uses them, writes under the path part only, and prints or writes none of
    the secrets (nor the environment's) anywhere: stdout, stderr, run.json, coco/, logs."""
    endpoint = s3_env["AWS_ENDPOINT_URL"].split("://", 1)[1]
    options = f"endpoint_override={endpoint}&scheme=http"
    fs, _ = pafs.FileSystem.from_uri("s3://segpipe-test/x")
    write_photos(tmp_path / "photos", names=("chelsea", "coffee"))
    for path in sorted((tmp_path / "photos").iterdir()):
        with fs.open_output_stream(f"segpipe-test/images/sub/{path.name}") as f:
            f.write(path.read_bytes())
    with fs.open_output_stream("segpipe-test/images/empty.jpg") as f:
        f.write(b"")
    input_uri = f"s3://testing:{SECRET}@segpipe-test/images?{options}"
    output_uri = f"s3://testing:{TOKEN}@segpipe-test/out?{options}"
    env = {**s3_env, "AWS_SECRET_ACCESS_KEY": ENV_SECRET}
    result = run_cli("segment", input_uri, output_uri, "--weights", str(checkpoint),
                     *small_flags(), env_extra=env)
    assert result.returncode == 0, redact(result.stderr[-3000:])
    assert "3 images: 2 ok, 1 failed" in result.stdout
    written = bucket_objects(fs, "segpipe-test/out")
    assert {"segpipe-test/out/coco/instances.json", "segpipe-test/out/coco/results.json",
            "segpipe-test/out/run.json"} <= set(written)              # not under "out?.../"
    assert any(n.startswith("segpipe-test/out/predictions/part-") for n in written)
    assert not any(n.endswith(".tmp") for n in written)
    instances = json.loads(written["segpipe-test/out/coco/instances.json"])
    assert sorted(i["file_name"] for i in instances["images"]) == ["sub/chelsea.png", "sub/coffee.png"]
    assert b"***@segpipe-test/images" in written["segpipe-test/out/run.json"]

    exported = run_cli("export", output_uri, "--to", f"s3://segpipe-test/export07?{options}",
                       "--score-threshold", "0.7", env_extra=env)
    assert exported.returncode == 0, redact(exported.stderr[-2000:])
    written.update(bucket_objects(fs, "segpipe-test/export07"))
    for secret in (SECRET, TOKEN, ENV_SECRET):
        for printed in (result.stdout, result.stderr, exported.stdout, exported.stderr):
            assert secret not in printed
        for path, data in written.items():
            assert secret.encode() not in data, path
    assert json.loads(written["segpipe-test/export07/export.json"])["asked"]["score_threshold"] \
        == 0.7
    # The exported annotations are exactly the stored detections scoring 0.7 or more, read
    # from the bucket's Parquet files directly.
    stored = [(row["image_id"], det["score"], det["segmentation"]["counts"])
              for path, data in written.items()
              if path.startswith("segpipe-test/out/predictions/part-") and path.endswith(".parquet")
              for row in pq.read_table(pa.BufferReader(data)).to_pylist() if row["status"] == "ok"
              for det in row["detections"]
              if det["score"] >= 0.7 and det["area"] > 0 and det["category_id"] in COCO_TABLE.ids]
    exported_annotations = json.loads(written["segpipe-test/export07/instances.json"])["annotations"]
    assert sorted((a["image_id"], a["score"], a["segmentation"]["counts"])
                  for a in exported_annotations) == sorted(stored)
    assert stored and all(a["score"] >= 0.7 for a in exported_annotations)
