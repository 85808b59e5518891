"""``segpipe export``: the same answers as a fresh segment run, from predictions/ alone."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from conftest import small_config
from images import write_photos
from segpipe.model.categories import COCO_TABLE
from segpipe.config import ConfigError
from segpipe.annotations.selection import ExportCounts, ExportOptions
from segpipe.commands.export import run_export
from segpipe.output.run_folder import prediction_files
from segpipe.commands.segment import run_segment
from synthetic import large_predictions

SEGPIPE = str(Path(sys.executable).parent / "segpipe")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, checkpoint, local_ray):
    """A base run (0.5 / 0.5, soft masks) and fresh runs at a new score and mask threshold.

    With batch size 1 every image is predicted alone in every run, so the runs' detections are
    bit-identical and differences can only come from export.
    """
    root = tmp_path_factory.mktemp("export")
    images = root / "images"
    write_photos(images)
    base = small_config(images, root / "base", checkpoint, batch_size=1)
    high = small_config(images, root / "score07", checkpoint, batch_size=1, score_threshold=0.7)
    low_mask = small_config(images, root / "mask03", checkpoint, batch_size=1,
                            mask_threshold=0.3, soft_masks=False)
    for config in (base, high, low_mask):
        run_segment(config)
    return root


def annotations(path: Path) -> list[dict]:
    data = json.loads(path.read_text())
    names = {i["id"]: i["file_name"] for i in data["images"]}
    return sorted(({**a, "file_name": names[a["image_id"]]} for a in data["annotations"]),
                  key=lambda a: (a["file_name"], -a["score"], a["category_id"], a["bbox"]))


def strip(a: dict) -> dict:
    return {k: v for k, v in a.items() if k != "id"}


def stored(run: Path) -> list[dict]:
    """Every stored detection of a run, read straight from its Parquet files, with its image."""
    return [{**det, "file_name": row["file_name"], "image_id": row["image_id"]}
            for path in prediction_files(str(run / "predictions"))
            for row in pq.read_table(path).to_pylist() if row["status"] == "ok"
            for det in row["detections"]]


def writable(det: dict, score: float) -> bool:
    """What COCO files hold at ``score``: scored, a COCO category, a non-empty mask."""
    return det["score"] >= score and det["category_id"] in COCO_TABLE.ids and det["area"] > 0


def test_export_at_a_new_score_threshold_equals_a_fresh_run(runs):
    run_export(str(runs / "base"), str(runs / "x07"), ExportOptions(score_threshold=0.7))
    exported = annotations(runs / "x07" / "instances.json")
    fresh = annotations(runs / "score07" / "coco" / "instances.json")
    assert len(exported) == len(fresh) > 0
    assert [strip(a) for a in exported] == [strip(a) for a in fresh]
    results = json.loads((runs / "x07" / "results.json").read_text())
    assert len(results) == len(exported)
    # Against the stored rows themselves: exactly the detections scoring 0.7 or more.
    expected = sorted((d["image_id"], d["score"], d["segmentation"]["counts"])
                      for d in stored(runs / "base") if writable(d, 0.7))
    assert sorted((r["image_id"], r["score"], r["segmentation"]["counts"]) for r in results) == expected
    assert min(a["score"] for a in exported) >= 0.7
    assert len(expected) < sum(writable(d, 0.5) for d in stored(runs / "base"))  # 0.7 removed some


def test_export_at_a_new_mask_threshold_matches_a_fresh_run(runs):
    run_export(str(runs / "base"), str(runs / "m03"),
               ExportOptions(score_threshold=0.5, mask_threshold=0.3))
    exported = annotations(runs / "m03" / "instances.json")
    fresh = annotations(runs / "mask03" / "coco" / "instances.json")
    assert len(exported) == len(fresh) > 0
    ious, exact = [], 0
    for a, b in zip(exported, fresh):
        assert (a["file_name"], a["category_id"], a["score"]) == (b["file_name"], b["category_id"],
                                                                b["score"])
        ma = mask_utils.decode(a["segmentation"]).astype(bool)
        mb = mask_utils.decode(b["segmentation"]).astype(bool)
        ious.append((ma & mb).sum() / (ma | mb).sum())
        exact += bool((ma == mb).all())
    print(f"mask threshold 0.3 from uint16 soft masks: mean IoU {np.mean(ious):.5f}, "
          f"min {np.min(ious):.5f}, {exact}/{len(ious)} pixel-identical")
    assert np.min(ious) >= 0.99            # every detection
    assert exact >= 0.9 * len(ious)         # and most pixel for pixel


def test_class_filter_and_counts(runs):
    base = json.loads((runs / "base" / "run.json").read_text())["counts"]["per_category"]
    name = next(iter(base))
    summary = run_export(str(runs / "base"), str(runs / "cls"),
                         ExportOptions(score_threshold=0.5, classes=COCO_TABLE.parse_classes(name)))
    data = json.loads((runs / "cls" / "instances.json").read_text())
    assert {a["category_id"] for a in data["annotations"]} == set(COCO_TABLE.parse_classes(name))
    assert summary["counts"]["per_category"] == {name: base[name]}
    assert json.loads((runs / "cls" / "export.json").read_text())["counts"]["annotations"] == base[name]


def test_max_per_image_min_area_and_polygons(runs):
    candidates = [d for d in stored(runs / "base") if writable(d, 0.5)]
    min_area = int(np.median([d["area"] for d in candidates]))  # leaves out about half
    run_export(str(runs / "base"), str(runs / "poly"),
               ExportOptions(score_threshold=0.5, max_per_image=2, min_area=min_area,
                             polygons=True))
    gt = COCO(str(runs / "poly" / "instances.json"))
    kept: dict[int, list[float]] = {}
    for a in gt.dataset["annotations"]:
        kept.setdefault(a["image_id"], []).append(a["score"])
        assert isinstance(a["segmentation"], list) and all(len(p) >= 8 for p in a["segmentation"])
        assert gt.annToMask(a).sum() > 0
    # Per image: the two highest scores among the stored detections that pass min_area.
    eligible: dict[int, list[float]] = {}
    for d in candidates:
        if d["area"] >= min_area:
            eligible.setdefault(d["image_id"], []).append(d["score"])
    assert sum(len(v) for v in eligible.values()) < len(candidates)  # min_area removed some
    assert any(len(v) > 2 for v in eligible.values())                # max_per_image cuts some
    assert {i: sorted(v, reverse=True) for i, v in kept.items()} == \
        {i: sorted(v, reverse=True)[:2] for i, v in eligible.items()}


def test_requests_the_predictions_cannot_answer_are_refused(runs):
    with pytest.raises(ConfigError, match="below the stored score floor"):
        run_export(str(runs / "base"), str(runs / "bad"), ExportOptions(score_threshold=0.01))
    with pytest.raises(ConfigError, match="kept no soft masks"):
        run_export(str(runs / "mask03"), str(runs / "bad"),
                   ExportOptions(score_threshold=0.5, mask_threshold=0.4))
    result = subprocess.run([SEGPIPE, "export", str(runs / "base"), "--to", str(runs / "bad"),
                             "--classes", "unicorn"], capture_output=True, text=True)
    assert result.returncode == 2 and "unknown class 'unicorn'" in result.stderr
    assert not (runs / "bad").exists()


@pytest.mark.slow
def test_export_memory_stays_flat_as_detections_grow(tmp_path):
    """Peak RSS of an export of 40k and of 320k detections (4 and 32 files) differ by little.

    Holding the 280k extra annotations in memory would take well over 150 MB (a COCO
    annotation dict with its bbox list and RLE string is over 600 bytes in Python). Peak RSS
    of the same export varies by up to ~25 MB from run to run (allocator timing), so each
    size takes the lower of two runs.
    """
    peaks = {}
    for images in (800, 6400):
        output = tmp_path / f"p{images}"
        large_predictions(output, images, per_image=50, rows_per_file=200)
        # VmHWM is this process's own peak; ru_maxrss would carry pytest's over fork + exec.
        code = ("import re; from segpipe.annotations.selection import ExportOptions; "
                "from segpipe.commands.export import run_export; "
                f"s = run_export({str(output)!r}, {str(output.parent / (output.name + '-coco'))!r}, "
                "ExportOptions(score_threshold=0.3)); "
                "hwm = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1); "
                "print(s['counts']['detections'], hwm)")
        runs = []
        for _ in range(2):
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                 check=True).stdout.split()
            assert int(out[0]) == images * 50
            runs.append(int(out[1]) / 1024)
        peaks[images] = min(runs)
    print(f"peak RSS: {peaks}")
    assert peaks[6400] - peaks[800] < 80  # MB, for 8x the detections


def test_export_summary_says_what_was_left_out_and_why(runs, tmp_path):
    result = subprocess.run([SEGPIPE, "export", str(runs / "base"), "--to", str(tmp_path / "p"),
                             "--polygons", "--max-per-image", "3", "--min-area", "30",
                             "--no-progress"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    counts = json.loads((tmp_path / "p" / "export.json").read_text())["counts"]
    annotations = json.loads((tmp_path / "p" / "instances.json").read_text())["annotations"]
    assert f"segpipe export: {len(annotations)} annotations" in result.stdout
    printed = {reason: int(n) for n, reason in
               re.findall(r"segpipe export:\s+(\d+) left out: (.+)", result.stdout)}
    assert len(printed) >= 3  # score, --max-per-image and --min-area all leave some out here
    assert printed == {reason: n for n, reason in ExportCounts(**counts).left_out()}
    # Every stored detection is either written or left out for one reason.
    assert len(annotations) + sum(printed.values()) == counts["detections"]


@pytest.mark.slow
def test_export_keeps_no_python_object_per_detection(tmp_path):
    """tracemalloc's peak of the Python heap, which has none of the allocator noise of RSS:
    an export of 160k detections peaks exactly where one of 20k does (18.3 MB both, measured),
    while keeping each annotation's RLE string alone would add about 8 MB."""
    peaks = {}
    for images in (400, 3200):
        output = tmp_path / f"p{images}"
        large_predictions(output, images, per_image=50, rows_per_file=200)
        code = ("import tracemalloc; from segpipe.annotations.selection import ExportOptions; "
                "from segpipe.commands.export import run_export; "
                "tracemalloc.start(); "
                f"s = run_export({str(output)!r}, {str(output.parent / (output.name + '-coco'))!r}, "
                "ExportOptions(score_threshold=0.3)); "
                "print(s['counts']['detections'], tracemalloc.get_traced_memory()[1])")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True).stdout.split()
        assert int(out[0]) == images * 50
        peaks[images] = int(out[1]) / 2**20
    print(f"traced Python peak: {peaks}")
    assert peaks[3200] - peaks[400] < 2  # MB, for 140k more detections


def test_an_export_on_ray_writes_the_same_files_as_one_process(tmp_path, local_ray):
    """One Ray task per prediction file, written in file order: the same bytes as a local
    export (re-pasted masks, polygons and counts included)."""
    large_predictions(tmp_path / "run", 60, per_image=20, rows_per_file=7)   # 9 files
    outputs = {}
    for name, address in (("local", None), ("ray", "auto")):
        for options in (ExportOptions(score_threshold=0.3, mask_threshold=0.3),
                        ExportOptions(score_threshold=0.5, polygons=True)):
            to = tmp_path / f"{name}-{options.polygons}"
            summary = run_export(str(tmp_path / "run"), str(to), options, address=address)
            instances = json.loads((to / "instances.json").read_text())
            instances.pop("info")   # its date_created
            outputs[name, options.polygons] = (instances, (to / "results.json").read_bytes(),
                                               summary["counts"])
    for polygons in (False, True):
        assert outputs["ray", polygons] == outputs["local", polygons]
        assert outputs["local", polygons][2]["annotations"] > 100
