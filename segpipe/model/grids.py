"""Masks over the whole image at a model's mask resolution (YOLO's prototypes, Mask2Former's
queries), binarised as the family's own library makes its final masks, without an ``H×W``
float map per detection.

Such a family hands the encoder each detection's mask logits on a *grid*, the model's
mask map over its whole (letterboxed or resized) input, cut to the cells the detection can
reach: ``grid = (grid_h, grid_w, x0, y0, x1, y1)`` says the crop holds cells
``[y0:y1, x0:x1]`` of a ``grid_h × grid_w`` map. A *frame* (``FRAMES``) says how the library
turns that map into the final mask, step by step, each step as torch computes it
(``F.interpolate``, bilinear without aligned corners, and nearest):

* ``ultralytics`` (``ops.process_mask_native``): the logits upsampled by 1, 2 or 4 (the
  smallest factor that crops the letterbox on whole pixels), the letterbox cropped away,
  resized bilinearly to the image, ``> 0`` (probability 0.5), then kept inside the box;
* ``mask2former`` (``post_process_instance_segmentation``): the logits resized bilinearly to
  384 × 384, ``> 0``, then resized to the image by nearest neighbour.

Bilinear interpolation is separable, so a step is a matrix per axis; a frame's steps compose
into one matrix per axis, from the grid's rows (columns) to the image's, computed only for the
rows and columns the detection can cover. The crops hold *logits*, as the libraries
interpolate them: probabilities saturate (float32's sigmoid is 1.0 past a logit of 17, and
trained masks reach 30 and more), and interpolating saturated values moves every edge between
a confident cell and its neighbour. A mask threshold ``t`` compares the interpolated logits
with ``log(t / (1 - t))`` (0.5: 0).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np

#: How far (cells) a grid crop reaches past what a detection covers: the bilinear steps read
#: at most one cell past each side, and a factor-4 upsampling blurs by a quarter cell more.
GRID_MARGIN = 2
#: The size Mask2Former's instance post-processing resizes every mask to before thresholding.
MASK2FORMER_SIDE = 384
#: A crop of a mask over the whole image (Mask2Former's) reaches every cell above this
#: probability, and two cells more: its masks are exact at any mask threshold from here up.
GRID_FLOOR = 0.01


def bilinear_weights(in_size: int, out_size: int, scale: Optional[float] = None) -> np.ndarray:
    """``out_size × in_size`` weights of torch's bilinear resize along one axis
    (``align_corners=False``; ``scale``: the ``scale_factor`` given, else sizes decide), the
    source positions computed in float32 as torch's CPU kernel computes them."""
    step = np.float32(1.0 / scale) if scale else np.float32(in_size) / np.float32(out_size)
    source = step * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
    source = np.maximum(source, np.float32(0.0))
    low = source.astype(np.int64)
    high = np.minimum(low + 1, in_size - 1)
    upper = (source - low.astype(np.float32)).astype(np.float64)
    weights = np.zeros((out_size, in_size))
    rows = np.arange(out_size)
    np.add.at(weights, (rows, low), 1.0 - upper)
    np.add.at(weights, (rows, high), upper)
    return weights


def nearest_index(in_size: int, out_size: int) -> np.ndarray:
    """Torch's nearest-neighbour source index of each output position (sizes decide)."""
    step = np.float32(in_size) / np.float32(out_size)
    source = np.floor(np.arange(out_size, dtype=np.float32) * step).astype(np.int64)
    return np.minimum(source, in_size - 1)


