"""Ultralytics YOLO behind the model seam: segpipe's detections are ``YOLO(FILE).predict``'s
(boxes within 0.5 px, scores within 1e-4, mask IoU >= 0.99), its masks Ultralytics' own,
re-exported at another mask threshold as a fresh run makes them, in every export format; the
checkpoint is loaded without running code from it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import small_config
from family_checkpoints import yolo_checkpoint
from images import photo, write_photos
from parity import decoded, mask_iou, precision_agreement

import segpipe
from segpipe.config import ConfigError
from segpipe.model import grids
from segpipe.encode.encoder import encode_detections
from segpipe.model.categories import Category
from segpipe.model.resolved import resolve_weights
from segpipe.model.spec import ModelSpec
from segpipe.output.run_folder import prediction_files

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
#: What the parity runs ask of both sides (Ultralytics' conf, iou, max_det and imgsz).
FLAGS = dict(arch="ultralytics", score_floor=0.25, nms_threshold=0.7, detections_per_image=300,
             image_size=320)


def yolo_spec(**changes) -> ModelSpec:
    values = {**dict(arch="ultralytics", min_size=800, max_size=1333, score_floor=0.25,
                     nms_threshold=0.7, detections_per_image=300, proposals_per_image=1000,
                     image_size=320), **changes}
    return ModelSpec(**values)


def ultralytics_predictions(weights: Path, image: np.ndarray, **kwargs):
    """``YOLO(weights).predict`` of one RGB image at the parity settings (Ultralytics takes
    BGR arrays, as OpenCV reads them)."""
    from ultralytics import YOLO

    settings = dict(conf=0.25, iou=0.7, imgsz=320, max_det=300, retina_masks=True, verbose=False)
    return YOLO(str(weights)).predict(np.ascontiguousarray(image[..., ::-1]), **{**settings, **kwargs})[0]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("yolo")
    return {"segment": yolo_checkpoint(folder / "seg.pt", "yolo11n-seg.yaml", classes=3, seed=0),
            "detect": yolo_checkpoint(folder / "det.pt", "yolo11n.yaml", classes=4, seed=1)}


@pytest.fixture(scope="module")
def segment_run(tmp_path_factory, checkpoints, local_ray):
    """The photos through ``segpipe segment --arch ultralytics`` (one image per forward pass, as
    ``predict`` runs them one by one)."""
    root = tmp_path_factory.mktemp("yolo-run")
    write_photos(root / "photos", names=PHOTOS)
    torch.set_num_threads(2)
    segpipe.run_segment(small_config(root / "photos", root / "out", checkpoints["segment"],
                                     batch_size=1, torch_threads=2, **FLAGS))
    rows = {r["file_name"]: r for p in prediction_files(str(root / "out" / "predictions"))
            for r in pq.read_table(p).to_pylist()}
    return root, rows


def test_masks_are_process_mask_natives_for_any_letterbox():
    """``grids`` makes Ultralytics' final masks from a crop of the prototype logits, for image
    shapes whose letterbox needs each upsampling factor (1, 2 and 4)."""
    from ultralytics.utils import ops

    rng = np.random.default_rng(0)
    for trial in range(30):
        height, width = (int(v) for v in rng.integers(40, 700, 2))
        gain = min(320 / height, 320 / width)
        pad_to = [((round(side * gain) + 31) // 32 * 32) if rng.random() < 0.5 else 320
                  for side in (height, width)]
        grid_h, grid_w = pad_to[0] // 4, pad_to[1] // 4
        protos = torch.tensor(rng.normal(size=(8, grid_h, grid_w)) * 3, dtype=torch.float32)
        coefficients = torch.tensor(rng.normal(size=(6, 8)) * 3, dtype=torch.float32)
        x1, y1 = rng.uniform(0, width * 0.8, 6), rng.uniform(0, height * 0.8, 6)
        boxes = np.stack([x1, y1, np.minimum(x1 + rng.uniform(2, width * 0.6, 6), width),
                          np.minimum(y1 + rng.uniform(2, height * 0.6, 6), height)], 1).astype(np.float32)
        expected = ops.process_mask_native(protos, coefficients, torch.tensor(boxes), (height, width)).numpy()
        logits = (coefficients @ protos.view(8, -1)).view(-1, grid_h, grid_w).numpy()
        windows = np.array([grids.ultralytics_window(box, grid_h, grid_w, height, width) for box in boxes])
        crops = [logits[k, y0:y1_, x0:x1_] for k, (x0, y0, x1_, y1_) in enumerate(windows)]
        cells = np.column_stack([np.full(6, grid_h), np.full(6, grid_w), windows])
        rles, areas = grids.grid_masks(crops, cells, boxes, height, width, 0.5, "ultralytics")
        for k, rle in enumerate(rles):
            assert mask_iou(decoded(rle), expected[k].astype(bool)) >= 0.999, (trial, k)
            assert areas[k] == decoded(rle).sum()
        # the crop is all the mask reads: cells past it change nothing
        assert all(c.size < grid_h * grid_w for c in crops)


def test_a_segment_run_gives_ultralytics_predictions(segment_run, checkpoints):
    root, rows = segment_run
    worst = {"box": 0.0, "score": 0.0, "iou": 1.0}
    compared = 0
    for name in PHOTOS:
        row = rows[f"{name}.png"]
        assert row["status"] == "ok"
        ours = [d for d in row["detections"] if d["area"] > 0]   # Ultralytics drops empty masks
        theirs = ultralytics_predictions(checkpoints["segment"], photo(name))
        assert len(ours) == len(theirs.boxes)
        for k, det in enumerate(ours):
            worst["box"] = max(worst["box"], float(np.abs(np.array(det["box"]) - theirs.boxes.xyxy[k].numpy()).max()))
            worst["score"] = max(worst["score"], abs(det["score"] - float(theirs.boxes.conf[k])))
            assert det["category_name"] == theirs.names[int(theirs.boxes.cls[k])]
            worst["iou"] = min(worst["iou"], mask_iou(decoded(det["segmentation"]),
                                                 theirs.masks.data[k].numpy().astype(bool)))
            compared += 1
    assert compared > 50, compared
    assert worst["box"] <= 0.5 and worst["score"] <= 1e-4 and worst["iou"] >= 0.99, worst


def test_re_export_at_another_mask_threshold_is_a_fresh_run_at_it(segment_run, checkpoints, tmp_path):
    from segpipe.commands.export import run_export
    from segpipe.annotations.selection import ExportOptions
    from segpipe.model import yolo

    root, _ = segment_run
    run_export(str(root / "out"), str(tmp_path / "coco"), ExportOptions(0.25, mask_threshold=0.3),
               shard_images=0)
    results = json.loads((tmp_path / "coco" / "results.json").read_text())
    images = {im["id"]: im["file_name"] for im in json.loads(
        (tmp_path / "coco" / "instances.json").read_text())["images"]}
    weights = resolve_weights(str(checkpoints["segment"]), yolo_spec())
    detector = yolo.Detector(weights.spec, weights.payload, torch.device("cpu"))
    fresh: dict[str, list] = {}
    for name in PHOTOS:
        image = photo(name)
        found = detector.predict([image], [True])[0]
        fresh[f"{name}.png"] = [d for d in encode_detections(found, *image.shape[:2], 0.3,
                                                             mask_frame="ultralytics") if d["area"]]
    by_image: dict[str, list] = {}
    for result in results:
        by_image.setdefault(images[result["image_id"]], []).append(result)
    worst = 1.0
    for name, expected in fresh.items():
        got = sorted(by_image.get(name, []), key=lambda r: -r["score"])
        assert len(got) == len(expected) > 0
        for a, b in zip(got, expected):
            assert a["score"] == pytest.approx(b["score"], abs=1e-4)
            worst = min(worst, mask_iou(decoded(a["segmentation"]), decoded(b["segmentation"])))
    assert worst >= 0.99, worst
    default = json.loads(json.dumps(results))
    run_export(str(root / "out"), str(tmp_path / "coco5"), ExportOptions(0.25), shard_images=0)
    at_half = json.loads((tmp_path / "coco5" / "results.json").read_text())
    def pixels(found: list) -> int:
        return sum(int(decoded(r["segmentation"]).sum()) for r in found)

    assert pixels(default) > pixels(at_half), "a lower mask threshold grows the masks"


@pytest.mark.parametrize("export_format", ["coco", "yolo", "label-studio"])
def test_every_export_format_takes_a_yolo_run(segment_run, tmp_path, export_format):
    from segpipe.annotations.selection import ExportOptions
    from segpipe.commands.export import ExportFormat, run_export

    root, rows = segment_run
    kept = sum(1 for r in rows.values() for d in r["detections"] if d["area"] and d["score"] >= 0.5)
    fmt = None if export_format == "coco" else ExportFormat(export_format, "/images/" if
                                                          export_format == "label-studio" else None)
    summary = run_export(str(root / "out"), str(tmp_path / "out"), ExportOptions(0.5),
                         shard_images=0, export_format=fmt)
    assert summary["counts"]["annotations"] == kept > 0
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    if export_format == "coco":
        from pycocotools.coco import COCO

        coco = COCO(str(tmp_path / "out" / "instances.json"))
        assert {c["name"] for c in coco.loadCats(coco.getCatIds())} == {"thing_0", "thing_1", "thing_2"}
        assert len(coco.getAnnIds()) == kept
    elif export_format == "yolo":
        labels = list((tmp_path / "out" / "labels").rglob("*.txt"))
        assert sum(len(p.read_text().splitlines()) for p in labels) == kept
    else:
        assert "tasks.json" in written
        tasks = json.loads((tmp_path / "out" / "tasks.json").read_text())
        assert sum(len(t["predictions"][0]["result"]) for t in tasks) == kept


def test_review_ranks_a_yolo_run(segment_run, tmp_path):
    from segpipe.commands.review import ReviewRequest, run_review

    root, _ = segment_run
    summary = run_review(ReviewRequest(str(root / "out"), str(tmp_path / "review"), top=2))
    table = (tmp_path / "review" / "review.csv").read_text().splitlines()
    assert len(table) == len(PHOTOS) + 1
    assert summary["images"] == len(PHOTOS)
    header = table[0].split(",")
    uncertainty = [float(line.split(",")[header.index("mask_uncertainty")]) for line in table[1:]]
    assert any(u > 0 for u in uncertainty) and all(np.isfinite(uncertainty))


def test_the_python_api_gives_the_runs_detections(segment_run, checkpoints):
    """``segpipe.segment`` on ``ray.data.read_images``: the same stages behind the seam, the
    command's detections."""
    import ray

    root, rows = segment_run
    ds = ray.data.read_images(str(root / "photos"), include_paths=True)
    config = {"weights": str(checkpoints["segment"]), "batch_size": 1, "torch_threads": 2, **FLAGS}
    got = {r["file_name"]: r for r in segpipe.segment(ds, config, root=str(root / "photos")).take_all()}
    assert sorted(got) == sorted(rows)
    for name, row in rows.items():
        ours = [(d["category_id"], d["score"], d["segmentation"]["counts"]) for d in got[name]["detections"]]
        assert ours == [(d["category_id"], d["score"], d["segmentation"]["counts"])
                        for d in row["detections"]] and ours


