"""The detections of one image as the predictor hands them to the encode stage.

``ImageDetections`` holds them on the host; ``pack_detections`` turns a batch of them into the
predictor's output rows (raw array bytes per image, ``schema``'s inter-stage columns) and
``unpack_detections`` reads one row back. No torch here: the encode stage runs without it.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import pyarrow as pa

from segpipe import schema


@dataclass
class ImageDetections:
    """The detections of one image, on the host.

    Untiled, each row is a detection in original image pixels. Its soft mask is box-relative
    (R-CNN's M×M over its box) or, with ``mask_grids``, a crop of the model's mask map over
    the whole image (``model.grids``). A tiled image's rows are the
    *parts* of its merged detections (``tiles.merge_views``): ``boxes`` in the pixels of the
    part's view, ``windows`` the view's ``x0 y0 x1 y1`` in the image, ``groups`` the merged
    detection each part belongs to (non-decreasing; each detection's best part first).
    """

    labels: np.ndarray      # int32[N], the model's labels (CategoryTable maps them)
    scores: np.ndarray      # float32[N]
    boxes: np.ndarray       # float32[N, 4], x1 y1 x2 y2
    soft_masks: np.ndarray  # float32[N, M, M], mask probabilities for the predicted label;
                            # float32[N, 0, 0] for box-only detectors; with mask_grids,
                            # float32[sum of crop cells]: each detection's crop of the mask
                            # logits, end to end
    windows: Optional[np.ndarray] = None  # int32[N, 4] for tiled images
    groups: Optional[np.ndarray] = None   # int32[N] for tiled images
    mask_grids: Optional[np.ndarray] = None  # int32[N, 6] for masks over the image
                                             # (model.grids: grid_h grid_w x0 y0 x1 y1)

    @property
    def has_masks(self) -> bool:
        return self.mask_grids is not None or self.soft_masks.shape[-1] > 0

    @property
    def tiled(self) -> bool:
        return self.tile_parts() is not None

    def tile_parts(self) -> Optional[tuple[np.ndarray, np.ndarray]]:
        """``(windows, groups)`` of a tiled image's parts; None for an untiled image."""
        if self.groups is None:
            return None
        if self.windows is None:
            raise ValueError("a tiled image's detections need the window of each part")
        return self.windows, self.groups


def per_shape(images: Sequence[np.ndarray],
              predict: Callable[[list[np.ndarray]], list[ImageDetections]]) -> list[ImageDetections]:
    """``predict`` called once for the images of each shape (a batch a model takes whole,
    unpadded), its detections returned in ``images``' order."""
    by_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for k, image in enumerate(images):
        by_shape[image.shape].append(k)
    out: list[Optional[ImageDetections]] = [None] * len(images)
    for indices in by_shape.values():
        for k, found in zip(indices, predict([images[k] for k in indices])):
            out[k] = found
    return out  # type: ignore[return-value]


def group_bounds(groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(starts, ends)`` of each merged detection's parts in non-decreasing ``groups``."""
    starts = np.flatnonzero(np.diff(np.asarray(groups), prepend=-1))
    return starts, np.append(starts[1:], len(groups)).astype(np.int64)


def pack_detections(batch: pa.Table, statuses: list[str], errors: list[Optional[str]],
                    results: list[Optional[ImageDetections]], widths: Optional[list] = None,
                    heights: Optional[list] = None) -> pa.Table:
    """Build the predictor's output rows: per image, the detection arrays as raw bytes (and
    the image sizes, when given, else ``batch``'s)."""
    def packed(attr: str) -> pa.Array:
        return pa.array([getattr(r, attr).tobytes() if r is not None and getattr(r, attr)
                         is not None else b"" for r in results], pa.binary())

    return pa.table({
        **schema.image_columns(batch, statuses, errors, widths, heights),
        schema.NUM_DETECTIONS: pa.array([len(r.scores) if r is not None else 0 for r in results],
                                        pa.int32()),
        schema.MASK_SIZE: pa.array([r.soft_masks.shape[-1] if r is not None and r.mask_grids
                                    is None else 0 for r in results], pa.int32()),
        schema.LABELS: packed("labels"),
        schema.SCORES: packed("scores"),
        schema.BOXES: packed("boxes"),
        schema.SOFT_MASKS: packed("soft_masks"),
        schema.TILED: pa.array([r is not None and r.tiled for r in results], pa.bool_()),
        schema.WINDOWS: packed("windows"),
        schema.GROUPS: packed("groups"),
        schema.MASK_GRIDS: packed("mask_grids"),
    })


def unpack_detections(row: dict) -> ImageDetections:
    """Inverse of ``pack_detections`` for one row (a dict of column values)."""
    n, m = row[schema.NUM_DETECTIONS], row[schema.MASK_SIZE]
    tiled = row.get(schema.TILED)
    grids = row.get(schema.MASK_GRIDS)
    soft = np.frombuffer(row[schema.SOFT_MASKS], np.float32)
    return ImageDetections(
        labels=np.frombuffer(row[schema.LABELS], np.int32),
        scores=np.frombuffer(row[schema.SCORES], np.float32),
        boxes=np.frombuffer(row[schema.BOXES], np.float32).reshape(n, 4),
        soft_masks=soft if grids else soft.reshape(n, m, m),
        windows=np.frombuffer(row[schema.WINDOWS], np.int32).reshape(n, 4) if tiled else None,
        groups=np.frombuffer(row[schema.GROUPS], np.int32) if tiled else None,
        mask_grids=np.frombuffer(grids, np.int32).reshape(n, 6) if grids else None,
    )
