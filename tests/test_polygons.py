"""Polygons that trace pixel edges: pycocotools rasterises them back to exactly the mask,
holes included (keyhole rings). No Ray: these run in the mutation-testing selection too."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from segpipe.encode.encoder import encode_masks
from segpipe.annotations.polygons import keyhole_ring, mask_polygons


def rle_of(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode()}


def rasterise(polygons: list, height: int, width: int) -> np.ndarray:
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
                             ).astype(bool)


@pytest.mark.parametrize("name", ["block", "pixel", "diagonal", "row", "column", "corner",
                                  "two parts", "ring"])
def test_polygons_trace_pixel_edges_and_rasterise_back_exactly(name):
    mask = np.zeros((12, 15), bool)
    if name == "block":
        mask[2:7, 3:11] = True
    elif name == "pixel":
        mask[5, 6] = True
    elif name == "diagonal":
        mask[2, 2] = mask[3, 3] = mask[4, 4] = True
    elif name == "row":
        mask[4, 1:14] = True
    elif name == "column":
        mask[:, 0] = True
    elif name == "corner":
        mask[9:, 12:] = True
    elif name == "two parts":
        mask[1:3, 1:3] = mask[8:11, 9:14] = True
    elif name == "ring":
        mask[1:10, 1:10] = True
        mask[4:6, 4:6] = False
    polygons, holes = mask_polygons(rle_of(mask))
    assert polygons and all(len(p) >= 8 and len(p) % 2 == 0 for p in polygons)
    assert all(float(v).is_integer() for p in polygons for v in p)  # on pixel corners
    assert holes == (name == "ring")
    np.testing.assert_array_equal(rasterise(polygons, *mask.shape), mask)
    if name == "two parts":
        assert len(polygons) == 2


def test_every_pasted_mask_gets_polygons_that_round_trip(tmp_path):
    """Masks as the encode stage pastes them (random soft masks, thin ones included)."""
    rng = np.random.default_rng(7)
    height, width = 90, 120
    soft = rng.random((300, 28, 28)).astype(np.float32) ** 3
    x1, y1 = rng.uniform(0, width - 2, 300), rng.uniform(0, height - 2, 300)
    boxes = np.stack([x1, y1, x1 + rng.uniform(0.5, 60, 300), y1 + rng.uniform(0.5, 40, 300)], 1)
    masks, holes = 0, 0
    rles, _ = encode_masks(soft, boxes.astype(np.float32), height, width, 0.5)
    for rle in rles:
        mask = mask_utils.decode(rle).astype(bool)
        if not mask.any():
            continue
        polygons, has_holes = mask_polygons(rle_of(mask))
        assert polygons, "a non-empty mask got no polygon"
        np.testing.assert_array_equal(rasterise(polygons, height, width), mask)
        masks += 1
        holes += has_holes
    assert masks > 100 and holes > 0
    print(f"polygons: {masks} pasted masks round-trip exactly, {holes} of them with holes")


def test_speckled_masks_with_many_holes_round_trip_exactly():
    rng = np.random.default_rng(1)
    for _ in range(100):
        mask = rng.random((30, 40)) > 0.35
        polygons, holes = mask_polygons(rle_of(mask))
        assert holes
        np.testing.assert_array_equal(rasterise(polygons, *mask.shape), mask)


def test_a_keyhole_ring_walks_the_outline_then_each_hole_and_back():
    outline = [(0, 0), (0, 9), (9, 9), (9, 0)]
    hole_a = [(2, 2), (3, 2), (3, 3), (2, 3)]
    hole_b = [(6, 6), (7, 6), (7, 7), (6, 7)]
    ring = keyhole_ring([outline, hole_a, hole_b])
    assert ring[:4] == outline
    # Each hole is entered from the outline's first vertex at its nearest vertex, walked
    # round once, and left along the same cut back to the first vertex.
    assert ring[4:10] == [(0, 0), (2, 2), (3, 2), (3, 3), (2, 3), (2, 2)]
    assert ring[10:] == [(0, 0), (6, 6), (7, 6), (7, 7), (6, 7), (6, 6)]
    assert keyhole_ring([outline]) == outline


def test_diagonal_neighbours_are_one_part():
    mask = np.zeros((6, 6), bool)
    mask[1, 1] = mask[2, 2] = mask[3, 3] = True
    polygons, _ = mask_polygons(rle_of(mask))
    assert len(polygons) == 1          # 8-connected: one polygon, touching at corners