def test_a_detect_model_matches_predict_and_runs_in_bf16(checkpoints):
    from segpipe.model import yolo

    weights = resolve_weights(str(checkpoints["detect"]), yolo_spec())
    assert not weights.spec.has_masks and weights.categories.describe().startswith("4 model")
    torch.set_num_threads(2)
    images = [photo(name) for name in PHOTOS]
    fp32 = yolo.Detector(weights.spec, weights.payload, torch.device("cpu")).predict(images, [True] * 4)
    bf16 = yolo.Detector(weights.spec, weights.payload, torch.device("cpu"), "bf16").predict(images, [True] * 4)
    for image, ours in zip(images, fp32):
        theirs = ultralytics_predictions(checkpoints["detect"], image)
        assert len(ours.scores) == len(theirs.boxes) > 0
        # near-tied random scores may swap places: each of ours is one of theirs
        left = list(range(len(theirs.boxes)))
        boxes, scores = theirs.boxes.xyxy.numpy(), theirs.boxes.conf.numpy()
        classes = theirs.boxes.cls.numpy().astype(int)
        for box, score, label in zip(ours.boxes, ours.scores, ours.labels):
            match = [k for k in left if classes[k] == label - 1 and abs(scores[k] - score) <= 1e-4
                     and np.abs(boxes[k] - box).max() <= 0.5]
            assert match, (box, score, label)
            left.remove(match[0])
    # bf16: the best detections found again (a box of IoU >= 0.8 among its best 50)
    box_ious, _ = precision_agreement(fp32, bf16, images)
    agreeing = sum(iou >= 0.8 for iou in box_ious)
    assert agreeing >= 0.8 * len(box_ious), (agreeing, len(box_ious))


