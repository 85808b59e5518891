"""Turn soft masks into binary masks and COCO RLE on the CPU, without full-image canvases.

``encode_masks`` pastes every ``M×M`` soft mask of an image inside its box exactly as
torchvision's ``paste_masks_in_image`` does, binarises it with ``> threshold`` and hands the
run-length counts to pycocotools, which compresses them to COCO's RLE string: one compiled
pass per image (``paste.py``), never an ``H×W`` array per detection. ``encode_batch`` is the
stage; ``MaskEncoder`` runs it in Ray Data actors. Each detection's label becomes the run's
category (``CategoryTable``); box-only detections get no mask, area or segmentation.

Families whose masks are over the whole image (YOLO's prototypes, Mask2Former's queries) hand
each detection's crop of their mask logits instead (``ImageDetections.mask_grids``);
``grids.py`` makes their final masks as the family's library does (``ModelSpec.mask_frame``),
and predictions/ keeps the crops as logits (``GRID_DTYPES``).

Soft masks are kept in predictions/ so that ``segpipe export`` can binarise them at a new
threshold. How is a measured trade (``bench/soft_mask_storage.py``, docs/benchmarks.md),
``soft_mask_dtype`` in the config: uint16 (``round(p * 65535)``, the default) re-binarises
trained-like masks to within IoU 0.999 of a fresh run's, small ones pixel for pixel, at ~650
bytes per detection in zstd Parquet (pure-noise masks of random weights: worst 0.988);
float32 re-binarises every mask pixel for pixel at ~2,500 bytes. uint8 (what runs stored
before, still read) lost up to 0.016 IoU on larger masks and 0.11 on small ones.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import pyarrow as pa
from pycocotools import mask as mask_utils

from segpipe import schema
from segpipe.encode.paste import paste_runs
from segpipe.model.categories import COCO_TABLE, CategoryTable
from segpipe.model.detections import ImageDetections, group_bounds, unpack_detections
from segpipe.model.grids import grid_masks, split_crops
from segpipe.model.tiles import image_boxes

#: The full scale of each way soft masks are stored as integers (``float32`` keeps them as
#: the model gave them).
SOFT_MASK_SCALES = {"uint8": 255, "uint16": 65535}
#: How grid crops (mask logits, ``grids``) are stored for each ``soft_mask_dtype``: float16
#: in the bytes of uint16 (3 significant digits: a logit near 10 moves by 0.004), float32 as
#: computed.
GRID_DTYPES = {"uint16": "float16", "float32": "float32"}
#: The largest logit magnitude a grid crop stores (float16's range ends at 65504).
GRID_LOGIT_LIMIT = 60000.0


def encode_masks(soft_masks: np.ndarray, boxes: np.ndarray, height: int, width: int,
                 threshold: float, windows: Optional[np.ndarray] = None,
                 groups: Optional[np.ndarray] = None) -> tuple[list[dict], np.ndarray]:
    """COCO RLEs (``counts`` as str) of every soft mask pasted into its box and binarised at
    ``> threshold``, and their areas: torchvision's paste and pycocotools' encode, bit for bit.

    Tiled images (``tiles.py``): box ``k`` is in the pixels of ``windows[k]`` and pasted as in
    that tile; with ``groups`` (non-decreasing), the masks of each group are one detection's
    parts and its RLE is their union (pycocotools ``merge``, on the runs)."""
    counts, offsets, areas = paste_runs(soft_masks, boxes, height, width, threshold, windows)
    size = [height, width]
    compressed = mask_utils.frPyObjects(
        [{"size": size, "counts": counts[offsets[k]:offsets[k + 1]]} for k in range(len(areas))],
        height, width) if len(areas) else []
    if groups is not None and len(areas):
        starts, ends = group_bounds(groups)
        compressed = [compressed[a] if b - a == 1 else
                      mask_utils.merge(compressed[a:b], intersect=False)
                      for a, b in zip(starts, ends)]
        # area one RLE at a time: pycocotools' area() of a list overflows past 255 masks
        areas = np.array([areas[a] if b - a == 1 else int(mask_utils.area(rle))
                          for a, b, rle in zip(starts, ends, compressed)], np.int64)
    return [{"size": size, "counts": rle["counts"].decode("ascii")} for rle in compressed], areas


def quantise_soft_masks(soft_masks: np.ndarray,
                        dtype: str = schema.SOFT_MASK_DTYPE) -> np.ndarray:
    """Probabilities in [0, 1] → ``dtype`` (``round(p * scale)``; float32 as they are), for
    storage in predictions/."""
    if dtype == "float32":
        return np.ascontiguousarray(soft_masks, np.float32)
    scale = SOFT_MASK_SCALES[dtype]
    return np.clip(np.rint(soft_masks * np.float32(scale)), 0, scale).astype(dtype)


def dequantise_soft_masks(stored: Sequence[bytes], dtype: str) -> np.ndarray:
    """Inverse of ``quantise_soft_masks`` for stored masks: ``float32[N, M, M]``."""
    if not stored:
        return np.zeros((0, 0, 0), np.float32)
    q = np.frombuffer(b"".join(stored), dtype)
    per_mask = len(q) // len(stored)
    m = int(round(per_mask ** 0.5))
    if m * m != per_mask or per_mask * len(stored) != len(q):
        raise ValueError(f"stored soft masks of {sorted({len(s) for s in stored})} bytes are "
                         f"not squares of {dtype}")
    if dtype == "float32":
        return q.reshape(-1, m, m)
    return (q.astype(np.float32) / np.float32(SOFT_MASK_SCALES[dtype])).reshape(-1, m, m)


def quantise_logits(logits: np.ndarray, dtype: str = schema.SOFT_MASK_DTYPE) -> np.ndarray:
    """A grid crop's logits as stored for ``soft_mask_dtype`` ``dtype`` (``GRID_DTYPES``)."""
    return np.clip(logits, -GRID_LOGIT_LIMIT, GRID_LOGIT_LIMIT).astype(GRID_DTYPES[dtype])


