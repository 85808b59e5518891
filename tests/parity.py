"""Compare a run's Parquet rows with a library's own predictions (torchvision's model called
image by image; boxes and masks of any family)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageOps
from pycocotools import mask as mask_utils


def get_prediction(model, path: Path, mask_threshold: float) -> dict:
    """The classic tutorial's ``get_prediction``, made exact: EXIF, RGB, one image per call."""
    image = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    with torch.inference_mode():
        pred = model([TF.to_tensor(image)])[0]
    masks = pred.get("masks")
    return {
        "labels": pred["labels"].numpy(),
        "scores": pred["scores"].numpy(),
        "boxes": pred["boxes"].numpy(),
        "masks": (masks[:, 0] > mask_threshold).numpy() if masks is not None else None,
    }


def box_iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else float(np.array_equal(a, b))


def box_agreement(a, b) -> float:
    """1.0 for boxes whose corners agree within 0.01 px, else their IoU. Random weights
    predict slivers (0.04 px wide) whose IoU swings with float noise of 3e-4 px."""
    if np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max() <= 0.01:
        return 1.0
    return box_iou(a, b)


def decoded(rle: dict) -> np.ndarray:
    """The boolean mask of a stored RLE (``counts`` as str)."""
    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)


def mask_iou(a, b) -> float:
    union = np.logical_or(a, b).sum()
    return np.logical_and(a, b).sum() / union if union else 1.0


def precision_agreement(fp32: list, low: list, images: list,
                        mask_frame: Optional[str] = None) -> tuple[list, list]:
    """For each image's five best fp32 detections: the best box IoU among the first 50 of the
    lower-precision run ``low`` (bf16 or fp16), and (``mask_frame``: masks) the mask IoU of
    that match at threshold 0.5."""
    from segpipe.encode.encoder import encode_detections

    box_ious: list[float] = []
    mask_ious: list[float] = []
    for image, a, b in zip(images, fp32, low):
        if mask_frame:
            masks_a = encode_detections(a, *image.shape[:2], 0.5, mask_frame=mask_frame)
            masks_b = encode_detections(b, *image.shape[:2], 0.5, mask_frame=mask_frame)
        for k, box in enumerate(a.boxes[:5]):
            best, j = max(((box_iou(other, box), j) for j, other in enumerate(b.boxes[:50])),
                          default=(0.0, -1))
            box_ious.append(best)
            if mask_frame and best >= 0.8:
                mask_ious.append(mask_iou(decoded(masks_a[k]["segmentation"]),
                                          decoded(masks_b[j]["segmentation"])))
    return box_ious, mask_ious


def compare_with_torchvision(rows: dict[str, dict], images: Path, model, mask_threshold: float,
                             category_of: Optional[Callable[[int], int]] = None) -> tuple[int, int]:
    """Every torchvision detection has one of ours: same category (``category_of`` maps a
    model label to the run's category id; default: the label), score within 1e-3, box IoU >
    0.99 and, for mask models, mask IoU > 0.99. Returns (compared, pixel-identical masks)."""
    category_of = category_of or int
    compared = exact = 0
    for file_name, row in rows.items():
        ref = get_prediction(model, images / file_name, mask_threshold)
        ours = row["detections"]
        assert (row["width"], row["height"]) == Image.open(images / file_name).size
        assert len(ours) == len(ref["scores"]) > 0, file_name
        unused = set(range(len(ours)))
        masks = ref["masks"] if ref["masks"] is not None else [None] * len(ref["scores"])
        for label, score, box, mask in zip(ref["labels"], ref["scores"], ref["boxes"], masks):
            def iou_with(j):
                return box_agreement(box, np.array(ours[j]["box"]))
            candidates = [j for j in unused if ours[j]["category_id"] == category_of(label)]
            assert candidates, f"{file_name}: no detection of category {category_of(label)}"
            j = max(candidates, key=iou_with)
            unused.remove(j)
            assert iou_with(j) > 0.99
            x1, y1, x2, y2 = ours[j]["box"]
            np.testing.assert_allclose(ours[j]["bbox"], [x1, y1, x2 - x1, y2 - y1], atol=1e-3)
            assert abs(ours[j]["score"] - score) < 1e-3
            if mask is None:
                assert ours[j]["segmentation"] is None and ours[j]["area"] is None
            else:
                decoded = mask_utils.decode(ours[j]["segmentation"]).astype(bool)
                assert mask_iou(decoded, mask) > 0.99
                assert ours[j]["area"] == decoded.sum()
                exact += np.array_equal(decoded, mask)
            compared += 1
    return compared, exact
