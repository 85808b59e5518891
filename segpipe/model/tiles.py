"""Slice huge images into tiles and merge the tiles' detections per image, in full-image pixels.

This is SAHI's sliced inference (slicing aided hyper inference), run inside the predictor
actors so that it scales with the cluster:

* **which images**: with ``tile`` set, an image whose longer side is larger than the tile is
  sliced; smaller images go through whole, resized by ``min_size``/``max_size`` as always;
* **windows** (``tile_windows``): SAHI's ``get_slice_bboxes`` rule. Tiles of ``size × size``
  start every ``size - overlap`` pixels; a tile that would cross the right or bottom edge is
  moved back inside the image, so every tile has the full size (when the image does);
* **views** (``image_views``): each tile is predicted at its own resolution (the model's
  resize is skipped, no down- or up-scaling); with ``full_pass`` the whole image is predicted
  as well, resized like an untiled image, so that objects larger than a tile are found;
* **merge** (``merge_views``): every view's detections are moved into full-image
  coordinates and merged with SAHI's greedy non-maximum merging (``GREEDYNMM``), class by
  class: in order of score (ties: x1, y1, x2, y2), each detection not yet taken keeps the
  same-class detections whose boxes overlap it by intersection over the smaller box (IOS)
  ``>= threshold``, and merges those that still overlap its growing box (SAHI's re-check);
  the merged detection's box is the union of the boxes, its score the highest, its mask
  the union of the masks. An object no larger than the overlap is seen whole by some tile,
  and its cut pieces in the neighbouring tiles lie inside that whole box (IOS 1), so it
  becomes one detection. Differences from SAHI, deliberately: a detection that SAHI's
  re-check refuses is kept as a detection of its own, where SAHI drops it; and (with
  ``join_seams``, the default) two detections of one view are never merged: that view's
  model kept them apart, and in crowded scenes IOS would glue nested objects of one class
  (a ring around a triangle, a cross over an ellipse) into one (docs/benchmarks.md);
* **seams** (``join_seams``, on unless ``join_seams=False``): an object larger than the
  overlap can be cut by every tile it touches, and its pieces overlap too little to merge
  by IOS (SAHI leaves them apart). Pieces cut by a tile edge inside the image are joined
  with the piece of the tile that saw past that edge when their boxes agree within the
  band both tiles see (``join_seams``).

The merged detections are returned as *parts*: each part keeps the box and soft mask the
model gave in its view (view pixels) and the view's window, so that the encode stage
pastes each part exactly as torchvision would in its tile (clipped to the tile) and unions
the parts' full-resolution RLEs; no ``H×W`` canvas is ever made.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from segpipe.model.detections import ImageDetections
from segpipe.model.spec import TileSettings

__all__ = ["View", "tile_windows", "image_views", "merge_views", "greedy_merge",
           "join_seams"]

#: A tile part whose box comes this close (px) to an edge of its tile inside the image is
#: cut by that edge (torchvision clips boxes to the tile, so a cut box ends on it).
SEAM_TOLERANCE = 1.0


@dataclass(frozen=True)
class View:
    """One part of an image the model sees: ``window`` is ``(x0, y0, x1, y1)`` in image
    pixels; ``resize``: the model's resize applies (the whole image), else the window is
    predicted at its own resolution (a tile)."""

    window: tuple[int, int, int, int]
    resize: bool


def tile_windows(height: int, width: int, size: int,
                 overlap: int) -> list[tuple[int, int, int, int]]:
    """The tiles of a ``height × width`` image, ``(x0, y0, x1, y1)``, row by row: SAHI's
    ``get_slice_bboxes`` for a square slice and an overlap in pixels."""
    windows = []
    y_min = y_max = 0
    while y_max < height:
        x_min = x_max = 0
        y_max = y_min + size
        while x_max < width:
            x_max = x_min + size
            if y_max > height or x_max > width:
                x_max, y_max = min(width, x_max), min(height, y_max)
                x_min, y_min = max(0, x_max - size), max(0, y_max - size)
            windows.append((x_min, y_min, x_max, y_max))
            x_min = x_max - overlap
        y_min = y_max - overlap
    return windows


def image_views(height: int, width: int, tiling: Optional[TileSettings]) -> list[View]:
    """What the model predicts for one image: the whole image, or its tiles (and the whole
    image as well with ``full_pass``)."""
    whole = View((0, 0, width, height), resize=True)
    if tiling is None or not tiling.applies(height, width):
        return [whole]
    views = [View(w, resize=False) for w in tile_windows(height, width, tiling.size,
                                                         tiling.overlap)]
    return views + [whole] if tiling.full_pass else views


def image_boxes(boxes: np.ndarray, windows: np.ndarray) -> np.ndarray:
    """Boxes given in their views' pixels, in full-image pixels (float64: exact sums)."""
    offsets = np.asarray(windows, np.float64)[:, [0, 1, 0, 1]]
    return np.asarray(boxes, np.float64).reshape(-1, 4) + offsets.reshape(-1, 4)


