"""Crop-only mask pasting and RLE from crops equal torchvision's paste and pycocotools' encode."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from torchvision.models.detection.roi_heads import paste_masks_in_image

from segpipe.encode import MaskCrop, encode_rle, paste_mask_crops, xyxy_to_xywh


def random_boxes(rng, n, height, width):
    x1 = rng.uniform(-5, width, n)
    y1 = rng.uniform(-5, height, n)
    boxes = np.stack([x1, y1, x1 + rng.uniform(0, 40, n), y1 + rng.uniform(0, 30, n)], 1)
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, width)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, height)
    return boxes.astype(np.float32)


def full_mask(crop: MaskCrop, height: int, width: int) -> np.ndarray:
    out = np.zeros((height, width), bool)
    h, w = crop.mask.shape
    out[crop.y0:crop.y0 + h, crop.x0:crop.x0 + w] = crop.mask
    return out


@pytest.mark.parametrize("height,width", [(37, 53), (1, 1), (5, 80), (64, 64)])
@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.5])
def test_crops_equal_torchvision_paste_and_rle_equals_pycocotools(height, width, threshold):
    rng = np.random.default_rng(height * 1000 + width)
    soft = rng.random((200, 28, 28)).astype(np.float32)
    boxes = random_boxes(rng, 200, height, width)
    pasted = paste_masks_in_image(torch.from_numpy(soft)[:, None], torch.from_numpy(boxes),
                                  (height, width))[:, 0].numpy() > threshold
    crops = list(paste_mask_crops(soft, boxes, height, width, threshold))
    assert len(crops) == len(boxes)
    for crop, expected in zip(crops, pasted):
        np.testing.assert_array_equal(full_mask(crop, height, width), expected)
        reference = mask_utils.encode(np.asfortranarray(expected.astype(np.uint8)))
        assert encode_rle(crop, height, width) == {"size": [height, width],
                                                   "counts": reference["counts"].decode()}


@pytest.mark.parametrize("mask,x0,y0", [
    (np.zeros((3, 4), bool), 2, 1),            # empty
    (np.ones((10, 7), bool), 0, 0),            # the whole image
    (np.ones((10, 3), bool), 2, 0),            # full-height columns: runs join across columns
    (np.ones((4, 7), bool), 0, 6),             # touches the last pixel
    (np.zeros((0, 0), bool), 0, 0),            # box outside the image
])
def test_rle_edge_cases(mask, x0, y0):
    crop = MaskCrop(mask, x0, y0)
    expected = full_mask(crop, 10, 7)
    rle = encode_rle(crop, 10, 7)
    np.testing.assert_array_equal(mask_utils.decode(rle).astype(bool), expected)
    assert rle["counts"] == mask_utils.encode(np.asfortranarray(expected.astype(np.uint8)))["counts"].decode()


def test_xyxy_to_xywh():
    np.testing.assert_allclose(xyxy_to_xywh(np.array([[1, 2, 4, 8]], np.float32)), [[1, 2, 3, 6]])


@pytest.mark.parametrize("count", [0, 1, 2])
def test_any_number_of_boxes_gives_that_many_crops(count):
    rng = np.random.default_rng(count)
    soft = rng.random((count, 28, 28)).astype(np.float32)
    boxes = random_boxes(rng, count, 40, 60)
    crops = list(paste_mask_crops(soft, boxes, 40, 60, 0.5))
    assert len(crops) == count
    if count:
        pasted = paste_masks_in_image(torch.from_numpy(soft)[:, None], torch.from_numpy(boxes),
                                      (40, 60))[:, 0].numpy() > 0.5
        for crop, expected in zip(crops, pasted):
            np.testing.assert_array_equal(full_mask(crop, 40, 60), expected)
