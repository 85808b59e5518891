"""torchvision's R-CNN post-processing for a whole batch at once: the RPN's proposal filter and
the box head's detection filter, each suppressing the boxes of all images together.

torchvision post-processes a batch image by image (``RegionProposalNetwork.filter_proposals``,
``RoIHeads.postprocess_detections``): per image a clip, two filters, ``batched_nms`` and a
top-k, each a few kernel launches and host synchronisations: on a GPU they hold a batch up
(NMS took 40 of 119 ms a batch of 16 in the H100 profile, docs/benchmarks.md). Here every step
runs once on the whole batch: boxes are clipped to their own image's size by one clamp,
filtered by one mask, and suppressed by ``grouped_nms`` whose groups are (image, level) in the
RPN and (image, class) in the box head, the way ``batched_nms`` groups by level or class
within one image, on each image's best candidates only, as many as decide its kept boxes
(``_kept_top``).

Exactness: the same arithmetic as torchvision's per-image code, so in fp32 the detections are
the same bit for bit (``tests/test_batched_postprocess.py``). ``grouped_nms`` computes each IoU
with the formula and the operation order of torchvision's CPU kernel, and finds greedy NMS's
result as the fixed point of a batched matrix iteration (Cluster-NMS, Zheng et al. 2020: the
fixed point is unique and is greedy NMS's); where torchvision's ``batched_nms`` would offset
one image's boxes by class (its "coordinate trick", chosen by the number of boxes and the
device), the same offsets are applied, so the same rounding decides the same borderline
overlaps. One difference is by design: boxes of exactly equal score are taken in the order of
their index (torchvision's order for equal scores is whatever its unstable sort gives).

``install(model)`` puts both on a model instance (its class and every other model stay as
they are); ``rcnn.Detector`` installs them where they pay, on CUDA devices (on a CPU the dense
IoU matrices cost more than the loops they replace: docs/benchmarks.md).
"""

from __future__ import annotations

import types
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork

__all__ = ["grouped_nms", "filter_proposals", "postprocess_detections", "install"]

#: torchvision's ``batched_nms`` offsets boxes by class up to this many numbers (4 per box),
#: and calls ``nms`` class by class above it (``torchvision.ops.boxes.batched_nms``).
COORDINATE_TRICK_LIMIT = {"cpu": 4000, "cuda": 100_000}
#: Most (row, column) pairs one dense step of ``grouped_nms`` holds (memory: ~5 bytes each
#: for every temporary).
PAIRS_PER_STEP = 1 << 24


def _below(threshold: float) -> torch.Tensor:
    """The largest float32 at or below ``threshold``: for a float32 IoU ``v``,
    ``v > threshold`` (torchvision compares in double) is ``v > _below(threshold)``."""
    t = np.float32(threshold)
    if float(t) > threshold:
        t = np.nextafter(t, np.float32(-np.inf))
    return torch.tensor(float(t), dtype=torch.float32)


def _suppression(boxes: torch.Tensor, areas: torch.Tensor, valid: torch.Tensor,
                 threshold: torch.Tensor) -> torch.Tensor:
    """``S[g, i, j]``: box ``i`` of group ``g`` suppresses box ``j`` if kept (``i`` before
    ``j``), by the IoU of torchvision's CPU NMS kernel, operation for operation."""
    x1, y1, x2, y2 = boxes.unbind(-1)                                  # G×n each
    xx1 = torch.maximum(x1[:, :, None], x1[:, None, :])
    yy1 = torch.maximum(y1[:, :, None], y1[:, None, :])
    xx2 = torch.minimum(x2[:, :, None], x2[:, None, :])
    yy2 = torch.minimum(y2[:, :, None], y2[:, None, :])
    inter = (xx2 - xx1).clamp_(min=0) * (yy2 - yy1).clamp_(min=0)
    del xx1, yy1, xx2, yy2
    overlap = inter / (areas[:, :, None] + areas[:, None, :] - inter)
    n = boxes.shape[1]
    later = torch.ones(n, n, dtype=torch.bool, device=boxes.device).triu_(1)
    return (overlap > threshold.to(boxes.device)) & later & valid[:, None, :] & valid[:, :, None]


