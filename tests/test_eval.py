"""``segpipe eval``: AP 1.0 against a run's own annotations, id mismatches, a hand-made AP."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import small_config
from images import write_photos
from segpipe.model.categories import COCO_CATEGORIES
from segpipe.config import ConfigError
from segpipe.coco.evaluate import STAT_NAMES
from segpipe.commands.evaluate import run_eval
from segpipe.annotations.selection import ExportOptions
from segpipe.commands.export import run_export
from segpipe.commands.segment import run_segment
from synthetic import box_detection, image_row, write_predictions

SEGPIPE = str(Path(sys.executable).parent / "segpipe")


@pytest.fixture(scope="module")
def run(tmp_path_factory, checkpoint, local_ray):
    root = tmp_path_factory.mktemp("eval")
    write_photos(root / "images")
    (root / "images" / "broken.jpg").write_bytes(b"not a jpeg")
    run_segment(small_config(root / "images", root / "out", checkpoint))
    # Ground truth as a user would have it: the predictions' own boxes (instances.json has the
    # tight boxes of the masks, which would not score bbox AP 1 against the model's boxes).
    run_export(str(root / "out"), str(root / "gt-source"),
               ExportOptions(score_threshold=0.5, instances_bbox="model"))
    return root


def ground_truth_from_run(run: Path, id_offset: int = 1000) -> dict:
    """The run's own instances.json with new image ids (and file names as a user has them)."""
    gt = json.loads((run / "gt-source" / "instances.json").read_text())
    new_id = {image["id"]: n + id_offset for n, image in enumerate(gt["images"])}
    for image in gt["images"]:
        image["id"] = new_id[image["id"]]
    for a in gt["annotations"]:
        a["image_id"] = new_id[a["image_id"]]
        a.pop("score")
    gt["images"].append({"id": 1, "file_name": "never_seen.jpg", "width": 10, "height": 10})
    gt["images"].append({"id": 2, "file_name": "broken.jpg", "width": 10, "height": 10})
    return gt


def test_own_annotations_give_ap_1_and_unmatched_images_are_listed(run, tmp_path):
    gt = ground_truth_from_run(run)
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    result = subprocess.run([SEGPIPE, "eval", str(run / "out"), "--gt", str(tmp_path / "gt.json")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]" in result.stdout
    report = json.loads((run / "out" / "eval.json").read_text())
    for iou_type in ("segm", "bbox"):
        assert set(STAT_NAMES) <= set(report[iou_type])
        assert report[iou_type]["AP"] == pytest.approx(1.0)
        assert all(0.0 <= v <= 1.0 for v in report[iou_type].values())
    assert report["matching"]["not_predicted"] == ["never_seen.jpg"]
    assert report["matching"]["failed"][0].startswith("broken.jpg: decode:")
    assert report["matching"]["images_evaluated"] == len(gt["images"]) - 2
    assert "never_seen.jpg" in result.stdout


def test_80_contiguous_ids_are_detected_and_matched_by_name(run):
    gt = ground_truth_from_run(run)
    contiguous = {c.id: n + 1 for n, c in enumerate(COCO_CATEGORIES)}
    for c in gt["categories"]:
        c["id"] = contiguous[c["id"]]
    for a in gt["annotations"]:
        a["category_id"] = contiguous[a["category_id"]]
    path = run / "gt80.json"
    path.write_text(json.dumps(gt))
    report = run_eval(str(run / "out"), str(path))
    assert report["matching"]["categories"] == "by name"
    assert "80 contiguous ids" in report["matching"]["category_message"]
    assert report["segm"]["AP"] == pytest.approx(1.0)
    for c in gt["categories"]:
        c["name"] = f"class {c['id']}"
    path.write_text(json.dumps(gt))
    with pytest.raises(ConfigError, match="80 contiguous category ids"):
        run_eval(str(run / "out"), str(path))


def test_hand_made_case_gives_the_known_ap(tmp_path):
    """Two objects; ranked detections TP, FP, TP: 101-point AP = (51 + 50 * 2/3) / 101.

    The third detection's box is exactly object B but its mask is B's left half (mask IoU
    0.5): a match for segm at IoU 0.50 only, so segm AP averages (51 + 50 * 2/3) / 101 at 0.50
    with 51 / 101 at the nine stricter thresholds, while bbox AP stays (51 + 50 * 2/3) / 101.
    """
    h, w = 100, 100
    half = box_detection(1, 0.7, 50, 50, 20, 40, h, w)   # B's left half, as a mask
    dets = [box_detection(1, 0.9, 10, 10, 30, 30, h, w),   # exactly object A
            box_detection(1, 0.8, 60, 0, 20, 20, h, w),    # nothing there
            {**box_detection(1, 0.7, 50, 50, 40, 40, h, w),  # box exactly object B
             "segmentation": half["segmentation"], "area": half["area"]}]
    write_predictions(tmp_path / "out", [image_row("scene.png", w, h, dets)])
    gt = {"images": [{"id": 7, "file_name": "scene.png", "width": w, "height": h}],
          "categories": [{"id": 1, "name": "person", "supercategory": "person"}],
          "annotations": [
              {"id": 1, "image_id": 7, "category_id": 1, "bbox": [10, 10, 30, 30], "area": 900,
               "iscrowd": 0, "segmentation": [[10, 10, 40, 10, 40, 40, 10, 40]]},
              {"id": 2, "image_id": 7, "category_id": 1, "bbox": [50, 50, 40, 40], "area": 1600,
               "iscrowd": 0, "segmentation": [[50, 50, 90, 50, 90, 90, 50, 90]]}]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    report = run_eval(str(tmp_path / "out"), str(tmp_path / "gt.json"))
    assert report["iou_types"] == ["segm", "bbox"]
    assert report["bbox"]["AP"] == pytest.approx((51 + 50 * 2 / 3) / 101, abs=1e-6)
    both_found, one_found = (51 + 50 * 2 / 3) / 101, 51 / 101
    assert report["segm"]["AP"] == pytest.approx((both_found + 9 * one_found) / 10, abs=1e-6)
    assert report["segm"]["AP50"] == pytest.approx(both_found, abs=1e-6)
    assert report["segm"]["AP75"] == pytest.approx(one_found, abs=1e-6)
    assert report["bbox"]["AP50"] == pytest.approx((51 + 50 * 2 / 3) / 101, abs=1e-6)
    assert report["bbox"]["AR100"] == pytest.approx(1.0)
    high = run_eval(str(tmp_path / "out"), str(tmp_path / "gt.json"), score_threshold=0.85,
                    iou_types=("bbox",))
    assert high["bbox"]["AP"] == pytest.approx(51 / 101, abs=1e-6)  # only A found: recall 0.5