@pytest.mark.parametrize("task", ["segment", "detect"])
def test_fp16_runs_ultralytics_half_model_and_finds_fp32s_detections(checkpoints, task):
    """fp16 (a CUDA setting; refused for predictors on CPU) is AutoBackend's half model fed
    half images: AutoBackend keeps fp32 on a device named exactly ``cpu``, and halves the
    model on ``cpu:0``, so the fp16 path runs here as it does on CUDA, on CPU's fp16 kernels.
    Random weights: the best boxes are found again (IoU >= 0.95), masks mostly so."""
    from segpipe.model import yolo

    weights = resolve_weights(str(checkpoints[task]), yolo_spec())
    torch.set_num_threads(2)
    images = [photo(name) for name in PHOTOS]
    fp32 = yolo.Detector(weights.spec, weights.payload, torch.device("cpu")).predict(images, [True] * 4)
    half = yolo.Detector(weights.spec, weights.payload, torch.device("cpu", 0), "fp16")
    assert half.backend.fp16 and next(half.backend.model.parameters()).dtype == torch.float16
    fp16 = half.predict(images, [True] * 4)
    assert all(d.scores.dtype == d.boxes.dtype == np.float32 for d in fp16)
    assert [len(d.scores) > 0 for d in fp16] == [len(d.scores) > 0 for d in fp32]
    box_ious, mask_ious = precision_agreement(fp32, fp16, images,
                                              "ultralytics" if task == "segment" else None)
    print(f"{task}: box IoU min {min(box_ious):.3f}; mask IoU median "
          f"{np.median(mask_ious) if mask_ious else float('nan'):.3f}")   # docs/exactness.md
    assert len(box_ious) >= 10 and min(box_ious) >= 0.95, box_ious
    if task == "segment":
        assert len(mask_ious) == len(box_ious) and np.median(mask_ious) >= 0.9, mask_ious


