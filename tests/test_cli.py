"""The ``segpipe`` console script end to end through a real local Ray, on awkward inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import SMALL, serve_folder, served_checkpoint
from images import AWKWARD_EXPECTED, write_awkward_inputs, write_photos
from segpipe.output.run_folder import prediction_files

SEGPIPE = str(Path(sys.executable).parent / "segpipe")


def small_flags() -> list[str]:
    flags = []
    for key, value in SMALL.items():
        flag = "--" + key.replace("_", "-")
        flags += [flag if value else "--no-" + key.replace("_", "-")] if isinstance(value, bool) \
            else [flag, str(value)]
    return flags


def run_cli(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(env_extra or {})
    return subprocess.run([SEGPIPE, *args], capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def awkward_run(tmp_path_factory, checkpoint):
    """The CLI on awkward files, its weights downloaded from 127.0.0.1 into an empty cache."""
    root = tmp_path_factory.mktemp("cli")
    inputs = root / "in"
    write_awkward_inputs(inputs)
    write_photos(inputs, names=("chelsea",))
    (root / "served").mkdir()
    name = served_checkpoint(root / "served", checkpoint)
    with serve_folder(root / "served") as base:
        result = run_cli("segment", str(inputs), str(root / "out"), "--weights",
                         f"{base}/{name}", *small_flags(),
                         env_extra={"TORCH_HOME": str(root / "empty-torch-home")})
    return inputs, root / "out", result


def test_cli_exits_0_and_prints_failures(awkward_run):
    _, _, result = awkward_run
    assert result.returncode == 0, result.stderr[-3000:]
    errors = sum(1 for s in AWKWARD_EXPECTED.values() if s == "error")
    assert f"{errors} failed" in result.stdout
    assert f"{errors} image(s) failed:" in result.stdout
    assert "empty file" in result.stdout
    assert "format not recognised" in result.stdout
    assert "3600000000 pixels, over max_image_pixels" in result.stdout


def test_url_weights_were_downloaded_into_the_empty_cache(awkward_run, checkpoint):
    _, out, result = awkward_run
    cached = [p for p in (out.parent / "empty-torch-home" / "hub" / "checkpoints").rglob("*")
              if p.is_file() and p.suffix == ".pth"]
    assert [p.read_bytes() == checkpoint.read_bytes() for p in cached] == [True]
    weights = json.loads((out / "run.json").read_text())["weights"]
    assert weights["kind"] == "url" and weights["name"].startswith("http://127.0.0.1:")


def test_the_terminal_shows_segpipes_lines_and_ray_goes_to_the_log(awkward_run):
    _, out, result = awkward_run
    assert result.stderr == ""
    for line in result.stdout.splitlines():
        assert line.startswith(("segpipe", "  ")), f"not segpipe's: {line!r}"
    logs = list((out / "logs").iterdir())
    assert len(logs) == 1 and str(logs[0]) in result.stdout
    assert "Started a local Ray instance" in logs[0].read_text()


def test_one_row_per_image_file_with_the_right_status(awkward_run):
    inputs, out, _ = awkward_run
    rows = [r for p in prediction_files(str(out / "predictions"))
            for r in pq.read_table(p).to_pylist()]
    by_name = {r["file_name"]: r for r in rows}
    expected = {**AWKWARD_EXPECTED, "chelsea.png": "ok"}
    assert len(rows) == len(by_name) == len(expected)  # readme.txt ignored, nothing twice
    assert {n: r["status"] for n, r in by_name.items()} == expected
    for name, row in by_name.items():
        if row["status"] == "error":
            assert row["error"].startswith("decode: ") and row["detections"] is None
        else:
            assert row["error"] is None and row["width"] > 0 and row["height"] > 0
    assert "truncat" in by_name["truncated.jpg"]["error"]
    # EXIF orientation 6 turns the stored 150x100 picture into a 100x150 one.
    assert (by_name["exif_rotated.jpg"]["width"], by_name["exif_rotated.jpg"]["height"]) == (100, 150)
    assert (by_name["gray16.png"]["width"], by_name["gray16.png"]["height"]) == (150, 100)


def test_manifest_counts_and_errors(awkward_run):
    _, out, _ = awkward_run
    manifest = json.loads((out / "run.json").read_text())
    errors = sum(1 for s in AWKWARD_EXPECTED.values() if s == "error")
    assert manifest["counts"]["images"] == len(AWKWARD_EXPECTED) + 1
    assert manifest["counts"]["errors"] == errors
    assert sum(e["count"] for e in manifest["errors"]) == errors
    assert manifest["accounting"]["complete"] is True
    instances = json.loads((out / "coco" / "instances.json").read_text())
    assert len(instances["images"]) == manifest["counts"]["ok"]


def test_rerun_into_same_output_is_refused_without_overwrite(awkward_run, checkpoint):
    inputs, out, _ = awkward_run
    result = run_cli("segment", str(inputs), str(out), "--weights", str(checkpoint), *small_flags())
    assert result.returncode == 2
    assert "--overwrite" in result.stderr


def test_an_overwrite_the_cluster_refuses_keeps_the_earlier_run(awkward_run, checkpoint):
    """`--overwrite` removed the earlier run's predictions, then found the cluster could not
    take the run (an --address nobody answers at hung for minutes; no GPU, too many
    threads): now it joins Ray and fits the stages first, and a dead address fails at once."""
    import socket

    inputs, out, _ = awkward_run
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and "logs" not in p.parts}
    with socket.socket() as probe:   # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = run_cli("segment", str(inputs), str(out), "--weights", str(checkpoint),
                     *small_flags(), "--overwrite", "--address", f"127.0.0.1:{port}")
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and f"no Ray cluster answers at 127.0.0.1:{port}" in result.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and "logs" not in p.parts} == before


def test_a_bucket_nobody_answers_at_is_one_line_not_a_traceback(tmp_path, checkpoint):
    import socket

    with socket.socket() as probe:   # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    bucket = f"s3://bucket/x?endpoint_override=127.0.0.1:{port}&scheme=http"
    from test_untrusted_runs import run_with

    keys = {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"}
    for args in (["segment", bucket, str(tmp_path / "out"), "--weights", str(checkpoint)],
                 ["export", str(run_with(tmp_path)), "--to", bucket]):
        result = run_cli(*args, env_extra=keys)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert result.stderr.strip().startswith("segpipe: cannot reach what was asked (nothing was done)")
        assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_configuration_mistakes_fail_before_work(tmp_path, checkpoint):
    write_photos(tmp_path / "in", names=("chelsea",))
    result = run_cli("segment", str(tmp_path / "in"), str(tmp_path / "out"), "--weights",
                     str(checkpoint), "--score-floor", "0.6", "--score-threshold", "0.5")
    assert result.returncode == 2
    assert "score_threshold (0.5) is below score_floor (0.6)" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_offline_pretrained_weights_fail_early_with_the_cache_path(tmp_path):
    write_photos(tmp_path / "in", names=("chelsea",))
    cache = tmp_path / "torch-home"
    # A dead local proxy makes the download fail at once, with or without internet access.
    env = {"TORCH_HOME": str(cache), "https_proxy": "http://127.0.0.1:9",
           "HTTPS_PROXY": "http://127.0.0.1:9"}
    result = run_cli("segment", str(tmp_path / "in"), str(tmp_path / "out"),
                     "--weights", "pretrained", env_extra=env)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert "maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth" in result.stderr
    assert "https://download.pytorch.org/models/maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth" in result.stderr
    assert "cannot reach download.pytorch.org (Connection refused)" in result.stderr
    assert str(cache / "hub" / "checkpoints") in result.stderr
    assert "Started a local Ray" not in result.stderr + result.stdout  # no work started
    assert not (tmp_path / "out").exists()
    assert list((cache / "hub" / "checkpoints").iterdir()) == []  # no .partial left behind
    weights = run_cli("weights", "--download", env_extra=env)
    assert weights.returncode == 1 and "missing" in weights.stdout
    assert "Connection refused" in weights.stderr