def dequantise_crops(stored: Sequence[bytes], grids: np.ndarray, dtype: str) -> list[np.ndarray]:
    """Inverse of ``quantise_logits`` for stored grid crops (``grids``: each one's
    ``mask_grid``): ``float32[rows, columns]`` logits each."""
    values = np.frombuffer(b"".join(stored), GRID_DTYPES[dtype]).astype(np.float32)
    return split_crops(values, grids)


def rethreshold(detections: Sequence[dict], height: int, width: int, mask_threshold: float,
                dtype: str, mask_frame: Optional[str] = None) -> list[tuple[int, dict]]:
    """``(area, segmentation)`` of stored detections binarised at a new mask threshold; a
    tiled image's detection is the union of its ``parts``, each pasted in its window; with a
    ``mask_frame``, each detection's grid crop made into its mask (``grids``)."""
    if not detections:
        return []
    if mask_frame is not None:
        grids = np.asarray([det["mask_grid"] for det in detections], np.int64)
        boxes = np.asarray([det["box"] for det in detections], np.float32)
        crops = dequantise_crops([det["soft_mask"] for det in detections], grids, dtype)
        rles, areas = grid_masks(crops, grids, boxes, height, width, mask_threshold, mask_frame)
        return [(int(area), rle) for area, rle in zip(areas, rles)]
    whole = [0, 0, width, height]
    parts = [(d, part) for d, det in enumerate(detections) for part in (det.get("parts") or [det])]
    soft = dequantise_soft_masks([part["soft_mask"] for _, part in parts], dtype)
    boxes = np.asarray([part["box"] for _, part in parts], np.float32)
    windows = np.asarray([part.get("window") or whole for _, part in parts], np.int64)
    groups = np.asarray([d for d, _ in parts], np.int64)
    rles, areas = encode_masks(soft, boxes, height, width, mask_threshold, windows, groups)
    return [(int(area), rle) for area, rle in zip(areas, rles)]


def xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
    """COCO ``[x, y, width, height]`` from ``[x1, y1, x2, y2]``."""
    out = np.asarray(boxes, np.float32).copy()
    out[:, 2:] -= out[:, :2]
    return out