def merge_views(views: list[View], results: list[ImageDetections],
                tiling: Optional[TileSettings]) -> ImageDetections:
    """One image's detections from the detections of its views (``results[k]`` in
    ``views[k]``'s pixels): the parts of every merged detection, the merged detections in
    order of score (see the module doc). A single whole-image view is returned as it is."""
    if tiling is None or (len(views) == 1 and views[0].resize):
        return results[0]
    windows = np.concatenate([np.tile(np.asarray(v.window, np.int32), (len(r.scores), 1))
                              for v, r in zip(views, results)]).reshape(-1, 4)
    labels = np.concatenate([r.labels for r in results]).astype(np.int32)
    scores = np.concatenate([r.scores for r in results]).astype(np.float32)
    boxes = np.concatenate([r.boxes.reshape(-1, 4) for r in results]).astype(np.float32)
    m = max((r.soft_masks.shape[-1] for r in results), default=0)
    soft_masks = np.concatenate([r.soft_masks.reshape(len(r.scores), m, m) for r in results]) \
        if len(labels) else np.zeros((0, m, m), np.float32)
    from_tile = np.concatenate([np.full(len(r.scores), not v.resize)
                                for v, r in zip(views, results)]).astype(bool)
    full = image_boxes(boxes, windows)
    view_of = np.concatenate([np.full(len(r.scores), k) for k, r in enumerate(results)]
                             ).astype(np.int64) if tiling.join_seams else None
    groups = greedy_merge(full, scores, labels, tiling.merge_threshold, view_of)
    if tiling.join_seams:
        size = (max(v.window[3] for v in views), max(v.window[2] for v in views))
        groups = join_seams(groups, full, scores, labels, windows, from_tile, size,
                            tiling.merge_threshold)
    rank = np.empty(len(scores), np.int64)
    rank[score_order(full, scores)] = np.arange(len(scores))
    order = np.lexsort((rank, groups))   # by detection; its keeper (best score) first
    return ImageDetections(labels=labels[order], scores=scores[order], boxes=boxes[order],
                           soft_masks=np.ascontiguousarray(soft_masks[order]),
                           windows=windows[order], groups=groups[order])


