"""Synthetic predictions/ folders written through the real sink (hand-made cases, large tables)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
from pycocotools import mask as mask_utils

from segpipe import schema
from segpipe.model.spec import ModelSpec
from segpipe.model.categories import COCO_TABLE
from segpipe.io.run_folder import predictions_dir
from segpipe.io.sinks import write_prediction_file
from segpipe.io.sources import image_id_for

SETTINGS = schema.RunSettings(
    model=ModelSpec(arch="maskrcnn_resnet50_fpn", min_size=800, max_size=1333, score_floor=0.05,
                    nms_threshold=0.5, detections_per_image=100, proposals_per_image=1000),
    weights_sha256="0" * 64, mask_threshold=0.5, soft_masks=True)


def box_detection(category_id: int, score: float, x: int, y: int, w: int, h: int,
                  height: int, width: int) -> dict:
    """A detection whose mask is exactly its (integer) box."""
    mask = np.zeros((height, width), np.uint8)
    mask[y:y + h, x:x + w] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    soft = np.zeros((28, 28), SETTINGS.soft_mask_dtype)
    soft[1:-1, 1:-1] = np.iinfo(SETTINGS.soft_mask_dtype).max
    return {"category_id": category_id, "category_name": COCO_TABLE.category_of(category_id)[1],
            "score": score, "bbox": [float(x), float(y), float(w), float(h)],
            "area": int(mask.sum()), "segmentation": {"size": [height, width],
                                                      "counts": rle["counts"].decode()},
            "box": [float(x), float(y), float(x + w), float(y + h)], "soft_mask": soft.tobytes()}


def image_row(file_name: str, width: int, height: int, detections: list[dict]) -> dict:
    return {"image_id": image_id_for(file_name), "file_name": file_name, "width": width,
            "height": height, "status": "ok", "error": None, "detections": detections}


def write_predictions(output: Path, rows: list[dict], rows_per_file: int = 1000,
                      settings: schema.RunSettings = SETTINGS) -> None:
    directory = predictions_dir(str(output))
    for start in range(0, len(rows), rows_per_file):
        table = pa.Table.from_pylist(rows[start:start + rows_per_file],
                                     schema=schema.PREDICTION_SCHEMA)
        write_prediction_file(table, directory, settings)


def large_predictions(output: Path, images: int, per_image: int = 100, seed: int = 0,
                      rows_per_file: int = 500) -> int:
    """``images × per_image`` detections of random boxes on 64×64 images; returns the count."""
    rng = np.random.default_rng(seed)
    ids = sorted(COCO_TABLE.ids)
    template = [box_detection(ids[k % len(ids)], 0.0, 0, 0, 1, 1, 64, 64) for k in range(per_image)]
    rows = []
    for i in range(images):
        dets = []
        for k in range(per_image):
            x, y = (int(v) for v in rng.integers(0, 48, 2))
            w, h = (int(v) for v in rng.integers(1, 16, 2))
            det = box_detection(template[k]["category_id"], float(rng.uniform(0.05, 1.0)),
                                x, y, w, h, 64, 64)
            dets.append(det)
        dets.sort(key=lambda d: -d["score"])
        rows.append(image_row(f"img_{i:07d}.jpg", 64, 64, dets))
        if len(rows) == rows_per_file:
            write_predictions(output, rows, rows_per_file)
            rows = []
    if rows:
        write_predictions(output, rows, rows_per_file)
    return images * per_image


def blob_detections(count: int, height: int, width: int, seed: int = 0, smallest: int = 16,
                    largest: int = 500, mask_size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """``(soft_masks float32[N, M, M], boxes float32[N, 4])`` shaped like a trained Mask
    R-CNN's output on an image: box sides log-uniform in [smallest, largest] px (aspect 1:2 to
    2:1, placed anywhere, some cut by the image edge), each mask a smooth blob (an ellipse
    with a wavy outline and now and then a hole) whose probability falls from ~1 to ~0 over
    about one cell of the M×M grid, as trained mask heads' sigmoids do. Random-weight mask
    heads give pixel noise instead, which no real model produces."""
    rng = np.random.default_rng(seed)
    side = np.exp(rng.uniform(np.log(smallest), np.log(largest), count))
    aspect = np.exp(rng.uniform(np.log(0.5), np.log(2.0), count))
    w, h = side * np.sqrt(aspect), side / np.sqrt(aspect)
    x1, y1 = rng.uniform(-0.2 * w, width - 0.8 * w), rng.uniform(-0.2 * h, height - 0.8 * h)
    boxes = np.stack([x1, y1, x1 + w, y1 + h], 1).clip(0, [width, height, width, height])
    grid = (np.arange(mask_size) + 0.5) / mask_size * 2 - 1            # cell centres in [-1, 1]
    gy, gx = np.meshgrid(grid, grid, indexing="ij")
    angle = np.arctan2(gy, gx)
    masks = np.empty((count, mask_size, mask_size), np.float32)
    for k in range(count):
        ry, rx = rng.uniform(0.55, 0.95, 2)
        wave = 1 + 0.12 * np.sin(rng.integers(2, 6) * angle + rng.uniform(0, 6.3))
        inside = (1 - np.hypot(gx / rx, gy / ry) / wave) * mask_size / 2   # ~ cells from edge
        if rng.random() < 0.2:   # a hole
            cy, cx = rng.uniform(-0.3, 0.3, 2)
            inside = np.minimum(inside, (np.hypot(gx - cx, gy - cy) - 0.2) * mask_size / 2)
        masks[k] = 1 / (1 + np.exp(-rng.uniform(2, 5) * inside))
    return masks, boxes.astype(np.float32)