def test_the_checkpoint_runs_no_code_and_mistakes_are_one_line(tmp_path, checkpoints):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    evil = tmp_path / "evil.pt"
    torch.save({"model": Payload(), "train_args": {}}, evil)
    with pytest.raises(ConfigError) as refused:
        resolve_weights(str(evil), yolo_spec())
    assert "without running code" in str(refused.value) and "\n" not in str(refused.value)
    assert not marker.exists()
    with pytest.raises(ConfigError, match="no pretrained weights"):
        resolve_weights("pretrained", yolo_spec())
    with pytest.raises(ConfigError, match="--tile cannot slice the masks"):
        resolve_weights(str(checkpoints["segment"]), yolo_spec(), tiled=True)
    resolve_weights(str(checkpoints["detect"]), yolo_spec(), tiled=True)   # boxes tile
    with pytest.raises(ConfigError, match="categories"):
        resolve_weights(str(checkpoints["segment"]), yolo_spec(),
                        categories=tuple(Category(k, f"c{k}") for k in (1, 2)))


def test_without_the_extra_the_arch_is_one_line(monkeypatch):
    import importlib.util

    from segpipe.model.families import check_installed

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "ultralytics" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install 'segpipe\[ultralytics\]'"):
        check_installed("ultralytics")
    check_installed("maskrcnn_resnet50_fpn")
