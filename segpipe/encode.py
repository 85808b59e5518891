"""Turn soft masks into binary masks and COCO RLE on the CPU, without full-image canvases.

``paste_mask_crops`` reproduces torchvision's ``paste_masks_in_image`` pixel for pixel, but
keeps only the part of each pasted mask that can be non-zero (its expanded box, clipped to the
image): the rest of torchvision's ``H×W`` canvas is zeros by construction. ``encode_rle`` then
builds the column-major runs of the full-size mask from the crop and lets pycocotools compress
them, so no ``H×W`` array is ever made per detection. ``encode_batch`` is the stage;
``MaskEncoder`` runs it in Ray Data actors. Each detection's label becomes the run's category
(``CategoryTable``); box-only detections get no mask, area or segmentation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Optional

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from torchvision.models.detection.roi_heads import expand_boxes, expand_masks

from segpipe import schema
from segpipe.categories import COCO_TABLE, CategoryTable
from segpipe.predictor import ImageDetections, unpack_detections


@dataclass
class MaskCrop:
    """A binary mask that is zero outside ``mask[y0:y0+h, x0:x0+w]`` of an image."""

    mask: np.ndarray  # bool[h, w]
    x0: int
    y0: int


def paste_mask_crops(soft_masks: np.ndarray, boxes: np.ndarray, height: int, width: int,
                     threshold: float) -> Iterator[MaskCrop]:
    """Paste each ``M×M`` soft mask into its box and binarise it at ``> threshold``.

    Same arithmetic as torchvision's ``paste_masks_in_image`` (one-pixel padding, box expanded
    by ``(M + 2) / M`` and truncated to integers, bilinear resize with
    ``align_corners=False``), so the crops equal torchvision's pasted masks ``> threshold``.
    """
    if len(boxes) == 0:
        return
    # torch.tensor copies: the arrays arrive as read-only buffers, and they are small (N×M×M).
    masks = torch.tensor(soft_masks, dtype=torch.float32)[:, None]
    padded, scale = expand_masks(masks, padding=1)
    expanded = expand_boxes(torch.tensor(boxes, dtype=torch.float32), scale)
    for mask, box in zip(padded, expanded.to(torch.int64).tolist()):
        bx0, by0, bx1, by1 = box
        w = max(bx1 - bx0 + 1, 1)
        h = max(by1 - by0 + 1, 1)
        x0, x1 = max(bx0, 0), min(bx1 + 1, width)
        y0, y1 = max(by0, 0), min(by1 + 1, height)
        if x1 <= x0 or y1 <= y0:
            yield MaskCrop(np.zeros((0, 0), bool), 0, 0)
            continue
        resized = F.interpolate(mask[None], size=(h, w), mode="bilinear", align_corners=False)
        crop = resized[0, 0, y0 - by0:y1 - by0, x0 - bx0:x1 - bx0]
        yield MaskCrop((crop > threshold).numpy(), x0, y0)


def crop_to_runs(crop: MaskCrop, height: int, width: int) -> np.ndarray:
    """Uncompressed COCO RLE counts (column-major, starting with zeros) of the full mask."""
    mask = crop.mask
    total = height * width
    if mask.size == 0 or not mask.any():
        return np.array([total], dtype=np.int64)
    hc, wc = mask.shape
    columns = np.zeros((wc, hc + 2), dtype=np.int8)  # each crop column, zero-padded at both ends
    columns[:, 1:-1] = mask.T
    steps = np.diff(columns, axis=1)
    start_col, start_row = np.nonzero(steps == 1)   # row-major order = column-major pixel order
    end_col, end_row = np.nonzero(steps == -1)
    starts = (crop.x0 + start_col).astype(np.int64) * height + crop.y0 + start_row
    ends = (crop.x0 + end_col).astype(np.int64) * height + crop.y0 + end_row
    joined = ends[:-1] == starts[1:]  # a run reaching a column's bottom continues at the next top
    if joined.any():
        starts = starts[np.concatenate(([True], ~joined))]
        ends = ends[np.concatenate((~joined, [True]))]
    bounds = np.empty(2 * len(starts), dtype=np.int64)
    bounds[0::2], bounds[1::2] = starts, ends
    counts = np.diff(np.concatenate(([0], bounds, [total])))
    return counts[:-1] if counts[-1] == 0 else counts  # pycocotools ends on the last run


def encode_rle(crop: MaskCrop, height: int, width: int) -> dict:
    """Compressed COCO RLE (``counts`` as str) of the ``height×width`` mask that ``crop`` is."""
    counts = crop_to_runs(crop, height, width)
    rle = mask_utils.frPyObjects({"size": [height, width], "counts": counts.tolist()},
                                 height, width)
    return {"size": [height, width], "counts": rle["counts"].decode("ascii")}


def quantise_soft_masks(soft_masks: np.ndarray) -> np.ndarray:
    """Probabilities in [0, 1] → uint8 (``round(p * 255)``), for storage in predictions/."""
    return np.clip(np.rint(soft_masks * 255.0), 0, 255).astype(np.uint8)


def dequantise_soft_mask(data: bytes) -> np.ndarray:
    """Inverse of ``quantise_soft_masks`` for one stored mask: an ``M×M`` float32 array."""
    q = np.frombuffer(data, np.uint8)
    m = int(round(len(q) ** 0.5))
    if m * m != len(q):
        raise ValueError(f"stored soft mask has {len(q)} values, not a square")
    return (q.astype(np.float32) / 255.0).reshape(m, m)


def rethreshold(detection: dict, height: int, width: int, mask_threshold: float) -> tuple[int, dict]:
    """``(area, segmentation)`` of a stored detection binarised at a new mask threshold."""
    soft = dequantise_soft_mask(detection["soft_mask"])[None]
    box = np.asarray([detection["box"]], np.float32)
    crop = next(paste_mask_crops(soft, box, height, width, mask_threshold))
    return int(crop.mask.sum()), encode_rle(crop, height, width)


def xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
    """COCO ``[x, y, width, height]`` from ``[x1, y1, x2, y2]``."""
    out = np.asarray(boxes, np.float32).copy()
    out[:, 2:] -= out[:, :2]
    return out


def encode_detections(det: ImageDetections, height: int, width: int, mask_threshold: float,
                      keep_soft_masks: bool = True,
                      categories: CategoryTable = COCO_TABLE) -> list[dict]:
    """The ``detections`` list of one output row (``schema.DETECTION`` dicts)."""
    count = len(det.boxes)
    if det.has_masks:
        crops: Iterator[Optional[MaskCrop]] = paste_mask_crops(det.soft_masks, det.boxes,
                                                               height, width, mask_threshold)
        stored = quantise_soft_masks(det.soft_masks) if keep_soft_masks else [None] * count
    else:
        crops, stored = iter([None] * count), [None] * count
    bboxes = xyxy_to_xywh(det.boxes)
    rows = []
    for label, score, bbox, box, soft, crop in zip(det.labels.tolist(), det.scores.tolist(),
                                                   bboxes.tolist(), det.boxes.tolist(), stored,
                                                   crops):
        category_id, name = categories.category_of(label)
        rows.append({
            "category_id": category_id,
            "category_name": name,
            "score": score,
            "bbox": bbox,
            "area": int(crop.mask.sum()) if crop is not None else None,
            "segmentation": encode_rle(crop, height, width) if crop is not None else None,
            "box": box,
            "soft_mask": soft.tobytes() if soft is not None else None,
        })
    return rows


def encode_batch(batch: pa.Table, mask_threshold: float, keep_soft_masks: bool = True,
                 categories: CategoryTable = COCO_TABLE) -> pa.Table:
    """Ray Data stage: predictor rows → rows of ``schema.PREDICTION_SCHEMA``.

    An image whose encoding fails becomes an error row; the others are unaffected.
    """
    rows = batch.to_pylist()
    statuses, errors, detections = [], [], []
    for row in rows:
        status, error, encoded = row["status"], row["error"], None
        if status == schema.STATUS_OK:
            try:
                encoded = encode_detections(unpack_detections(row), row["height"], row["width"],
                                            mask_threshold, keep_soft_masks, categories)
            except Exception as exc:
                status, error = schema.STATUS_ERROR, f"encode: {type(exc).__name__}: {exc}"
        statuses.append(status)
        errors.append(error)
        detections.append(encoded)
    return pa.table({
        **schema.image_columns(batch, statuses, errors),
        "detections": pa.array(detections, schema.PREDICTION_SCHEMA.field("detections").type),
    }, schema=schema.PREDICTION_SCHEMA)


class MaskEncoder:
    """Ray Data actor running ``encode_batch``: the encode stage as a small, long-lived pool.

    Encoding needs torch (the paste), and importing torch costs about 3.5 CPU-seconds. Plain
    tasks would pay that again whenever Ray replaces an idle worker process, which it does
    within a second on a node whose CPUs are held by predictor actors (measured on 2 cores:
    each encode batch started a fresh worker, and the import stole ~2.5 s from the
    predictors every time). An actor imports it once.

    ``monitor`` (a ``progress.RunMonitor`` actor, optional) is told how many images each
    batch finished, for the driver's progress line.
    """

    def __init__(self, mask_threshold: float, keep_soft_masks: bool = True,
                 categories: CategoryTable = COCO_TABLE, monitor: Optional[Any] = None):
        self.mask_threshold = mask_threshold
        self.keep_soft_masks = keep_soft_masks
        self.categories = categories
        self.monitor = monitor

    def __call__(self, batch: pa.Table) -> pa.Table:
        encoded = encode_batch(batch, self.mask_threshold, self.keep_soft_masks, self.categories)
        if self.monitor is not None:
            failed = encoded.column("status").to_pylist().count(schema.STATUS_ERROR)
            self.monitor.add.remote(encoded.num_rows - failed, failed)
        return encoded
