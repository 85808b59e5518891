"""The compiled paste and RLE equal torchvision's paste and pycocotools' encode, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from torchvision.models.detection.roi_heads import paste_masks_in_image

from segpipe.encode.encoder import (
    dequantise_soft_masks,
    encode_masks,
    quantise_soft_masks,
    rethreshold,
    xyxy_to_xywh,
)
from segpipe.encode.paste import CHANNELS_LAST_MAX_SIDES, paste_runs
from synthetic import blob_detections


def random_boxes(rng, n, height, width, longest=40):
    x1 = rng.uniform(-5, width, n)
    y1 = rng.uniform(-5, height, n)
    boxes = np.stack([x1, y1, x1 + rng.uniform(0, longest, n), y1 + rng.uniform(0, longest, n)], 1)
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, width)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, height)
    return boxes.astype(np.float32)


def torchvision_masks(soft: np.ndarray, boxes: np.ndarray, height: int, width: int,
                      threshold: float) -> np.ndarray:
    """What the classic tutorial does: paste on full canvases, then ``> threshold``."""
    if len(boxes) == 0:
        return np.zeros((0, height, width), bool)
    pasted = paste_masks_in_image(torch.from_numpy(soft)[:, None], torch.from_numpy(boxes),
                                  (height, width))[:, 0]
    return (pasted > threshold).numpy()


def assert_equal_to_torchvision(soft, boxes, height, width, threshold):
    rles, areas = encode_masks(soft, boxes, height, width, threshold)
    expected = torchvision_masks(soft, boxes, height, width, threshold)
    assert len(rles) == len(areas) == len(boxes)
    for rle, area, mask in zip(rles, areas, expected):
        reference = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        assert rle == {"size": [height, width], "counts": reference["counts"].decode()}
        assert area == mask.sum()


@pytest.mark.slow
@pytest.mark.parametrize("height,width", [(37, 53), (1, 1), (5, 80), (64, 64), (300, 211)])
@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.5])
def test_noise_masks_equal_torchvision_paste_and_pycocotools_encode(height, width, threshold):
    """Random-weight mask heads draw noise: every stretch of pixels is computed one by one."""
    rng = np.random.default_rng(height * 1000 + width)
    soft = rng.random((120, 28, 28)).astype(np.float32)
    boxes = random_boxes(rng, 120, height, width, longest=max(40, height // 2))
    assert_equal_to_torchvision(soft, boxes, height, width, threshold)


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.9])
def test_blob_masks_of_all_sizes_equal_torchvision(threshold):
    """Trained-like masks from 4 to 500 px, where most stretches are classified whole."""
    for seed, (smallest, largest) in enumerate([(4, 40), (16, 500)]):
        soft, boxes = blob_detections(60, 480, 640, seed=seed, smallest=smallest,
                                      largest=largest)
        assert_equal_to_torchvision(soft, boxes, 480, 640, threshold)


@pytest.mark.parametrize("h", [1, 2, 29, 30, 31, 63, 64, 65, 97, 127, 128, 200])
def test_both_of_torchs_resize_kernels_are_reproduced_pixel_for_pixel(h):
    """torch resizes with one kernel when height + width <= 128 and another above: values
    (not just masks) must agree at both sides of the switch and at the 30 px identity."""
    from segpipe.encode.paste import _one_mask

    rng = np.random.default_rng(h)
    padded = np.zeros((30, 30), np.float32)
    padded[1:-1, 1:-1] = rng.random((28, 28), dtype=np.float32)
    for w in sorted({1, 30, max(1, CHANNELS_LAST_MAX_SIDES - h), CHANNELS_LAST_MAX_SIDES + 1 - h,
                     77, 256}):
        if w < 1:
            continue
        values = F.interpolate(torch.from_numpy(padded)[None, None], size=(h, w),
                               mode="bilinear", align_corners=False)[0, 0].numpy()
        # every distinct value as a threshold: a mask differs unless every value agrees
        for threshold in np.unique(values)[:: max(1, values.size // 40)]:
            runs, count = _one_mask(padded, 0, 0, w - 1, h - 1, 0, 0, w, h, h, np.float32(threshold),
                                    np.empty(16, np.int64))
            mask = np.zeros(h * w, bool)
            for j in range(count):
                mask[runs[2 * j]:runs[2 * j + 1]] = True
            np.testing.assert_array_equal(mask.reshape(w, h).T, values > threshold)


@pytest.mark.parametrize("box,expected_area", [
    ([0, 0, 7, 10], 7 * 10),           # the whole image
    ([2, 0, 5, 10], 3 * 10),           # full-height columns: runs join across columns
    ([0, 6, 7, 10], 7 * 4),            # touches the last pixel
    ([-30, -30, -20, -20], 0),         # outside the image
    ([3, 3, 3, 3], 1),                 # a zero-size box pastes into one pixel
])
def test_rle_edge_cases(box, expected_area):
    """Masks of ones (the padding's bilinear edge is cut at the box's own pixels)."""
    soft = np.ones((1, 28, 28), np.float32)
    rles, areas = encode_masks(soft, np.array([box], np.float32), 10, 7, 0.5)
    decoded = mask_utils.decode(rles[0]).astype(bool)
    assert decoded.sum() == areas[0]
    if box[0] >= 0:
        assert_equal_to_torchvision(soft, np.array([box], np.float32), 10, 7, 0.5)
    assert (areas[0] > 0) == (expected_area > 0)


def test_no_detections_give_no_masks():
    counts, offsets, areas = paste_runs(np.zeros((0, 28, 28), np.float32),
                                        np.zeros((0, 4), np.float32), 10, 10, 0.5)
    assert len(counts) == 0 and list(offsets) == [0] and len(areas) == 0
    rles, areas = encode_masks(np.zeros((0, 28, 28), np.float32), np.zeros((0, 4), np.float32),
                               10, 10, 0.5)
    assert rles == [] and len(areas) == 0


def test_xyxy_to_xywh():
    np.testing.assert_allclose(xyxy_to_xywh(np.array([[1, 2, 4, 8]], np.float32)), [[1, 2, 3, 6]])


@pytest.mark.parametrize("dtype,scale", [("uint16", 65535), ("uint8", 255)])
def test_stored_soft_masks_round_trip_and_re_paste(dtype, scale):
    rng = np.random.default_rng(3)
    soft = rng.random((5, 28, 28)).astype(np.float32)
    stored = [q.tobytes() for q in quantise_soft_masks(soft, dtype)]
    assert len(stored[0]) == 28 * 28 * np.dtype(dtype).itemsize
    back = dequantise_soft_masks(stored, dtype)
    assert np.abs(back - soft).max() <= 0.5 / scale + 1e-7
    boxes = random_boxes(rng, 5, 40, 60)
    detections = [{"soft_mask": s, "box": b.tolist()} for s, b in zip(stored, boxes)]
    rles, areas = encode_masks(back, boxes, 40, 60, 0.3)
    assert rethreshold(detections, 40, 60, 0.3, dtype) == \
        [(int(a), r) for a, r in zip(areas, rles)]
    with pytest.raises(ValueError, match="not squares"):
        dequantise_soft_masks([bytes(6)], dtype)
