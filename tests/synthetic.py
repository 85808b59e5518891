"""Synthetic predictions/ folders written through the real sink (hand-made cases, large tables)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
from pycocotools import mask as mask_utils

from segpipe import schema
from segpipe.model.spec import ModelSpec
from segpipe.model.categories import COCO_TABLE
from segpipe.output.run_folder import predictions_dir
from segpipe.output.sinks import write_prediction_file
from segpipe.io.sources import image_id_for
from segpipe.model.settings import RunSettings

SETTINGS = RunSettings(
    model=ModelSpec(arch="maskrcnn_resnet50_fpn", min_size=800, max_size=1333, score_floor=0.05,
                    nms_threshold=0.5, detections_per_image=100, proposals_per_image=1000),
    weights_sha256="0" * 64, mask_threshold=0.5, soft_masks=True)


def box_detection(category_id: int, score: float, x: int, y: int, w: int, h: int,
                  height: int, width: int) -> dict:
    """A detection whose mask is exactly its (integer) box."""
    mask = np.zeros((width, height), np.uint8)   # the transpose: Fortran order for free
    mask[x:x + w, y:y + h] = 1
    rle = mask_utils.encode(mask.T)
    return {"category_id": category_id, "category_name": COCO_TABLE.category_of(category_id)[1],
            "score": score, "bbox": [float(x), float(y), float(w), float(h)],
            "area": int(mask.sum()),
            "segmentation": {"size": [height, width], "counts": rle["counts"].decode()},
            "box": [float(x), float(y), float(x + w), float(y + h)], "soft_mask": _BOX_SOFT_MASK}


#: the stored soft mask of every box detection: 1 inside a one-cell margin
_BOX_SOFT = np.zeros((28, 28), SETTINGS.soft_mask_dtype)
_BOX_SOFT[1:-1, 1:-1] = np.iinfo(SETTINGS.soft_mask_dtype).max
_BOX_SOFT_MASK = _BOX_SOFT.tobytes()


def image_row(file_name: str, width: int, height: int, detections: list[dict]) -> dict:
    return {"image_id": image_id_for(file_name), "file_name": file_name, "width": width,
            "height": height, "status": "ok", "error": None, "detections": detections}


def write_predictions(output: Path, rows: list[dict], rows_per_file: int = 1000,
                      settings: RunSettings = SETTINGS) -> None:
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
    categories = [ids[k % len(ids)] for k in range(per_image)]
    rows = []
    for i in range(images):
        corners, sides = rng.integers(0, 48, (per_image, 2)), rng.integers(1, 16, (per_image, 2))
        scores = rng.uniform(0.05, 1.0, per_image)
        dets = [box_detection(categories[k], float(scores[k]), int(corners[k, 0]),
                              int(corners[k, 1]), int(sides[k, 0]), int(sides[k, 1]), 64, 64)
                for k in range(per_image)]
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


def blob_rows(images: int, per_image: int, height: int, width: int, seed: int = 0,
              smallest: int = 16, largest: int = 120) -> list[dict]:
    """Rows of trained-like detections (``blob_detections``) encoded as the run's encode
    stage encodes them: masks pasted and binarised at 0.5, soft masks stored."""
    from segpipe.model.detections import ImageDetections
    from segpipe.encode.encoder import encode_detections

    rng = np.random.default_rng(seed)
    labels = sorted(COCO_TABLE.ids)[:12]
    rows = []
    for i in range(images):
        soft, boxes = blob_detections(per_image, height, width, seed=seed * 1000 + i,
                                      smallest=smallest, largest=largest)
        scores = np.sort(rng.uniform(0.05, 1.0, per_image))[::-1].astype(np.float32)
        det = ImageDetections(labels=np.array([labels[k % len(labels)] for k in rng.integers(0, 40, per_image)],
                                              np.int32),
                              scores=scores, boxes=boxes, soft_masks=soft)
        rows.append(image_row(f"blobs/{i:04d}.jpg", width, height,
                              encode_detections(det, height, width, SETTINGS.mask_threshold)))
    return rows


def simulated_review_set(images: int, height: int = 96, width: int = 128, seed: int = 0):
    """A set with exact ground truth and the detections of a *simulated* detector whose
    mistakes grow with each object's difficulty: ``(rows, truth)``, ``truth[file_name]`` a
    list of ``(category_id, mask)``.

    Ground truth: 1-4 smooth blobs an image (``blob_detections`` pasted at 0.5), classes
    drawn from a skewed table (3 common, 5 rare). Per object a difficulty ``d`` in [0, 1]:
    the score falls with ``d`` (``0.95 - 0.7 d`` + noise), the box shifts by up to ``0.3 d`` of
    its size, the soft mask is flattened towards 0.5 by ``d`` (less sure) and its edge moved,
    the class is swapped with probability ``0.02 + 0.4 d`` (rare classes are harder: ``d``
    is drawn higher); a quarter of the images get a low-scored false positive. A plumbing
    check of the review signals against errors, not a claim about real models."""
    from segpipe.encode.encoder import encode_masks
    from segpipe.model.detections import ImageDetections
    from segpipe.encode.encoder import encode_detections

    rng = np.random.default_rng(seed)
    common, rare = [1, 3, 62], [17, 18, 44, 77, 88]
    rows, truth = [], {}
    for i in range(images):
        count = int(rng.integers(1, 5))
        soft, boxes = blob_detections(count, height, width, seed=seed * 100_000 + i, smallest=20,
                                      largest=60)
        is_rare = rng.random(count) < 0.15
        classes = np.where(is_rare, rng.choice(rare, count), rng.choice(common, count))
        gt_rles, _ = encode_masks(soft, boxes, height, width, 0.5)
        name = f"sim/{i:05d}.jpg"
        truth[name] = [(int(c), mask_utils.decode(r | {"counts": r["counts"].encode()}).astype(bool))
                       for c, r in zip(classes, gt_rles)]
        d = np.clip(rng.beta(1.0, 5.0, count) + 0.3 * is_rare, 0, 1)
        scores = np.clip(0.95 - 0.7 * d + rng.normal(0, 0.05, count), 0.06, 0.999)
        size = (boxes[:, 2:] - boxes[:, :2])
        shift = rng.uniform(-1, 1, (count, 2)) * d[:, None] * size * 0.3
        boxes_p = boxes + np.concatenate([shift, shift], 1).astype(np.float32)
        logit = np.log(soft / (1 - soft + 1e-6) + 1e-6)
        soft_p = 1 / (1 + np.exp(-(logit * (1 - 0.85 * d)[:, None, None]
                                   + rng.normal(0, 1.5, soft.shape) * d[:, None, None])))
        swap = rng.random(count) < 0.02 + 0.4 * d
        labels = np.where(swap, rng.choice(common + rare, count), classes)
        if rng.random() < 0.25:   # a false positive
            fp_soft, fp_box = blob_detections(1, height, width, seed=seed * 100_000 + i + 50_000,
                                              smallest=15, largest=40)
            soft_p = np.concatenate([soft_p, fp_soft])
            boxes_p = np.concatenate([boxes_p, fp_box])
            scores = np.concatenate([scores, rng.uniform(0.35, 0.7, 1)])
            labels = np.concatenate([labels, rng.choice(common, 1)])
        det = ImageDetections(labels=labels.astype(np.int32), scores=scores.astype(np.float32),
                              boxes=boxes_p.clip(0, [width, height, width, height]).astype(np.float32),
                              soft_masks=soft_p.astype(np.float32))
        rows.append(image_row(name, width, height, encode_detections(det, height, width, 0.5)))
    return rows, truth


def image_errors(row: dict, truth: list, threshold: float = 0.5, iou_ok: float = 0.75) -> int:
    """Mistakes a labeller would fix in one image at ``threshold``: missed objects, false
    detections (wrong class or IoU < 0.5) and poor masks (IoU < ``iou_ok``), greedy matching
    by score."""
    kept = sorted((d for d in row["detections"] if d["score"] >= threshold), key=lambda d: -d["score"])
    unmatched = list(range(len(truth)))
    errors = 0
    for det in kept:
        mask = mask_utils.decode(det["segmentation"] | {"counts": det["segmentation"]["counts"].encode()}).astype(bool)
        best, best_iou = None, 0.0
        for k in unmatched:
            category, gt = truth[k]
            iou = (mask & gt).sum() / max((mask | gt).sum(), 1)
            if category == det["category_id"] and iou > best_iou:
                best, best_iou = k, iou
        if best is None or best_iou < 0.5:
            errors += 1
            continue
        unmatched.remove(best)
        errors += best_iou < iou_ok
    return errors + len(unmatched)