def _greedy_keep(suppresses: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Greedy NMS's kept boxes as the fixed point of ``keep = valid & ~any_i(S[i] & keep[i])``,
    reached in at most n steps (after step t the first t boxes are decided)."""
    weights = suppresses.to(torch.float32)
    keep = valid
    for _ in range(valid.shape[1] + 1):
        hit = torch.bmm(keep.to(torch.float32)[:, None, :], weights)[:, 0] > 0
        now = valid & ~hit
        if torch.equal(now, keep):
            break
        keep = now
    return keep


def grouped_nms(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor,
                iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression within each group, all groups at once: a boolean mask
    over ``boxes`` (N×4, x1 y1 x2 y2) of the kept ones. Within a group boxes are taken by
    decreasing score, equal scores by increasing index; a box is dropped when a kept box of
    its group overlaps it by IoU > ``iou_threshold``, computed as torchvision's ``nms``
    computes it (float32 boxes: the same decisions bit for bit)."""
    n = boxes.shape[0]
    kept = torch.zeros(n, dtype=torch.bool, device=boxes.device)
    if n == 0:
        return kept
    by_score = torch.sort(scores, descending=True, stable=True).indices
    order = by_score[torch.sort(groups[by_score], stable=True).indices]
    sizes = torch.unique_consecutive(groups[order], return_counts=True)[1]
    starts = torch.cumsum(sizes, 0) - sizes
    by_size = torch.sort(sizes, descending=True, stable=True).indices
    sizes_host, starts_host = sizes[by_size].tolist(), starts[by_size].tolist()
    ordered = boxes[order]
    x1, y1, x2, y2 = ordered.unbind(1)
    areas = (x2 - x1) * (y2 - y1)
    threshold = _below(iou_threshold)
    first = 0
    while first < len(sizes_host):
        width = sizes_host[first]
        last = min(len(sizes_host), first + max(1, PAIRS_PER_STEP // (width * width)))
        count = torch.tensor(sizes_host[first:last], device=boxes.device)
        rank = torch.arange(width, device=boxes.device)
        valid = rank[None, :] < count[:, None]
        index = (torch.tensor(starts_host[first:last], device=boxes.device)[:, None]
                 + rank[None, :]).clamp_(max=n - 1)
        keep = _greedy_keep(_suppression(ordered[index], areas[index], valid, threshold), valid)
        kept[order[index[keep]]] = True
        first = last
    return kept


def _nms_boxes(boxes: torch.Tensor, classes: torch.Tensor, images: torch.Tensor,
               num_images: int) -> torch.Tensor:
    """The boxes torchvision's per-image ``batched_nms`` would hand to ``nms``: offset by
    class (``classes`` × (the image's largest coordinate + 1)) in images with few enough
    boxes for its coordinate trick, as they are in the others."""
    counts = torch.bincount(images, minlength=num_images)
    limit = COORDINATE_TRICK_LIMIT.get(boxes.device.type, COORDINATE_TRICK_LIMIT["cuda"])
    tricked = (counts * 4 <= limit)[images]
    largest = torch.full((num_images,), -torch.inf, dtype=boxes.dtype, device=boxes.device)
    largest = largest.scatter_reduce(0, images, boxes.amax(1), "amax")
    offsets = classes.to(boxes) * (largest[images] + torch.tensor(1).to(boxes))
    return torch.where(tricked[:, None], boxes + offsets[:, None], boxes)


def _image_order(scores: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Indices ordered by image, then by decreasing score, equal scores by index."""
    index = torch.sort(scores, descending=True, stable=True).indices
    return index[torch.sort(images[index], stable=True).indices]


def _kept_top(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor,
              images: torch.Tensor, num_images: int, iou_threshold: float,
              top: int) -> list[torch.Tensor]:
    """Per image, the first ``top`` boxes that ``grouped_nms`` keeps, by decreasing score.

    Greedy NMS decides a box by the higher-scoring boxes alone, so an image's first K
    candidates decide their own fate: NMS runs on each image's best ``2 * top`` candidates,
    and again on twice as many for the images where fewer than ``top`` survived, until each
    image has ``top`` kept boxes or no candidate left (the same boxes as NMS on all of them)."""
    order = _image_order(scores, images)
    counts = torch.bincount(images, minlength=num_images)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order), device=order.device) - starts[images[order]]
    kept = torch.zeros(len(scores), dtype=torch.bool, device=scores.device)
    pending = counts > 0
    first = max(2 * top, 64)
    while bool(pending.any()):
        chosen = torch.nonzero((rank < first) & pending[images])[:, 0]
        found = grouped_nms(boxes[chosen], scores[chosen], groups[chosen], iou_threshold)
        kept[chosen] = found
        survivors = torch.bincount(images[chosen[found]], minlength=num_images)
        pending &= (survivors < top) & (counts > first)
        first *= 2
    index = order[kept[order]]
    return [part[:top] for part in index.split(torch.bincount(
        images[index], minlength=num_images).tolist())]


def _clip(boxes: torch.Tensor, heights: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """``clip_boxes_to_image`` for boxes of many images at once (``heights``, ``widths``:
    each box's image size, broadcast against ``boxes[..., 0]``)."""
    x = torch.minimum(boxes[..., 0::2].clamp(min=0), widths[..., None])
    y = torch.minimum(boxes[..., 1::2].clamp(min=0), heights[..., None])
    return torch.stack((x, y), dim=-1).reshape(boxes.shape)


def _sizes(image_shapes: Sequence[tuple[int, int]], like: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor]:
    shapes = torch.tensor(image_shapes, dtype=like.dtype).to(like.device)
    return shapes[:, 0], shapes[:, 1]


def filter_proposals(rpn: RegionProposalNetwork, proposals: torch.Tensor,
                     objectness: torch.Tensor, image_shapes: list[tuple[int, int]],
                     num_anchors_per_level: list[int]) -> tuple[list[torch.Tensor],
                                                                list[torch.Tensor]]:
    """``RegionProposalNetwork.filter_proposals`` for the whole batch at once."""
    num_images = proposals.shape[0]
    device = proposals.device
    objectness = objectness.detach().reshape(num_images, -1)
    levels = torch.cat([torch.full((n,), level, dtype=torch.int64, device=device)
                        for level, n in enumerate(num_anchors_per_level)])
    top_n = rpn._get_top_n_idx(objectness, num_anchors_per_level)
    batch = torch.arange(num_images, device=device)[:, None]
    scores = torch.sigmoid(objectness[batch, top_n])
    levels = levels[top_n]
    heights, widths = _sizes(image_shapes, proposals)
    boxes = _clip(proposals[batch, top_n], heights[:, None], widths[:, None])
    candidate = ((boxes[..., 2] - boxes[..., 0] >= rpn.min_size)
                 & (boxes[..., 3] - boxes[..., 1] >= rpn.min_size)
                 & (scores >= rpn.score_thresh))
    images = batch.expand_as(scores)[candidate]
    boxes, scores, levels = boxes[candidate], scores[candidate], levels[candidate]
    picks = _kept_top(_nms_boxes(boxes, levels, images, num_images), scores,
                      images * len(num_anchors_per_level) + levels, images, num_images,
                      rpn.nms_thresh, rpn.post_nms_top_n())
    return [boxes[p] for p in picks], [scores[p] for p in picks]


def postprocess_detections(roi_heads: RoIHeads, class_logits: torch.Tensor,
                           box_regression: torch.Tensor, proposals: list[torch.Tensor],
                           image_shapes: list[tuple[int, int]]
                           ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """``RoIHeads.postprocess_detections`` for the whole batch at once."""
    device = class_logits.device
    num_images, num_classes = len(proposals), class_logits.shape[-1]
    per_image = torch.tensor([len(p) for p in proposals], device=device)
    images = torch.repeat_interleave(torch.arange(num_images, device=device), per_image)
    boxes = roi_heads.box_coder.decode(box_regression, proposals)
    scores = F.softmax(class_logits, -1)
    heights, widths = _sizes(image_shapes, boxes)
    boxes = _clip(boxes, heights[images][:, None], widths[images][:, None])
    labels = torch.arange(num_classes, device=device).expand_as(scores)
    boxes, scores, labels = boxes[:, 1:].reshape(-1, 4), scores[:, 1:].reshape(-1), \
        labels[:, 1:].reshape(-1)
    images = images[:, None].expand(-1, num_classes - 1).reshape(-1)
    candidate = ((scores > roi_heads.score_thresh)
                 & (boxes[:, 2] - boxes[:, 0] >= 1e-2) & (boxes[:, 3] - boxes[:, 1] >= 1e-2))
    boxes, scores, labels, images = (boxes[candidate], scores[candidate], labels[candidate],
                                     images[candidate])
    picks = _kept_top(_nms_boxes(boxes, labels, images, num_images), scores,
                      images * num_classes + labels, images, num_images, roi_heads.nms_thresh,
                      roi_heads.detections_per_img)
    return [boxes[p] for p in picks], [scores[p] for p in picks], [labels[p] for p in picks]


def install(model: GeneralizedRCNN) -> GeneralizedRCNN:
    """Make ``model`` (this instance only) post-process its batches with this module."""
    model.rpn.filter_proposals = types.MethodType(filter_proposals, model.rpn)
    model.roi_heads.postprocess_detections = types.MethodType(postprocess_detections,
                                                              model.roi_heads)
    return model