def ultralytics_axes(grid_h: int, grid_w: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Per axis, the weights from the prototype grid to the image's pixels of
    ``ops.process_mask_native`` (its upsampling, letterbox crop and resize)."""
    gain = min(4 * grid_h / height, 4 * grid_w / width)
    pad = (4 * grid_h - max(round(height * gain), 1)) | (4 * grid_w - max(round(width * gain), 1))
    factor = 4 // math.gcd(4, pad | pad // 2)
    up_h, up_w = factor * grid_h, factor * grid_w
    gain = min(up_h / height, up_w / width)   # ops.scale_masks, no ratio_pad
    pad_w, pad_h = (up_w - max(round(width * gain), 1)) / 2, (up_h - max(round(height * gain), 1)) / 2
    top, left = round(pad_h - 0.1), round(pad_w - 0.1)
    bottom, right = top + max(round(height * gain), 1), left + max(round(width * gain), 1)

    def axis(cells: int, up: int, start: int, stop: int, out: int) -> np.ndarray:
        first = bilinear_weights(cells, up, float(factor)) if factor > 1 else np.eye(cells)
        return bilinear_weights(stop - start, out) @ first[start:stop]

    return axis(grid_h, up_h, top, bottom, height), axis(grid_w, up_w, left, right, width)


def logit(threshold: float) -> float:
    """The logit a probability threshold stands for (0.5: 0)."""
    return math.log(threshold) - math.log1p(-threshold)


def ultralytics_mask(logits: np.ndarray, grid: np.ndarray, box: np.ndarray, height: int, width: int,
                     threshold: float) -> tuple[int, int, np.ndarray]:
    """The final mask of one YOLO detection (its crop's ``logits``), inside its box: ``(y0, x0, mask)``, the box's
    rows and columns of the image (``ops.crop_mask``: pixels whose index is ``>= x1`` and
    ``< x2``)."""
    grid_h, grid_w, gx0, gy0, gx1, gy1 = (int(v) for v in grid)
    x1, y1, x2, y2 = (float(v) for v in box)
    cols = np.arange(width)[(np.arange(width) >= x1) & (np.arange(width) < x2)]
    rows = np.arange(height)[(np.arange(height) >= y1) & (np.arange(height) < y2)]
    if not len(rows) or not len(cols):
        return 0, 0, np.zeros((0, 0), bool)
    weights_y, weights_x = _axes(("ultralytics", grid_h, grid_w, height, width))
    values = (weights_y[rows][:, gy0:gy1] @ logits.astype(np.float64) @ weights_x[cols][:, gx0:gx1].T)
    return int(rows[0]), int(cols[0]), values > logit(threshold)


def mask2former_mask(logits: np.ndarray, grid: np.ndarray, box: np.ndarray, height: int, width: int,
                     threshold: float) -> tuple[int, int, np.ndarray]:
    """The final mask of one Mask2Former detection (its crop's ``logits``), over the image:
    ``(0, 0, mask)``. A pixel of the square that reads a cell past the crop is off: the
    crop's last ``GRID_MARGIN`` cells, and all past them, are below ``GRID_FLOOR``."""
    grid_h, grid_w, gx0, gy0, gx1, gy1 = (int(v) for v in grid)
    weights_y, weights_x = _axes(("mask2former", grid_h, grid_w, MASK2FORMER_SIDE, MASK2FORMER_SIDE))

    def within(weights: np.ndarray, start: int, stop: int) -> np.ndarray:
        return ~np.any(weights[:, :start] != 0, axis=1) & ~np.any(weights[:, stop:] != 0, axis=1)

    square = (weights_y[:, gy0:gy1] @ logits.astype(np.float64) @ weights_x[:, gx0:gx1].T) > logit(threshold)
    square &= within(weights_y, gy0, gy1)[:, None] & within(weights_x, gx0, gx1)[None, :]
    return 0, 0, square[nearest_index(MASK2FORMER_SIDE, height)][:, nearest_index(MASK2FORMER_SIDE, width)]


_AXES: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}


def _axes(key: tuple) -> tuple[np.ndarray, np.ndarray]:
    """The per-axis weights of a frame for a grid and an image size, kept for the next
    detection of the same shapes (an image's detections share them)."""
    if key not in _AXES:
        if len(_AXES) > 64:
            _AXES.clear()
        kind, grid_h, grid_w, height, width = key
        _AXES[key] = ultralytics_axes(grid_h, grid_w, height, width) if kind == "ultralytics" \
            else (bilinear_weights(grid_h, height), bilinear_weights(grid_w, width))
    return _AXES[key]


#: Each frame's final mask of one detection: ``(logits, grid, box, height, width, threshold)`` →
#: ``(y0, x0, mask)``, the mask's rows and columns from ``(y0, x0)`` of the image.
FRAMES: dict[str, Callable[..., tuple[int, int, np.ndarray]]] = {
    "ultralytics": ultralytics_mask,
    "mask2former": mask2former_mask,
}


def ultralytics_window(box: np.ndarray, grid_h: int, grid_w: int, height: int,
                       width: int) -> tuple[int, int, int, int]:
    """``(x0, y0, x1, y1)``: the prototype cells ``ultralytics_mask`` reads for a box, the
    least crop of the grid that gives the detection's final mask at any threshold."""
    weights_y, weights_x = _axes(("ultralytics", grid_h, grid_w, height, width))
    x1, y1, x2, y2 = (float(v) for v in box)

    def cells(weights: np.ndarray, low: float, high: float) -> tuple[int, int]:
        inside = np.arange(len(weights))
        used = np.flatnonzero(np.any(weights[(inside >= low) & (inside < high)] != 0, axis=0))
        return (int(used[0]), int(used[-1]) + 1) if len(used) else (0, 0)

    (gx0, gx1), (gy0, gy1) = cells(weights_x, x1, x2), cells(weights_y, y1, y2)
    return gx0, gy0, gx1, gy1


def grid_shapes(grids: np.ndarray) -> list[tuple[int, int]]:
    """The ``(rows, columns)`` of each detection's crop."""
    return [(int(g[5] - g[3]), int(g[4] - g[2])) for g in grids]


def split_crops(flat: np.ndarray, grids: np.ndarray) -> list[np.ndarray]:
    """Each detection's crop from their values laid end to end."""
    crops, at = [], 0
    for rows, cols in grid_shapes(grids):
        crops.append(flat[at:at + rows * cols].reshape(rows, cols))
        at += rows * cols
    return crops


def grid_masks(crops: list[np.ndarray], grids: np.ndarray, boxes: np.ndarray, height: int,
               width: int, threshold: float, frame: str) -> tuple[list[dict], np.ndarray]:
    """COCO RLEs (``counts`` as str) and areas of the final masks of ``crops`` (each
    detection's mask logits on its ``grids`` row) under ``frame``."""
    from pycocotools import mask as mask_utils

    make = FRAMES[frame]
    rles, areas = [], []
    for logits, grid, box in zip(crops, grids, boxes):
        y0, x0, region = make(logits, grid, box, height, width, threshold)
        canvas = np.zeros((height, width), np.uint8, order="F")
        canvas[y0:y0 + region.shape[0], x0:x0 + region.shape[1]] = region
        rle = mask_utils.encode(canvas)
        rles.append({"size": [height, width], "counts": rle["counts"].decode("ascii")})
        areas.append(int(region.sum()))
    return rles, np.asarray(areas, np.int64)
