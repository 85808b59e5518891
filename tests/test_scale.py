"""A small version of bench/scale.py: many tiny images, bounded files, every image once."""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
from pycocotools.coco import COCO

from conftest import SMALL
from segpipe import progress
from segpipe.config import SegmentConfig
from segpipe.commands.segment import run_segment
from segpipe.output.run_folder import prediction_files

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from scale import make_images  # noqa: E402


def test_many_small_images_stream_into_bounded_files(tmp_path, local_ray, monkeypatch, capsys):
    make_images(tmp_path / "images", 240, 48)
    monkeypatch.setattr(progress, "PLAIN_INTERVAL_S", 0.0)  # a plain line at every poll
    config = SegmentConfig(input=str(tmp_path / "images"), output=str(tmp_path / "out"),
                           weights="random", min_size=48, max_size=48, detections_per_image=5,
                           proposals_per_image=20, batch_size=16, rows_per_file=50,
                           progress=True, actors=SMALL["actors"],
                           torch_threads=SMALL["torch_threads"])
    report = run_segment(config)
    # Not a terminal: plain progress lines, counting up to every image.
    lines = re.findall(r"segpipe: segment: (\d+)/240 images", capsys.readouterr().out)
    counts = [int(n) for n in lines]
    assert counts and counts == sorted(counts) and counts[-1] == 240
    files = prediction_files(str(tmp_path / "out" / "predictions"))
    rows = [pq.read_metadata(p).num_rows for p in files]
    assert max(rows) <= 50 and sum(rows) == 240
    ids = Counter(i for p in files for i in pq.read_table(p, columns=["image_id"])
                  .column("image_id").to_pylist())
    assert len(ids) == 240 and max(ids.values()) == 1
    assert report.accounting.complete and report.counts.ok == 240
    coco = COCO(str(tmp_path / "out" / "coco" / "instances.json"))
    assert len(coco.getImgIds()) == 240
    assert len(coco.getAnnIds()) == report.counts.annotations