def score_order(boxes: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Indices by score, best first; ties by x1, y1, x2, y2 (SAHI's order)."""
    return np.lexsort((boxes[:, 3], boxes[:, 2], boxes[:, 1], boxes[:, 0],
                       -np.asarray(scores, np.float64)))


def greedy_merge(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray,
                 threshold: float, views: Optional[np.ndarray] = None) -> np.ndarray:
    """SAHI's class-aware greedy NMM with IOS over full-image ``boxes``: for each detection,
    the number of the merged detection it is part of (merged detections numbered in order of
    their best score). With ``views`` (each detection's view), a merged detection takes at
    most one detection of each view: two that one view's model kept apart are two objects."""
    n = len(scores)
    groups = np.full(n, -1, np.int64)
    keeper_rank = np.zeros(n, np.int64)
    order = score_order(boxes, scores)
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n)
    keepers = []
    for label in np.unique(labels):
        members = order[labels[order] == label]   # this class, best first
        taken = np.zeros(len(members), bool)
        for i, idx in enumerate(members):
            if taken[i]:
                continue
            taken[i] = True
            groups[idx] = idx
            keepers.append(idx)
            rest = np.nonzero(~taken[i + 1:])[0] + i + 1
            if not len(rest):
                continue
            # SAHI compares its metric matrix in float32
            ios = intersection_over_smaller(boxes[idx], boxes[members[rest]]).astype(np.float32)
            close = ios >= threshold
            if views is not None:
                close &= views[members[rest]] != views[idx]
            matched = rest[close]
            taken[matched] = True
            merged = boxes[idx].copy()
            seen = {views[idx]} if views is not None else set()
            for j in members[matched]:
                # SAHI's re-check, on the grown box
                if intersection_over_smaller(merged, boxes[j:j + 1])[0] >= threshold and \
                        (views is None or views[j] not in seen):
                    if views is not None:
                        seen.add(views[j])
                    groups[j] = idx
                    merged = np.concatenate([np.minimum(merged[:2], boxes[j, :2]),
                                             np.maximum(merged[2:], boxes[j, 2:])])
                else:                                     # SAHI drops it; kept on its own
                    groups[j] = j
                    keepers.append(j)
    # number the merged detections by their keeper's place in the score order
    for number, keeper in enumerate(sorted(keepers, key=lambda k: rank[k])):
        keeper_rank[keeper] = number
    return keeper_rank[groups].astype(np.int32)


def join_seams(groups: np.ndarray, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray,
               windows: np.ndarray, from_tile: np.ndarray, size: tuple[int, int],
               threshold: float) -> np.ndarray:
    """Join merged detections that are pieces of one object cut by a seam (module doc).

    A tile part is *cut* where its box reaches (within ``SEAM_TOLERANCE`` px) an edge of its
    tile that is not the image's edge. It is joined with a same-class part of another tile
    that saw past that edge when, within the band both tiles see (their windows'
    intersection), the two boxes agree: IoU of the boxes clipped to the band ``>=
    threshold``. Both tiles see the same pixels there, so one object gives about the same
    box in both, and two objects side by side do not. ``groups`` are renumbered by best
    score, as ``greedy_merge`` numbers them.
    """
    height, width = size
    w = windows.astype(np.float64)
    near = SEAM_TOLERANCE
    cuts = np.stack([from_tile & (w[:, 0] > 0) & (boxes[:, 0] <= w[:, 0] + near),
                     from_tile & (w[:, 1] > 0) & (boxes[:, 1] <= w[:, 1] + near),
                     from_tile & (w[:, 2] < width) & (boxes[:, 2] >= w[:, 2] - near),
                     from_tile & (w[:, 3] < height) & (boxes[:, 3] >= w[:, 3] - near)], 1)
    parent = np.arange(int(groups.max()) + 1 if len(groups) else 0)

    def root(g: int) -> int:
        while parent[g] != g:
            parent[g] = parent[parent[g]]
            g = parent[g]
        return g

    for k in np.flatnonzero(cuts.any(1)):
        others = np.flatnonzero(from_tile & (labels == labels[k]) & (groups != groups[k])
                                & (windows != windows[k]).any(1))
        if not len(others):
            continue
        wk, wo = w[k], w[others]
        # the other tile saw past one of k's cut edges: that edge lies inside its window
        past = ((cuts[k, 0] & (wo[:, 0] < wk[0]) & (wk[0] < wo[:, 2]))
                | (cuts[k, 1] & (wo[:, 1] < wk[1]) & (wk[1] < wo[:, 3]))
                | (cuts[k, 2] & (wo[:, 0] < wk[2]) & (wk[2] < wo[:, 2]))
                | (cuts[k, 3] & (wo[:, 1] < wk[3]) & (wk[3] < wo[:, 3])))
        others, wo = others[past], wo[past]
        if not len(others):
            continue
        band = np.concatenate([np.maximum(wk[:2], wo[:, :2]), np.minimum(wk[2:], wo[:, 2:])], 1)
        mine = np.concatenate([np.maximum(boxes[k, :2], band[:, :2]),
                               np.minimum(boxes[k, 2:], band[:, 2:])], 1)
        theirs = np.concatenate([np.maximum(boxes[others, :2], band[:, :2]),
                                 np.minimum(boxes[others, 2:], band[:, 2:])], 1)
        for j in others[box_iou_pairs(mine, theirs) >= threshold]:
            parent[root(int(groups[k]))] = root(int(groups[j]))
    joined = np.array([root(int(g)) for g in groups], np.int64)
    best: dict[int, int] = {}
    for rank, k in enumerate(score_order(boxes, scores)):
        best.setdefault(int(joined[k]), rank)
    number = {g: n for n, g in enumerate(sorted(best, key=best.__getitem__))}
    return np.array([number[int(g)] for g in joined], np.int32)


def box_iou_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of ``a[i]`` with ``b[i]`` (``x1 y1 x2 y2``); 0 where either box is empty."""
    inter = _intersection(a, b)
    area_a, area_b = _area(a), _area(b)
    union = area_a + area_b - inter
    empty = (area_a <= 0) | (area_b <= 0)
    return np.where(empty | (union <= 0), 0.0, inter / np.where(union > 0, union, 1))


def intersection_over_smaller(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Intersection of ``box`` with each of ``others`` (``x1 y1 x2 y2``) over the smaller of
    the two areas (0 where that is 0)."""
    smaller = np.minimum(_area(box), _area(others))
    return np.where(smaller > 0, _intersection(box, others) / np.where(smaller > 0, smaller, 1),
                    0.0)


def _intersection(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection areas of ``x1 y1 x2 y2`` boxes, broadcast over their leading axes."""
    return (np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
            * np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0,
                      None))


def _area(boxes: np.ndarray) -> np.ndarray:
    """Areas of ``x1 y1 x2 y2`` boxes (0 for inverted ones)."""
    return (np.clip(boxes[..., 2] - boxes[..., 0], 0, None)
            * np.clip(boxes[..., 3] - boxes[..., 1], 0, None))
