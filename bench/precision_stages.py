"""How far bf16/fp16 is from fp32, stage by stage: a measuring instrument for the tests
(``tests/test_precision.py``) and the GPU bench (``bench/gpu_smoke.py``), not part of segpipe.

``stage_agreement`` feeds each stage of a detector the same inputs in fp32 and in low
precision (the same anchors, the same proposals, the same boxes) and compares the outputs:
random weights give near-tie scores, so comparing whole runs would only measure reordering.
``scale_to_trained_outputs`` rescales a random model's output layers to a trained model's
logit ranges, so that the comparison sees trained-like scores. The precision rules measured
are segpipe's own (``segpipe.model.precision``: fp32 islands around box decoding, anchors,
NMS and mask probabilities).
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Optional

import torch
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import paste_masks_in_image

from segpipe.model.precision import autocast, install_fp32_islands, remove_fp32_islands, uses_channels_last


@dataclass
class StageAgreement:
    """How far ``precision`` is from fp32, stage by stage, each stage fed identical inputs."""

    precision: str
    fp32_islands: bool
    feature_relative_error: dict[str, float]  # per FPN level: ||low - fp32|| / ||fp32||
    anchors_max_px: float                     # anchors: largest difference to fp32's
    proposals_median_px: float                # RPN decode of the same anchors (top 1000)
    proposals_max_px: float
    boxes_median_px: float                    # box head decode of the same proposals,
    boxes_max_px: float                       # in original image pixels
    masks_mean_iou: Optional[float]           # mask head on the same boxes, pasted, > 0.5
    masks_min_iou: Optional[float]
    mask_prob_max_diff: Optional[float]
    detections: int

    def as_dict(self) -> dict:
        return asdict(self)


def _px(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    diff = (a.float() - b.float()).abs().flatten()
    if diff.numel() == 0:
        return 0.0, 0.0
    return float(diff.median()), float(diff.max())


@torch.inference_mode()
def stage_agreement(model: GeneralizedRCNN, image: torch.Tensor, precision: str,
                    fp32_islands: bool = True) -> StageAgreement:
    """Compare ``precision`` with fp32 on one ``3×H×W`` image (on the model's device).

    ``fp32_islands=False`` measures torchvision as it is, to show what the islands fix."""
    device = image.device
    transform = model.transform
    resized, _ = transform.resize(transform.normalize(image), None)
    batch = transform.batch_images([resized], size_divisible=transform.size_divisible)
    image_list = ImageList(batch, [tuple(resized.shape[-2:])])
    scale = torch.tensor([image.shape[-1] / resized.shape[-1], image.shape[-2] / resized.shape[-2]]
                         * 2, device=device)
    if fp32_islands:
        install_fp32_islands(model)
    else:
        remove_fp32_islands(model)
    channels_last = uses_channels_last(device, precision)
    try:
        low_input = batch.contiguous(memory_format=torch.channels_last) if channels_last else batch
        if channels_last:
            model.backbone.to(memory_format=torch.channels_last)
        with autocast(device, precision):
            low_features = model.backbone(low_input)
        model.backbone.to(memory_format=torch.contiguous_format)
        features = model.backbone(batch)
        errors = {name: float((low_features[name].float() - f).norm() / f.norm().clamp_min(1e-12))
                  for name, f in features.items()}
        low_maps, maps = list(low_features.values()), list(features.values())

        # Anchors: what the generator gives for low-precision feature maps vs fp32 ones.
        anchor_generator = model.rpn.anchor_generator
        anchor_generator.cell_anchors = [a.float() for a in anchor_generator.cell_anchors]
        anchors = anchor_generator(image_list, maps)[0]
        with autocast(device, precision):
            low_anchors = anchor_generator(image_list, low_maps)[0]
        anchors_max = float((low_anchors.float() - anchors).abs().max())
        anchor_generator.cell_anchors = [a.float() for a in anchor_generator.cell_anchors]

        # RPN: the head on each precision's features, both decoded against the same anchors.
        objectness, deltas = model.rpn.head(maps)
        with autocast(device, precision):
            low_objectness, low_deltas = model.rpn.head(low_maps)
        flat = _flat_rpn(objectness, deltas)
        low_flat = _flat_rpn(low_objectness, low_deltas)
        top = flat[0].topk(min(1000, flat[0].numel())).indices
        coder = model.rpn.box_coder
        proposals_px = _px(coder.decode_single(low_flat[1][top], anchors[top]),
                           coder.decode_single(flat[1][top], anchors[top]))

        # Box head on the same fp32 proposals.
        proposals, _ = model.rpn(image_list, features)
        heads = model.roi_heads
        scores, regression = heads.box_predictor(heads.box_head(
            heads.box_roi_pool(features, proposals, image_list.image_sizes)))
        with autocast(device, precision):
            low_scores, low_regression = heads.box_predictor(heads.box_head(
                heads.box_roi_pool(low_features, proposals, image_list.image_sizes)))
        classes = scores[:, 1:].argmax(dim=1) + 1
        rows = torch.arange(len(classes), device=device)
        boxes = heads.box_coder.decode(regression, proposals)[rows, classes]
        low_boxes = heads.box_coder.decode(low_regression, proposals)[rows, classes]
        boxes_px = _px(low_boxes * scale, boxes * scale)

        # Mask head on the same boxes: fp32's final detections.
        detections, _ = heads(features, proposals, image_list.image_sizes)
        det_boxes, labels = detections[0]["boxes"], detections[0]["labels"]
        iou = prob_diff = None
        if heads.has_mask() and len(det_boxes):
            probs = _mask_probs(heads, features, det_boxes, labels, image_list)
            with autocast(device, precision):
                low_probs = _mask_probs(heads, low_features, det_boxes, labels, image_list)
            prob_diff = float((low_probs.float() - probs).abs().max())
            size = tuple(resized.shape[-2:])
            pasted = paste_masks_in_image(probs[:, None], det_boxes, size)[:, 0] > 0.5
            low_pasted = paste_masks_in_image(low_probs.float()[:, None], det_boxes, size)[:, 0] > 0.5
            inter = (pasted & low_pasted).flatten(1).sum(1).float()
            union = (pasted | low_pasted).flatten(1).sum(1).float()
            per_mask = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))
            iou = (float(per_mask.mean()), float(per_mask.min()))
    finally:
        model.backbone.to(memory_format=torch.contiguous_format)
        install_fp32_islands(model)
    return StageAgreement(
        precision=precision, fp32_islands=fp32_islands, feature_relative_error=errors,
        anchors_max_px=anchors_max, proposals_median_px=proposals_px[0],
        proposals_max_px=proposals_px[1], boxes_median_px=boxes_px[0], boxes_max_px=boxes_px[1],
        masks_mean_iou=iou and iou[0], masks_min_iou=iou and iou[1],
        mask_prob_max_diff=prob_diff, detections=len(det_boxes))


def _flat_rpn(objectness: list[torch.Tensor], deltas: list[torch.Tensor]
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The RPN head's per-level outputs of one image as (scores[A], deltas[A, 4]), in the
    anchor generator's order (level, y, x, anchor)."""
    scores = torch.cat([o[0].permute(1, 2, 0).reshape(-1) for o in objectness])
    boxes = torch.cat([d[0].reshape(-1, 4, *d.shape[-2:]).permute(2, 3, 0, 1).reshape(-1, 4)
                       for d in deltas])
    return scores.float(), boxes


def _mask_probs(heads, features, boxes, labels, image_list) -> torch.Tensor:
    logits = heads.mask_predictor(heads.mask_head(
        heads.mask_roi_pool(features, [boxes], image_list.image_sizes)))
    return logits[torch.arange(len(labels), device=logits.device), labels].sigmoid()


def scale_to_trained_outputs(model: GeneralizedRCNN, image: torch.Tensor) -> dict[str, float]:
    """Rescale a randomly initialised model's last layers so their outputs on ``image`` have a
    trained model's spread; return the spreads they had. For stage agreement only.

    Random weights give box regression outputs of standard deviation 2.6 (RPN) and 4.9 (box
    head), up to 17, where a trained model's targets are normalised to about 1 (torchvision's
    box coder weights); ``exp`` of those deltas multiplies the network's own low-precision
    error into tens of pixels no trained model would see. The regression layers are scaled to
    standard deviation 1 and the mask logits to 4 (trained masks are confident)."""
    layers = {"rpn": (model.rpn.head.bbox_pred, 1.0),
              "box": (model.roi_heads.box_predictor.bbox_pred, 1.0)}
    if getattr(model.roi_heads, "mask_predictor", None) is not None:
        layers["mask"] = (model.roi_heads.mask_predictor.mask_fcn_logits, 4.0)
    outputs: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    handles = [layer.register_forward_hook(
        lambda module, args, out, name=name: outputs[name].append(out.detach().float().flatten()))
        for name, (layer, _) in layers.items()]
    try:
        with torch.inference_mode():
            model([image])
    finally:
        for handle in handles:
            handle.remove()
    spreads = {}
    with torch.no_grad():
        for name, (layer, target) in layers.items():
            spread = float(torch.cat(outputs[name]).std()) if outputs[name] else 0.0
            spreads[name] = spread
            if spread > 0:
                layer.weight.mul_(target / spread)
                layer.bias.mul_(target / spread)
    return spreads


def summarise(agreements: list[StageAgreement]) -> dict:
    """Medians over images of each figure (the worst for maxima and minima)."""
    if not agreements:
        return {}
    out: dict = {"images": len(agreements), "precision": agreements[0].precision,
                 "fp32_islands": agreements[0].fp32_islands}
    for key in ("proposals_median_px", "boxes_median_px", "masks_mean_iou"):
        values = [getattr(a, key) for a in agreements if getattr(a, key) is not None]
        out[key] = statistics.median(values) if values else None
    for key in ("anchors_max_px", "proposals_max_px", "boxes_max_px", "mask_prob_max_diff"):
        values = [getattr(a, key) for a in agreements if getattr(a, key) is not None]
        out[key] = max(values) if values else None
    values = [a.masks_min_iou for a in agreements if a.masks_min_iou is not None]
    out["masks_min_iou"] = min(values) if values else None
    levels = agreements[0].feature_relative_error
    out["feature_relative_error"] = {
        level: statistics.median(a.feature_relative_error[level] for a in agreements)
        for level in levels}
    return out