def encode_detections(det: ImageDetections, height: int, width: int, mask_threshold: float,
                      keep_soft_masks: bool = True, categories: CategoryTable = COCO_TABLE,
                      soft_mask_dtype: str = schema.SOFT_MASK_DTYPE,
                      mask_frame: Optional[str] = None) -> list[dict]:
    """The ``detections`` list of one output row (``schema.DETECTION`` dicts); a tiled
    image's parts become one detection per group, with its ``parts``; grid crops
    (``det.mask_grids``) made into masks by ``mask_frame`` (``grids.FRAMES``)."""
    count = len(det.boxes)
    if det.mask_grids is not None:
        return _encode_grid_detections(det, height, width, mask_threshold, keep_soft_masks,
                                       categories, soft_mask_dtype, mask_frame)
    stored: Sequence[Optional[bytes]] = [None] * count
    if det.has_masks and keep_soft_masks:
        stored = [q.tobytes() for q in quantise_soft_masks(det.soft_masks, soft_mask_dtype)]
    whole_masks: Sequence[Optional[bytes]]
    tiled = det.tile_parts()
    if tiled is not None:
        windows, groups = tiled
        starts, ends = group_bounds(groups)
        full = image_boxes(det.boxes, windows)
        boxes = np.stack([np.concatenate([full[a:b, :2].min(0), full[a:b, 2:].max(0)])
                          for a, b in zip(starts, ends)]).astype(np.float32) \
            if count else np.zeros((0, 4), np.float32)
        parts: list = [[{"box": det.boxes[k].tolist(), "window": windows[k].tolist(),
                         "soft_mask": stored[k]} for k in range(a, b)]
                       for a, b in zip(starts, ends)]
        firsts, whole_masks = starts, [None] * len(starts)
    else:
        boxes, parts, firsts, whole_masks = det.boxes, [None] * count, np.arange(count), stored
    areas: Sequence[Any] = [None] * len(firsts)
    rles: Sequence[Optional[dict]] = [None] * len(firsts)
    if det.has_masks:
        rles, found = encode_masks(det.soft_masks, det.boxes, height, width, mask_threshold,
                                   det.windows, det.groups)
        areas = found.tolist()
    rows = []
    for first, bbox, box, area, rle, soft, part in zip(
            firsts.tolist(), xyxy_to_xywh(boxes).tolist(), boxes.tolist(), areas, rles,
            whole_masks, parts):
        category_id, name = categories.category_of(int(det.labels[first]))
        rows.append({"category_id": category_id, "category_name": name,
                     "score": float(det.scores[first]), "bbox": bbox, "area": area,
                     "segmentation": rle, "box": box, "soft_mask": soft, "parts": part,
                     "mask_grid": None})
    return rows


def _encode_grid_detections(det: ImageDetections, height: int, width: int,
                            mask_threshold: float, keep_soft_masks: bool,
                            categories: CategoryTable, soft_mask_dtype: str,
                            mask_frame: Optional[str]) -> list[dict]:
    """``encode_detections`` of an untiled image whose masks are grid crops."""
    if mask_frame is None:
        raise ValueError("grid soft masks need the family's mask frame")
    assert det.mask_grids is not None
    crops = split_crops(det.soft_masks, det.mask_grids)
    rles, areas = grid_masks(crops, det.mask_grids, det.boxes, height, width, mask_threshold,
                             mask_frame)
    rows = []
    for k, (bbox, box, crop) in enumerate(zip(xyxy_to_xywh(det.boxes).tolist(), det.boxes.tolist(),
                                              crops)):
        category_id, name = categories.category_of(int(det.labels[k]))
        rows.append({"category_id": category_id, "category_name": name,
                     "score": float(det.scores[k]), "bbox": bbox, "area": int(areas[k]),
                     "segmentation": rles[k], "box": box, "parts": None,
                     "soft_mask": quantise_logits(crop, soft_mask_dtype).tobytes()
                     if keep_soft_masks else None,
                     "mask_grid": det.mask_grids[k].tolist()})
    return rows


def encode_batch(batch: pa.Table, mask_threshold: float, keep_soft_masks: bool = True,
                 categories: CategoryTable = COCO_TABLE,
                 soft_mask_dtype: str = schema.SOFT_MASK_DTYPE,
                 mask_frame: Optional[str] = None) -> pa.Table:
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
                                            mask_threshold, keep_soft_masks, categories,
                                            soft_mask_dtype, mask_frame)
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

    The compiled paste (``paste.py``) is loaded, or compiled on a node's first use, once per
    process. Plain tasks would pay that again whenever Ray replaces an idle worker process,
    which it does within a second on a node whose CPUs are held by predictor actors (measured
    on 2 cores when encoding imported torch: each encode batch started a fresh worker, and the
    import stole ~2.5 s from the predictors every time). An actor pays it once.

    ``monitor`` (a ``progress.RunMonitor`` actor, optional) is told how many images each
    batch finished, for the driver's progress line. ``mask_frame``: the family's
    (``ModelSpec.mask_frame``).
    """

    def __init__(self, mask_threshold: float, keep_soft_masks: bool = True,
                 categories: CategoryTable = COCO_TABLE, monitor: Optional[Any] = None,
                 soft_mask_dtype: str = schema.SOFT_MASK_DTYPE, mask_frame: Optional[str] = None):
        self.mask_threshold = mask_threshold
        self.keep_soft_masks = keep_soft_masks
        self.categories = categories
        self.monitor = monitor
        self.soft_mask_dtype = soft_mask_dtype
        self.mask_frame = mask_frame

    def __call__(self, batch: pa.Table) -> pa.Table:
        encoded = encode_batch(batch, self.mask_threshold, self.keep_soft_masks, self.categories,
                               self.soft_mask_dtype, self.mask_frame)
        if self.monitor is not None:
            failed = encoded.column("status").to_pylist().count(schema.STATUS_ERROR)
            self.monitor.add.remote(encoded.num_rows - failed, failed)
        return encoded
