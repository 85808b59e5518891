"""Polygons of an RLE mask for labelling tools: pixel-edge rings, holes kept by keyhole cuts."""

from __future__ import annotations

import numpy as np


def mask_polygons(rle: dict) -> tuple[list[list[float]], bool]:
    """COCO polygons of the mask ``rle`` that trace its pixel edges, so that pycocotools
    rasterises them back to exactly the mask's pixels, holes included.

    One polygon per 8-connected part (rasterio's GDAL polygonize), with vertices on pixel
    corners. COCO has no polygon holes, so a part with holes is one "keyhole" ring: its outline,
    then each hole reached along a zero-width cut and walked round, and back along the same cut.
    The cut's two edges cancel under both the even-odd and the nonzero fill rule (GDAL winds
    holes opposite to outlines), so the holes stay holes. The second value says whether the
    mask had any.
    """
    from pycocotools import mask as mask_utils
    from rasterio import features

    x, y, w, h = (int(v) for v in mask_utils.toBbox(rle))
    crop = np.ascontiguousarray(mask_utils.decode(rle)[y:y + h, x:x + w], dtype=np.uint8)
    polygons, holes = [], False
    for geometry, _ in features.shapes(crop, mask=crop.astype(bool), connectivity=8):
        rings = [[(px + x, py + y) for px, py in ring[:-1]] for ring in geometry["coordinates"]]
        holes |= len(rings) > 1
        polygons.append([float(v) for point in keyhole_ring(rings) for v in point])
    return polygons, holes


def keyhole_ring(rings: list[list[tuple[float, float]]]) -> list[tuple[float, float]]:
    """One ring from an outline and its holes: each hole joined to the outline's first vertex
    by a cut to its nearest vertex, walked round, and left along the same cut."""
    outline = rings[0]
    ring = list(outline)
    start = outline[0]
    for hole in rings[1:]:
        j = min(range(len(hole)),
                key=lambda k: (hole[k][0] - start[0]) ** 2 + (hole[k][1] - start[1]) ** 2)
        ring += [start, *hole[j:], *hole[:j], hole[j]]
    return ring
