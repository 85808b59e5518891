"""One real pipeline run (local Ray, seeded checkpoint file): parity with torchvision, COCO validity."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageOps
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from conftest import small_config, small_spec
from images import write_photos
from segpipe import schema
from segpipe.categories import COCO_CATEGORY_IDS
from segpipe.model import build_model
from segpipe.pipeline import run_segment
from segpipe.sinks import prediction_files


@pytest.fixture(scope="module")
def run(tmp_path_factory, checkpoint, local_ray):
    """Six photos, two pairs of which share a padded shape (so they are batched together)."""
    root = tmp_path_factory.mktemp("parity")
    images = root / "images"
    write_photos(images)
    flipped = np.asarray(Image.open(images / "astronaut.png"))[:, ::-1]
    (images / "more").mkdir()
    Image.fromarray(np.ascontiguousarray(flipped)).save(images / "more" / "astronaut_flipped.png")
    shutil.copy(images / "chelsea.png", images / "more" / "chelsea copy.png")
    config = small_config(images, root / "out", checkpoint)
    report = run_segment(config)
    return config, report, images, root / "out"


def read_predictions(out) -> dict[str, dict]:
    rows = {}
    for path in prediction_files(str(out / "predictions")):
        table = pq.read_table(path)
        assert table.schema.equals(schema.PREDICTION_SCHEMA, check_metadata=False)
        for row in table.to_pylist():
            rows[row["file_name"]] = row
    return rows


def get_prediction(model, path, mask_threshold):
    """The classic tutorial's ``get_prediction``, made exact: EXIF, RGB, one image per call."""
    image = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    with torch.inference_mode():
        pred = model([TF.to_tensor(image)])[0]
    return {
        "labels": pred["labels"].numpy(),
        "scores": pred["scores"].numpy(),
        "boxes": pred["boxes"].numpy(),
        "masks": (pred["masks"][:, 0] > mask_threshold).numpy(),
    }


def box_iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else float(np.array_equal(a, b))


def mask_iou(a, b) -> float:
    union = np.logical_or(a, b).sum()
    return np.logical_and(a, b).sum() / union if union else 1.0


def test_every_image_once_and_all_ok(run):
    config, report, images, out = run
    rows = read_predictions(out)
    assert report.accounting.complete
    assert sorted(rows) == sorted(p.relative_to(images).as_posix() for p in images.rglob("*.png"))
    assert all(r["status"] == "ok" and r["error"] is None for r in rows.values())


def test_detections_equal_direct_torchvision_calls(run, checkpoint):
    config, report, images, out = run
    model = build_model(small_spec())
    model.load_state_dict(torch.load(checkpoint, weights_only=True))
    rows = read_predictions(out)
    compared = exact = 0
    for file_name, row in rows.items():
        ref = get_prediction(model, images / file_name, config.mask_threshold)
        ours = row["detections"]
        assert (row["width"], row["height"]) == Image.open(images / file_name).size
        assert len(ours) == len(ref["scores"]) > 0, file_name
        unused = set(range(len(ours)))
        for label, score, box, mask in zip(ref["labels"], ref["scores"], ref["boxes"], ref["masks"]):
            def iou_with(j):
                x, y, w, h = ours[j]["bbox"]
                return box_iou(box, np.array([x, y, x + w, y + h]))
            candidates = [j for j in unused if ours[j]["category_id"] == label]
            assert candidates, f"{file_name}: no detection of category {label}"
            j = max(candidates, key=iou_with)
            unused.remove(j)
            assert iou_with(j) > 0.99
            assert abs(ours[j]["score"] - score) < 1e-3
            decoded = mask_utils.decode(ours[j]["segmentation"]).astype(bool)
            assert mask_iou(decoded, mask) > 0.99
            assert ours[j]["area"] == decoded.sum()
            compared += 1
            exact += np.array_equal(decoded, mask)
    assert compared >= 30
    print(f"parity: {compared} detections compared, {exact} masks pixel-identical")


def test_coco_files_load_and_evaluate_to_ap_1(run):
    config, report, images, out = run
    gt = COCO(str(out / "coco" / "instances.json"))
    assert len(gt.getAnnIds()) == report.counts.annotations > 0
    assert {c["id"] for c in gt.loadCats(gt.getCatIds())} == COCO_CATEGORY_IDS
    results = json.loads((out / "coco" / "results.json").read_text())
    assert len(results) == report.counts.annotations
    dt = gt.loadRes(str(out / "coco" / "results.json"))
    for iou_type in ("segm", "bbox"):
        evaluator = COCOeval(gt, dt, iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
        assert evaluator.stats[0] == pytest.approx(1.0), iou_type


def test_coco_annotations_are_consistent_with_predictions(run):
    config, report, images, out = run
    rows = {r["image_id"]: r for r in read_predictions(out).values()}
    instances = json.loads((out / "coco" / "instances.json").read_text())
    assert {i["id"]: i["file_name"] for i in instances["images"]} == {
        k: r["file_name"] for k, r in rows.items()}
    sizes = {i["id"]: (i["height"], i["width"]) for i in instances["images"]}
    kept = [d for r in rows.values() for d in r["detections"]
            if d["score"] >= config.score_threshold and d["area"] > 0
            and d["category_id"] in COCO_CATEGORY_IDS]
    assert len(instances["annotations"]) == len(kept)
    assert len({a["id"] for a in instances["annotations"]}) == len(kept)
    for a in instances["annotations"]:
        assert a["iscrowd"] == 0 and a["score"] >= config.score_threshold
        assert a["category_id"] in COCO_CATEGORY_IDS
        decoded = mask_utils.decode(a["segmentation"])
        assert decoded.shape == sizes[a["image_id"]]
        assert decoded.sum() == a["area"] > 0
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["counts"]["detections"] == sum(len(r["detections"]) for r in rows.values())
    assert manifest["weights"]["kind"] == "file"
    assert {"torch", "torchvision", "ray", "pycocotools", "pyarrow"} <= set(manifest["versions"])
    assert manifest["images_per_s"]["pipeline"] > 0
    assert manifest["config"]["mask_threshold"] == config.mask_threshold
